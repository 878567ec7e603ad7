"""``make demo``: seed the demo tenant, run the web server and a Celery worker.

Runs on the embedded defaults (SQLite, in-memory channel layer, a filesystem
Celery broker, offline demo models) unless ``DATABASE_URL`` / ``REDIS_URL``
say otherwise. Ctrl-C stops everything it started.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PY = sys.executable


def run(*args: str) -> str:
    result = subprocess.run(
        [PY, "manage.py", *args], cwd=ROOT, capture_output=True, text=True, check=False
    )
    if result.returncode != 0:
        sys.stderr.write(result.stdout + result.stderr)
        raise SystemExit(f"manage.py {' '.join(args)} failed")
    return result.stdout


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


def banner(port: int, token: str) -> str:
    base = f"http://127.0.0.1:{port}"
    return f"""
================================================================================
 CascadeFlow demo is running: {base}/dashboard/
 Dashboard login: demo@cascadeflow.local / cascadeflow-demo
 Demo API token : {token}
 Models         : demo/small, demo/medium, demo/large (offline demo models)

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

 Ctrl-C stops the web server and the worker.
================================================================================
"""


def main() -> None:
    os.environ["LITELLM_LOCAL_MODEL_COST_MAP"] = "True"
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "cascadeflow_site.settings")
    port = int(os.environ.get("PORT", "8000"))
    run("migrate", "--no-input")
    token = run("seed_demo").strip().splitlines()[-1]

    procs: list[subprocess.Popen] = []

    def stop(*_: object) -> None:
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
    web = subprocess.Popen(
        [
            PY,
            "-m",
            "uvicorn",
            "cascadeflow_site.asgi:application",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--no-access-log",
        ],
        cwd=ROOT,
    )
    procs.append(web)
    # One process: the worker and, embedded (-B), the beat that schedules the
    # periodic tasks (reclaiming expired budget reservations…).
    schedule = ROOT / "var" / "celery" / "beat-schedule"
    worker = subprocess.Popen(
        [
            PY,
            "-m",
            "celery",
            "-A",
            "cascadeflow_site",
            "worker",
            "-B",
            "--schedule",
            str(schedule),
            "--loglevel",
            "INFO",
            "--concurrency",
            "1",
            "--hostname",
            "demo@%h",
            "--without-gossip",
            "--without-mingle",
        ],
        cwd=ROOT,
    )
    procs.append(worker)
    wait_http(f"http://127.0.0.1:{port}/healthz", web)
    print(banner(port, token), flush=True)
    while True:
        for proc in procs:
            if proc.poll() is not None:
                print(f"A demo process exited ({proc.args[2]}); stopping.", file=sys.stderr)
                stop()
        time.sleep(1)


if __name__ == "__main__":
    main()
