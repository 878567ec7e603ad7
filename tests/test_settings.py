import os
import secrets
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from django.conf import settings
from django.db import connection

from cascadeflow_site.settings import development_secret_key
from tests.settings import DEVELOPMENT_ENV
from tests.support.services import services_required

ROOT = Path(__file__).resolve().parent.parent
PRINT_SETTINGS = (
    "import django; django.setup(); from django.conf import settings; "
    "print(settings.DEBUG); print(settings.SECRET_KEY)"
)


def bare_env(tmp_path, **values) -> dict[str, str]:
    """The suite's environment without its development opt-in: what an operator who sets
    nothing gets, plus ``values``."""
    env = {k: v for k, v in os.environ.items() if k not in DEVELOPMENT_ENV}
    env.pop("DJANGO_SECRET_KEY", None)
    env.update(
        DJANGO_SETTINGS_MODULE="cascadeflow_site.settings",
        CASCADEFLOW_VAR_DIR=str(tmp_path),
        **values,
    )
    return env


def run_python(env, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_production_settings_pass_check_deploy_without_warnings(tmp_path):
    env = bare_env(
        tmp_path,
        DJANGO_SECRET_KEY=secrets.token_urlsafe(64),
        DJANGO_ALLOWED_HOSTS="cascadeflow.example.com",
    )

    result = run_python(env, "manage.py", "check", "--deploy", "--fail-level", "WARNING")

    assert result.returncode == 0, result.stdout + result.stderr
    assert "System check identified no issues" in result.stdout


@pytest.mark.parametrize("debug", [None, "false"])
def test_production_settings_refuse_to_start_without_a_secret_key(tmp_path, debug):
    """Without DJANGO_DEBUG the settings are production ones: no key, no start."""
    env = bare_env(tmp_path, **({"DJANGO_DEBUG": debug} if debug else {}))

    result = run_python(env, "manage.py", "check")

    assert result.returncode != 0
    assert "ImproperlyConfigured" in result.stderr
    assert "DJANGO_SECRET_KEY must be set" in result.stderr
    assert not (tmp_path / "secret_key").exists()


def test_settings_are_production_ones_unless_debug_is_asked_for(tmp_path):
    env = bare_env(tmp_path, DJANGO_SECRET_KEY="k" * 50)

    result = run_python(env, "-c", PRINT_SETTINGS)

    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["False", "k" * 50]


def test_development_generates_a_private_key_per_install_and_keeps_it(tmp_path):
    first_install, second_install = tmp_path / "one", tmp_path / "two"
    first_install.mkdir()
    second_install.mkdir()

    keys = []
    for var_dir in (first_install, first_install, second_install):
        result = run_python(bare_env(var_dir, DJANGO_DEBUG="true"), "-c", PRINT_SETTINGS)
        assert result.returncode == 0, result.stderr
        debug, key = result.stdout.split()
        assert debug == "True"
        keys.append(key)

    assert keys[0] == keys[1] == (first_install / "secret_key").read_text().strip()
    assert keys[2] != keys[0]
    assert len(keys[0]) >= 50
    assert not keys[0].startswith("django-insecure")
    assert stat.S_IMODE((first_install / "secret_key").stat().st_mode) == 0o600


def test_an_explicit_secret_key_wins_in_development_and_writes_no_file(tmp_path):
    env = bare_env(tmp_path, DJANGO_DEBUG="true", DJANGO_SECRET_KEY="s" * 50)

    result = run_python(env, "-c", PRINT_SETTINGS)

    assert result.stdout.split() == ["True", "s" * 50]
    assert not (tmp_path / "secret_key").exists()


def test_development_key_is_made_once_and_leaves_no_temporary_file(tmp_path):
    path = tmp_path / "secret_key"

    first = development_secret_key(path)
    second = development_secret_key(path)

    assert first == second
    assert [p.name for p in tmp_path.iterdir()] == ["secret_key"]


def test_the_suite_runs_in_development_mode_by_its_own_choice():
    # pytest-django turns settings.DEBUG off while tests run; the environment tells the
    # choice, and the servers the suite starts inherit it.
    assert os.environ["DJANGO_DEBUG"] == "true"
    if "DJANGO_SECRET_KEY" not in os.environ:
        assert settings.SECRET_KEY == (settings.VAR_DIR / "secret_key").read_text().strip()


def test_litellm_never_fetches_its_price_map():
    assert os.environ["LITELLM_LOCAL_MODEL_COST_MAP"] == "True"


@pytest.mark.skipif(
    not services_required(), reason="CI guard: only with CASCADEFLOW_REQUIRE_SERVICES=1"
)
def test_ci_runs_on_postgresql_and_redis():
    """When CI says services are required, the suite really is on PostgreSQL and Redis."""
    import redis

    assert connection.vendor == "postgresql"
    assert settings.REDIS_URL
    assert redis.Redis.from_url(settings.REDIS_URL).ping() is True
    assert settings.CHANNEL_LAYERS["default"]["BACKEND"] == "channels_redis.core.RedisChannelLayer"


PRINT_DATABASE = (
    "from cascadeflow_site import settings as s; d = s.DATABASES['default']; "
    "print(d.get('DISABLE_SERVER_SIDE_CURSORS'), d['OPTIONS'].get('prepare_threshold', 'unset'), "
    "d['CONN_MAX_AGE'])"
)


@pytest.mark.parametrize(
    ("pooler", "expected"),
    [("", "None unset 60"), ("transaction", "True None 60")],
    ids=["direct", "behind-pgbouncer"],
)
def test_database_pooler_turns_off_what_transaction_pooling_cannot_carry(
    tmp_path, pooler, expected
):
    env = bare_env(
        tmp_path,
        DJANGO_DEBUG="true",
        DATABASE_URL="postgres://cascadeflow@127.0.0.1:6432/cascadeflow",
        DATABASE_POOLER=pooler,
    )

    result = run_python(env, "-c", PRINT_DATABASE)

    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == expected.split()


@pytest.mark.parametrize(
    ("database_url", "pooler"),
    [
        ("postgres://cascadeflow@127.0.0.1:6432/cascadeflow", "session"),
        ("sqlite:///db.sqlite3", "transaction"),
    ],
    ids=["unknown-mode", "not-postgresql"],
)
def test_database_pooler_refuses_what_it_cannot_mean(tmp_path, database_url, pooler):
    env = bare_env(tmp_path, DJANGO_DEBUG="true", DATABASE_URL=database_url, DATABASE_POOLER=pooler)

    result = run_python(env, "-c", PRINT_DATABASE)

    assert result.returncode != 0
    assert "ImproperlyConfigured" in result.stderr
    assert "DATABASE_POOLER" in result.stderr
