"""``make demo``: seed the demo tenant, run the web server and a Celery worker.

Runs on the embedded defaults (SQLite, in-memory channel layer, a filesystem
Celery broker, offline demo models) unless ``DATABASE_URL`` / ``REDIS_URL``
say otherwise. Ctrl-C stops everything it started.

The demo is development: it sets ``DJANGO_DEBUG=true`` (unless told otherwise)
for every process it starts, so the settings generate this install's own secret
key in ``var/secret_key`` instead of requiring ``DJANGO_SECRET_KEY``, and it lifts
the free tier's limits for the demo tenant (see ``DEVELOPMENT_ENV``).

Once the server answers, a traffic simulator (``demo.traffic``)
sends demo requests through the API in a background thread so the dashboard
moves: ``CASCADEFLOW_DEMO_TRAFFIC=0`` turns it off,
``CASCADEFLOW_DEMO_TRAFFIC_RATE`` sets its mean requests per second. The
demo's budgets leave room for it to run for weeks; one trial end user's
small daily budget is crossed, then refuses, every day.

The demo API token is kept across restarts (snippets pasted earlier keep
working): ``--rotate-token`` or ``CASCADEFLOW_DEMO_ROTATE_TOKEN=1`` revokes
it and prints a new one.

The log says what happened, once: the seeding (only when it seeds), the
banner, the simulator's totals, and warnings or errors of the processes.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from demo import traffic

ROOT = Path(__file__).resolve().parent.parent
PY = sys.executable
# Requests per second of the simulated traffic (each costs ~$0.0004 on the demo models);
# seed_demo sizes the demo's budgets for it.
DEFAULT_TRAFFIC_RATE = traffic.DEFAULT_RATE
# Python warnings that say nothing about the demo: Celery's about running as root (a
# container's user), Django's about serving static files under ASGI in development.
QUIET_WARNINGS = (
    "ignore:You're running the worker with superuser privileges",
    "ignore:StreamingHttpResponse must consume synchronous iterators",
)
# What ``make demo`` opts into; each can still be overridden from the environment.
DEVELOPMENT_ENV = {
    "DJANGO_DEBUG": "true",
    # The demo tenant is on the default (free) plan, and its 30 days of history alone
    # spend more than the free tier's production budget.
    "CASCADEFLOW_FREE_TIER_MONTHLY_BUDGET_USD": "",
    "CASCADEFLOW_FREE_TIER_RPM": "",
    "CASCADEFLOW_FREE_TIER_MODELS": "",
}


def run(*args: str, echo: bool = False) -> str:
    """Run a management command; return its stdout (``echo``: its notes on stderr go to
    ours as they are written, else they are shown only if it fails)."""
    result = subprocess.run(
        [PY, "manage.py", *args],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=None if echo else subprocess.PIPE,
        text=True,
        check=False,
    )
    if result.returncode != 0:
        sys.stderr.write(result.stdout + (result.stderr or ""))
        raise SystemExit(f"manage.py {' '.join(args)} failed")
    return result.stdout


def fresh_metrics_dir() -> Path:
    """An empty folder for this run's Prometheus samples (every process of the demo writes
    there; files of an earlier run would add to this run's counters)."""
    var = Path(os.environ.get("CASCADEFLOW_VAR_DIR") or ROOT / "var")
    folder = Path(os.environ.get("PROMETHEUS_MULTIPROC_DIR") or var / "prometheus")
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True, exist_ok=True)
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(folder)
    return folder


def quiet(*command: str) -> list[str]:
    """A Python command with the warnings that say nothing about the demo silenced."""
    flags = [arg for warning in QUIET_WARNINGS for arg in ("-W", warning)]
    return [PY, *flags, *command]


def wait_http(url: str, proc: subprocess.Popen, seconds: float = 60) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit("The web server exited during start-up; see the output above.")
        try:
            with urllib.request.urlopen(url, timeout=1):  # noqa: S310 - our own localhost URL
                return
        except OSError:
            time.sleep(0.2)
    raise SystemExit(f"The web server did not answer {url} within {seconds:.0f}s.")


def worker_command() -> list[str]:
    """One process: the worker and, embedded (-B), the beat that schedules the periodic
    tasks (reclaiming expired budget reservations, rollups, forecasts…).

    Beat keeps its state at the settings' ``CELERY_BEAT_SCHEDULE_FILENAME`` (under
    ``var/celery``, made by the settings whatever the broker). It logs warnings
    and errors only: no banner, no line per periodic task."""
    return quiet(
        "-m",
        "celery",
        "-A",
        "cascadeflow_site",
        "--quiet",
        "worker",
        "-B",
        "--loglevel",
        "WARNING",
        "--concurrency",
        "1",
        "--hostname",
        "demo@%h",
        "--without-gossip",
        "--without-mingle",
    )


