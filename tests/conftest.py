import getpass
import uuid
from urllib.parse import urlsplit

import pytest
from asgiref.sync import SyncToAsync
from django.conf import settings as django_settings
from django.db import connections

from routing.providers import demo
from tenants.services import token_create
from tests.factories import TenantFactory
from tests.support.fake_upstream import FakeUpstream, fake_models_config
from tests.support.services import skip_or_fail

# The gateway runs ORM work on pool threads; closing their connections after
# each call (CONN_MAX_AGE=0) lets the test database be dropped at the end.
django_settings.DATABASES["default"]["CONN_MAX_AGE"] = 0


@pytest.fixture(autouse=True, scope="session")
def _celery_eager():
    """Tasks run inline in tests; a real worker process is exercised separately."""
    from cascadeflow_site.celery import app

    app.conf.task_always_eager = True
    app.conf.task_eager_propagates = True
    yield
    app.conf.task_always_eager = False


@pytest.fixture(autouse=True)
def _close_async_orm_connections():
    """Django's async ORM methods run on asgiref's shared thread; close its connection."""
    yield
    SyncToAsync.single_thread_executor.submit(connections.close_all).result()


@pytest.fixture(autouse=True)
def _fresh_caller(settings):
    """No backoff sleeps, and circuit-breaker state never leaks between tests."""
    from routing.gateway import caller

    settings.CASCADEFLOW_UPSTREAM_BACKOFF = 0.0
    from tenants.ratelimits import limiter

    settings.CASCADEFLOW_BREAKER_PREFIX = f"cf:test:{uuid.uuid4().hex}:"
    settings.CASCADEFLOW_RATELIMIT_PREFIX = f"cf:test-rl:{uuid.uuid4().hex}"
    caller.cache_clear()
    limiter.cache_clear()
    yield
    caller.cache_clear()
    limiter.cache_clear()


@pytest.fixture(autouse=True)
async def _close_provider_sessions():
    yield
    from routing.engine import openai_wire

    await openai_wire.close_session()


@pytest.fixture(autouse=True)
def _empty_cache():
    from django.core.cache import cache

    cache.clear()
    yield


@pytest.fixture(autouse=True)
def _instant_demo_models():
    previous = demo.latency_scale
    demo.latency_scale = 0.0
    yield
    demo.latency_scale = previous


@pytest.fixture(scope="session")
def pgbouncer(django_db_setup):
    """PgBouncer in transaction mode in front of the test PostgreSQL, for the session.

    Started after the test database exists and stopped before it is dropped (its
    server connections would keep the drop from happening)."""
    from tests.support.live_server import PG_ADMIN_URL
    from tests.support.pgbouncer import PgBouncer, pgbouncer_binary

    database = django_settings.DATABASES["default"]
    if database["ENGINE"] != "django.db.backends.postgresql":
        skip_or_fail("PgBouncer tests need DATABASE_URL to name a PostgreSQL database")
    if pgbouncer_binary() is None:
        skip_or_fail("pgbouncer is not installed (apt-get install pgbouncer)")
    users = {database["USER"] or getpass.getuser(), urlsplit(PG_ADMIN_URL).username or "postgres"}
    bouncer = PgBouncer(
        server_host=database["HOST"] or "127.0.0.1",
        server_port=int(database["PORT"] or 5432),
        users=tuple(sorted(users)),
    ).start()
    yield bouncer
    bouncer.stop()


@pytest.fixture(autouse=True, scope="session")
def _session_through_pgbouncer(request):
    """CASCADEFLOW_TEST_PGBOUNCER=1: every connection of the session goes through PgBouncer."""
    from tests.support import pgbouncer

    if not pgbouncer.session_requested():
        yield
        return
    bouncer = request.getfixturevalue("pgbouncer")
    pgbouncer.set_session_pooler(bouncer)
    with pgbouncer.django_through(bouncer):
        yield
    pgbouncer.set_session_pooler(None)


@pytest.fixture
def through_pgbouncer(pgbouncer, transactional_db):
    """This test's own connections go through PgBouncer, outside any test transaction
    (autocommit, as a request runs), with the pooled settings (DATABASE_POOLER)."""
    from tests.support.pgbouncer import django_through, session_pooler

    if session_pooler() is not None:
        yield pgbouncer
        return
    with django_through(pgbouncer):
        yield pgbouncer


@pytest.fixture
def tenant(db):
    return TenantFactory(slug="acme")


@pytest.fixture
def other_tenant(db):
    return TenantFactory(slug="globex")


@pytest.fixture
def api_token(tenant):
    return token_create(tenant=tenant, name="test")


@pytest.fixture
def other_api_token(other_tenant):
    return token_create(tenant=other_tenant, name="other")


@pytest.fixture(scope="session")
def fake_upstream():
    server = FakeUpstream().start()
    yield server
    server.stop()


@pytest.fixture
def upstream(fake_upstream):
    """The shared fake upstream, with behaviours and request log reset for this test."""
    fake_upstream.behaviours.clear()
    fake_upstream.requests.clear()
    fake_upstream.keys.clear()
    fake_upstream.keys_accepted = None
    yield fake_upstream
    fake_upstream.behaviours.clear()
    fake_upstream.requests.clear()
    fake_upstream.keys.clear()
    fake_upstream.keys_accepted = None


@pytest.fixture(params=["openai-wire", "litellm"])
def fake_models(request, upstream, settings, monkeypatch):
    """Fake-upstream models, reached through both transports: CascadeFlow's lean
    OpenAI-wire client and LiteLLM's own OpenAI client."""
    monkeypatch.setenv(
        "CASCADEFLOW_OPENAI_FAST_PATH", "true" if request.param == "openai-wire" else "false"
    )
    settings.CASCADEFLOW_MODELS = fake_models_config(upstream.api_base)
    return upstream


@pytest.fixture(scope="session", params=["sqlite", "postgresql"])
def cascadeflow_server(request, fake_upstream):
    """CascadeFlow under uvicorn, once on SQLite and once on PostgreSQL."""
    from tests.support.live_server import LiveServer, postgres_available

    if request.param == "postgresql" and not postgres_available():
        skip_or_fail("PostgreSQL is not reachable for the live-server tests")
    server = LiveServer(backend=request.param, models=fake_models_config(fake_upstream.api_base))
    server.start()
    yield server
    server.stop()
