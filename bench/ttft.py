"""Time to first token that the gateway adds to a streamed answer of one model.

Run from the repository root with the project's virtualenv::

    .venv/bin/python bench/ttft.py --json bench/results/ttft.json

What it does, in one run, with ``bench/overhead.py``'s machinery (its process handling,
fake upstream, CascadeFlow server, database, load generator and percentiles):

1. Starts the fake OpenAI upstream (``tests/support/fake_upstream.py``: answers at once,
   streaming "Hello from the fake upstream." as five chunks, one word each) and one
   CascadeFlow server (uvicorn, uvloop + httptools, 1 worker, DEBUG off, metrics on as
   deployed by default, tracing off) on a throwaway database (PostgreSQL
   ``cascadeflow_bench_ttft``, ``--pg-db``; SQLite if PostgreSQL is unreachable), with a
   fresh tenant's API token: token auth, admission and the ledger row on every request.
2. Streams the same chat completion (``"stream": true``, model ``bench-model``: one model,
   not a cascade) to the upstream directly and through CascadeFlow, at concurrency 1
   (one keep-alive connection, closed loop), in alternating segments of ``--requests``
   requests, the order swapped every round, after a warm-up.
3. Time to first token, client side: from writing the request to reading the first
   server-sent event whose choices carry content (the first word); the whole stream's
   latency beside it. Added = CascadeFlow's percentile minus the upstream's.

``--phases`` runs CascadeFlow's application inside ``bench/probes/ttft_phases.py``, which
stamps the phases of each request (admission, upstream opened, headers, first chunk) and
reports their medians: where the time before the first token goes.

``--baseline REF`` adds a second CascadeFlow server running the code of git ref REF
(``git archive``), same database, its own tenant, measured in the same alternating
segments: a before/after comparison that the machine's noise hits alike.

Target: added TTFT p50 <= 2 ms at concurrency 1. Exit status 1 if a stream failed or the
ledger does not hold one row per stream answered.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import statistics
import sys
from pathlib import Path
from typing import Any

import overhead
from overhead import (
    CHAT_BODY,
    HOST,
    UPSTREAM_KEY,
    Segment,
    Target,
    cascadeflow_cmd,
    cascadeflow_env,
    code_under_test,
    create_tenant,
    free_port,
    http_request,
    ledger_counts,
    machine_info,
    managed_run,
    migrate,
    percentile,
    prepare_database,
    run_segment,
    start_upstream,
    wait_until_ready,
)

TARGET_ADDED_TTFT_P50_MS = 2.0
PROBES = Path(__file__).resolve().parent / "probes"
PG_DB = "cascadeflow_bench_ttft"
STREAM_BODY = json.dumps({**json.loads(CHAT_BODY), "stream": True}, separators=(",", ":")).encode()


def stream_text(body: bytes) -> str:
    """The content of a server-sent chat-completion stream, put together."""
    text = []
    for line in body.split(b"\n"):
        if line.startswith(b"data:") and line[5:].strip() != b"[DONE]":
            data = json.loads(line[5:])
            for choice in data.get("choices") or []:
                text.append((choice.get("delta") or {}).get("content") or "")
    return "".join(text)


def summarize(segments: list[Segment]) -> dict[str, Any]:
    ttft = sorted(v for s in segments for v in s.ttft_us)
    total = sorted(v for s in segments for v in s.latencies_us)
    return {
        "streams_ok": sum(s.ok for s in segments),
        "errors": sum(s.errors for s in segments),
        "error_samples": [e for s in segments for e in s.error_samples][:5],
        "ttft_p50_ms": percentile(ttft, 50),
        "ttft_p90_ms": percentile(ttft, 90),
        "ttft_p99_ms": percentile(ttft, 99),
        "stream_p50_ms": percentile(total, 50),
        "stream_p99_ms": percentile(total, 99),
        "per_round_ttft_p50_ms": [percentile(sorted(s.ttft_us), 50) for s in segments],
        "server_cpu_ms_per_stream": (
            sum(s.server_cpu_s for s in segments) * 1000 / max(1, sum(s.ok for s in segments))
        ),
    }


def benchmark(args: argparse.Namespace) -> dict[str, Any]:
    date = dt.datetime.now(dt.UTC)
    with managed_run(args.keep_tmp) as (procs, tmp):
        app_dir, code = code_under_test(args.ref, tmp)
        baseline = None
        if args.baseline:
            (tmp / "baseline").mkdir()
            baseline = code_under_test(args.baseline, tmp / "baseline")
        db = prepare_database(args.database_url, tmp, keep=False, name=args.pg_db)
        try:
            print(f"CascadeFlow code: {code['source']} at {code['commit'][:12]}", flush=True)
            if baseline:
                print(f"Baseline: {baseline[1]['source']} at {baseline[1]['commit'][:12]}")
            print(f"Database: {db.description}", flush=True)
            upstream_port = free_port()
            upstream = start_upstream(procs, upstream_port, app_dir)
            env = cascadeflow_env(db, tmp, upstream_port, args.redis_url)
            migrate(procs, env, app_dir)
            targets = [
                Target(
                    "direct",
                    "fake upstream (direct)",
                    upstream_port,
                    UPSTREAM_KEY,
                    upstream.pid,
                    body=STREAM_BODY,
                )
            ]
            servers = {"cascadeflow": ("CascadeFlow", app_dir)}
            if baseline:
                servers["baseline"] = (f"CascadeFlow at {args.baseline}", baseline[0])
            tenants: dict[str, str] = {}
            phases_out = tmp / "phases.json" if args.phases else None
            for key, (label, where) in servers.items():
                tenants[key], token = create_tenant(procs, env, app_dir)
                prom_dir = tmp / f"prometheus-{key}"
                prom_dir.mkdir()
                port = free_port()
                command = cascadeflow_cmd(port, 1)
                server_env = {**env, "PROMETHEUS_MULTIPROC_DIR": str(prom_dir)}
                if phases_out is not None and key == "cascadeflow":
                    app = command.index("cascadeflow_site.asgi:application")
                    command[app] = "ttft_phases:application"
                    server_env["PYTHONPATH"] = str(PROBES)
                    server_env["CF_TTFT_PHASES_OUT"] = str(phases_out)
                server = procs.start(key, command, env=server_env, cwd=where)
                wait_until_ready(procs, key, server, port, "/healthz")
                targets.append(Target(key, label, port, token, server.pid, body=STREAM_BODY))
            wait_until_ready(procs, "upstream", upstream, upstream_port, "/v1/models")
            data = measure(args, procs, targets, env, tenants, app_dir, db)
            if phases_out is not None:
                data["phases_ms"] = json.loads(phases_out.read_text())
            return {
                "date_utc": date.isoformat(timespec="seconds"),
                "command": " ".join([Path(sys.executable).name, *sys.argv]),
                "machine": machine_info(),
                "database": db.description,
                "code": code,
                "baseline_code": baseline[1] if baseline else None,
                **data,
            }
        finally:
            procs.stop_all()
            if db.cleanup is not None:
                db.cleanup()


def measure(
    args: argparse.Namespace,
    procs: overhead.Processes,
    targets: list[Target],
    env: dict[str, str],
    tenants: dict[str, str],
    app_dir: Path,
    db: overhead.Database,
) -> dict[str, Any]:
    answered = dict.fromkeys(tenants, 0)  # streams each CascadeFlow answered: one row each
    for t in targets:  # the same answer from all
        status, body = http_request(t.port, "POST", t.path, body=STREAM_BODY, auth=t.auth)
        text = stream_text(body)
        if status != 200 or text != overhead.EXPECTED_CONTENT:
            raise RuntimeError(f"{t.label} answered {status}: {body[:500]!r}")
        if t.key in answered:
            answered[t.key] += 1
    print(f"Warm-up: {args.warmup} streams per target ...", flush=True)
    for t in targets:
        seg = run_segment(procs, t, 1, duration=None, requests=args.warmup, round_no=-1, ttft=True)
        if seg.errors:
            raise RuntimeError(f"{t.label} warm-up errors: {seg.error_samples}")
        if t.key in answered:
            answered[t.key] += seg.ok
    segments: list[Segment] = []
    for round_no in range(args.rounds):
        shift = round_no % len(targets)
        for t in targets[shift:] + targets[:shift]:
            seg = run_segment(
                procs,
                t,
                1,
                duration=None,
                requests=args.requests,
                round_no=round_no,
                db_name=db.pg_name if t.key in answered else None,
                ttft=True,
            )
            segments.append(seg)
            if t.key in answered:
                answered[t.key] += seg.ok
            print(
                f"  round {round_no + 1}/{args.rounds} {t.label:<32} TTFT p50 "
                f"{percentile(sorted(seg.ttft_us), 50):6.2f} ms  errors {seg.errors}",
                flush=True,
            )
    results = {t.key: summarize([s for s in segments if s.target == t.key]) for t in targets}
    for t in targets:
        results[t.key]["label"] = t.label
    direct = results["direct"]
    added: dict[str, Any] = {}
    for key in tenants:
        cf = results[key]
        per_round = [
            round(c - d, 3)
            for d, c in zip(
                direct["per_round_ttft_p50_ms"], cf["per_round_ttft_p50_ms"], strict=True
            )
        ]
        added[key] = {
            "ttft_p50_ms": cf["ttft_p50_ms"] - direct["ttft_p50_ms"],
            "ttft_p99_ms": cf["ttft_p99_ms"] - direct["ttft_p99_ms"],
            "stream_p50_ms": cf["stream_p50_ms"] - direct["stream_p50_ms"],
            "ttft_p50_per_round_ms": per_round,
            "ttft_p50_median_of_rounds_ms": statistics.median(per_round),
            "ratio_ttft_p50_over_direct": cf["ttft_p50_ms"] / direct["ttft_p50_ms"],
        }
    ledger = {}
    for key, tenant in tenants.items():
        total, ok = ledger_counts(env, procs, tenant, app_dir)
        ledger[key] = {
            "rows": total,
            "rows_ok": ok,
            "streams": answered[key],
            "matches": ok == answered[key] == total,
        }
    return {
        "config": {
            "rounds": args.rounds,
            "requests_per_segment": args.requests,
            "warmup_requests": args.warmup,
            "concurrency": 1,
            "request_body": STREAM_BODY.decode(),
            "host": HOST,
        },
        "results": results,
        "added": added,
        "target_added_ttft_p50_ms": TARGET_ADDED_TTFT_P50_MS,
        "target_met": added["cascadeflow"]["ttft_p50_ms"] <= TARGET_ADDED_TTFT_P50_MS,
        "ledger": ledger,
    }


def report(data: dict[str, Any]) -> str:
    res = data["results"]
    lines = [
        "Streamed chat completion, one model, concurrency 1 (ms)",
        "",
        "| target | streams | TTFT p50 | TTFT p90 | TTFT p99 | whole stream p50 "
        "| whole stream p99 | server CPU ms/stream |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in res.values():
        lines.append(
            f"| {r['label']} | {r['streams_ok']} | {r['ttft_p50_ms']:.2f} "
            f"| {r['ttft_p90_ms']:.2f} | {r['ttft_p99_ms']:.2f} | {r['stream_p50_ms']:.2f} "
            f"| {r['stream_p99_ms']:.2f} | {r['server_cpu_ms_per_stream']:.2f} |"
        )
    lines.append("")
    for key, added in data["added"].items():
        lines.append(
            f"{res[key]['label']}: added TTFT p50 {added['ttft_p50_ms']:.2f} ms (per round: "
            f"{', '.join(f'{v:.2f}' for v in added['ttft_p50_per_round_ms'])}; TTFT p50 "
            f"{added['ratio_ttft_p50_over_direct']:.1f}x the direct one); added TTFT p99 "
            f"{added['ttft_p99_ms']:.2f} ms; added whole-stream p50 "
            f"{added['stream_p50_ms']:.2f} ms."
        )
    if "baseline" in data["added"]:
        now, before = data["added"]["cascadeflow"], data["added"]["baseline"]
        lines.append(
            f"Added TTFT p50, working tree / baseline: "
            f"{now['ttft_p50_ms'] / before['ttft_p50_ms']:.2f}; server CPU per stream: "
            f"{res['cascadeflow']['server_cpu_ms_per_stream'] / res['baseline']['server_cpu_ms_per_stream']:.2f}."
        )
    phases = data.get("phases_ms")
    if phases:
        names = {
            "in->view": "body read, request_started, middleware, body parsed",
            "view->admitted": "admission: token, target, end user, limits, budgets (DB pool)",
            "admitted->opened": "plan, upstream called, its first chunk in",
            "opened->headers": "response built, headers handed to the server",
            "headers->first": "first chunk framed and handed to the server",
            "in->first": "in the application, in all",
        }
        outside = res["cascadeflow"]["ttft_p50_ms"] - phases["in->first"]
        lines += [
            "",
            f"Where CascadeFlow's time to first token goes (medians of the last "
            f"{phases['requests']} streams, ms):",
            "",
            "| phase | median ms |",
            "|---|---:|",
            *(f"| {label} | {phases[key]:.3f} |" for key, label in names.items()),
            f"| outside the application (HTTP parsing, sockets, client): TTFT p50 minus the "
            f"above | {outside:.3f} |",
            "",
        ]
    added = data["added"]["cascadeflow"]["ttft_p50_ms"]
    target = data["target_added_ttft_p50_ms"]
    lines.append(
        f"Target added TTFT p50 <= {target:g} ms: {'met' if data['target_met'] else 'NOT met'} "
        f"({added:.2f} ms, {added / target:.2f}x the target)."
    )
    for key, entry in data["ledger"].items():
        lines.append(
            f"Ledger ({res[key]['label']}): {entry['rows_ok']} rows for {entry['streams']} "
            f"streams ({'match' if entry['matches'] else 'MISMATCH'})."
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--json", metavar="OUT", type=Path, help="write every figure here")
    parser.add_argument("--rounds", type=int, default=6, help="alternating rounds (default 6)")
    parser.add_argument(
        "--requests", type=int, default=500, help="streams per target per round (default 500)"
    )
    parser.add_argument("--warmup", type=int, default=300, help="warm-up streams per target")
    parser.add_argument("--database-url", default=None, help="an existing database instead")
    parser.add_argument(
        "--pg-db", default=PG_DB, help=f"throwaway PostgreSQL database name (default {PG_DB})"
    )
    parser.add_argument("--redis-url", default=None, help="REDIS_URL for CascadeFlow")
    parser.add_argument("--ref", default=None, help="CascadeFlow as of this git ref")
    parser.add_argument(
        "--baseline",
        metavar="REF",
        default=None,
        help="also measure CascadeFlow as of REF (git archive), side by side in the same run",
    )
    parser.add_argument("--keep-tmp", action="store_true", help="keep logs and the temp dir")
    parser.add_argument(
        "--phases",
        action="store_true",
        help="time the phases of CascadeFlow's requests (bench/probes/ttft_phases.py)",
    )
    args = parser.parse_args(argv)
    data = overhead.run_and_report(benchmark, report, args)
    if data is None:
        return 130
    errors = sum(r["errors"] for r in data["results"].values())
    matches = all(entry["matches"] for entry in data["ledger"].values())
    return 0 if matches and not errors else 1


if __name__ == "__main__":
    sys.exit(main())
