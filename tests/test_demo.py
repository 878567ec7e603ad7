"""``make demo``'s worker process with its embedded beat, started for real."""

import os
import subprocess
import time
from pathlib import Path

import pytest

from demo import server as demo
from tests.support.services import skip_or_fail

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("broker", ["filesystem", "redis"])
def test_demo_worker_starts_its_beat_whatever_the_broker(tmp_path, broker):
    """Beat's schedule lives under var/celery, which must exist with Redis as without it."""
    env = {
        **os.environ,
        **demo.DEVELOPMENT_ENV,
        "DJANGO_SETTINGS_MODULE": "cascadeflow_site.settings",
        "CASCADEFLOW_VAR_DIR": str(tmp_path),
        "DATABASE_URL": f"sqlite:///{tmp_path / 'demo.sqlite3'}",
        "PYTHONUNBUFFERED": "1",
    }
    env.pop("CELERY_BROKER_URL", None)
    if broker == "redis":
        if not os.environ.get("REDIS_URL"):
            skip_or_fail("REDIS_URL is not set for the Redis-broker beat test")
    else:
        env["REDIS_URL"] = ""
    # Its own queue: this worker must not take tasks meant for another test's worker; and
    # the INFO lines that say beat started (the demo itself logs warnings only).
    command = [
        *demo.worker_command(),
        "--queues",
        f"demo-beat-{os.getpid()}",
        "--loglevel",
        "INFO",
    ]
    log = tmp_path / "worker.log"
    with log.open("w") as out:
        process = subprocess.Popen(
            command, cwd=demo.ROOT, env=env, stdout=out, stderr=subprocess.STDOUT
        )
    try:
        schedule = tmp_path / "celery" / "beat-schedule"
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline and process.poll() is None:
            if "beat: Starting" in log.read_text() and list(
                Path(schedule.parent).glob(f"{schedule.name}*")
            ):
                break
            time.sleep(0.25)
        time.sleep(1.0)  # a beat that fails opening its schedule does so right after starting
        output = log.read_text()
        assert process.poll() is None, output
        assert "beat: Starting" in output, output
        assert "Traceback" not in output and "FileNotFoundError" not in output, output
        # A clean log: no warning about running as root or about a missing broker host.
        assert "superuser privileges" not in output, output
        assert "No hostname was supplied" not in output, output
        assert list(schedule.parent.glob(f"{schedule.name}*")), output
    finally:
        process.terminate()
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()


def test_each_demo_run_starts_its_metrics_from_zero(tmp_path, monkeypatch):
    folder = tmp_path / "prometheus"
    folder.mkdir()
    (folder / "counter_1234.db").write_bytes(b"an earlier run's samples")
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(folder))
    assert demo.fresh_metrics_dir() == folder
    assert folder.is_dir() and not list(folder.iterdir())
    assert os.environ["PROMETHEUS_MULTIPROC_DIR"] == str(folder)