def web_command(port: int) -> list[str]:
    """The web server, logging warnings and errors only (the banner says where it is)."""
    return quiet(
        "-m",
        "uvicorn",
        "cascadeflow_site.asgi:application",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--no-access-log",
        "--log-level",
        "warning",
    )


def banner(port: int, token: str) -> str:
    base = f"http://127.0.0.1:{port}"
    return f"""
================================================================================
 CascadeFlow demo is running: {base}/dashboard/
 Dashboard login: demo@cascadeflow.local / cascadeflow-demo
 Demo API token : {token}
                  (kept across restarts; --rotate-token issues a new one)
 Models         : demo/small, demo/medium, demo/large, and demo/embed for embeddings
                  (offline demo models)
 Metrics        : {base}/metrics (Prometheus, from this machine; docs/grafana/ has a board)
 Budgets        : the end user '{traffic.TRIAL_USER}' has a small daily budget: the
                  simulator crosses its warn and degrade thresholds, then gets 402s,
                  every day (Budgets & alerts, End users)

 curl:
   curl {base}/v1/chat/completions \\
     -H "Authorization: Bearer {token}" \\
     -H "Content-Type: application/json" \\
     -d '{{"model": "demo/small", "messages": [{{"role": "user", "content": "What is 17 * 23?"}}]}}'

 OpenAI SDK (Python):
   from openai import OpenAI
   client = OpenAI(base_url="{base}/v1", api_key="{token}")
   reply = client.chat.completions.create(
       model="demo/small", messages=[{{"role": "user", "content": "What is 17 * 23?"}}])
   print(reply.choices[0].message.content)
   vectors = client.embeddings.create(model="demo/embed", input=["a lighthouse", "a harbour"])
   print(len(vectors.data[0].embedding))

 Ctrl-C stops the web server and the worker.
================================================================================
"""


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Run the CascadeFlow demo.")
    parser.add_argument(
        "--rotate-token",
        action="store_true",
        default=os.environ.get("CASCADEFLOW_DEMO_ROTATE_TOKEN", "").strip().lower()
        in {"1", "true", "yes"},
        help="revoke the demo API token and issue a new one (else it is kept across restarts)",
    )
    args = parser.parse_args(argv)
    os.environ["LITELLM_LOCAL_MODEL_COST_MAP"] = "True"
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "cascadeflow_site.settings")
    for name, value in DEVELOPMENT_ENV.items():
        os.environ.setdefault(name, value)
    port = int(os.environ.get("PORT", "8000"))
    traffic_on = os.environ.get("CASCADEFLOW_DEMO_TRAFFIC", "1").strip().lower() not in {
        "0",
        "false",
        "no",
    }
    rate = float(os.environ.get("CASCADEFLOW_DEMO_TRAFFIC_RATE") or DEFAULT_TRAFFIC_RATE)
    fresh_metrics_dir()
    run("migrate", "--no-input")
    seed = ["seed_demo", "--traffic-rate", str(rate if traffic_on else 0)]
    if not args.rotate_token:
        seed.append("--keep-token")
    token = run(*seed, echo=True).strip().splitlines()[-1]

    procs: list[subprocess.Popen] = []
    traffic_stop: list = []

    def stop(*_: object) -> None:
        for event in traffic_stop:
            event.set()
        for proc in procs:
            if proc.poll() is None:
                proc.terminate()
        for proc in procs:
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
        raise SystemExit(0)

    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)
    web = subprocess.Popen(web_command(port), cwd=ROOT)
    procs.append(web)
    worker = subprocess.Popen(worker_command(), cwd=ROOT)
    procs.append(worker)
    wait_http(f"http://127.0.0.1:{port}/healthz", web)
    print(banner(port, token), flush=True)
    if not traffic_on:
        print("Simulated traffic is off (CASCADEFLOW_DEMO_TRAFFIC=0).", flush=True)
    else:
        # A daemon thread: it never holds up the exit; stop() also tells it to finish.
        _, event = traffic.start_in_background(
            f"http://127.0.0.1:{port}", token, rate, log_every=50
        )
        traffic_stop.append(event)
        print(
            f"Simulated traffic: ~{rate:g} requests/s through the API as the demo end users "
            "(CASCADEFLOW_DEMO_TRAFFIC=0 turns it off, CASCADEFLOW_DEMO_TRAFFIC_RATE sets the "
            "rate).",
            flush=True,
        )
    while True:
        for proc in procs:
            if proc.poll() is not None:
                name = proc.args[proc.args.index("-m") + 1]
                print(f"A demo process exited ({name}); stopping.", file=sys.stderr)
                stop()
        time.sleep(1)


if __name__ == "__main__":
    main()
