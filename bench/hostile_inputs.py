"""CPU of the request path's text readers on hostile shapes: the prompt's profile and the
draft's quality check, at growing sizes.

    .venv/bin/python bench/hostile_inputs.py [--sizes 4000,16000,64000] [--budget 10]
    .venv/bin/python bench/hostile_inputs.py --ref 4b288d8    # the engine of an older commit

Every request's prompt is profiled (``complexity.profile_query``) and every draft checked
(``signals.extract``, and ``audit.extracted`` for the audit labeller) on the gateway's event
loop: time spent there is time every other request on the process waits. Each shape is a
run the sender controls (line breaks, spaces after "=", digits, unclosed fences...). A
reader in linear time costs 4 times as much at 4 times the size; a pattern that tries every
split of a run costs 16 times (quadratic) or 64 (cubic). Each measurement runs in its own
process, stopped after ``--budget`` seconds (shown as "> budget").
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import os
import subprocess
import sys
from pathlib import Path

from benchenv import exported

ROOT = Path(__file__).resolve().parent.parent

QUERIES = {
    "maths": ("What is 12 * 7 + 3? Answer with a number.", {}),
    "choice": ("Which is right?\nA) one\nB) two\nC) three\nD) four", {}),
    "json": ("Give JSON.", {"response_format": {"type": "json_object"}}),
}
# (what is read, shape, the text at size n)
SHAPES = {
    "draft: fence, then spaces and tabs": ("draft", '"```json" + "\\t " * (n // 2) + "x"'),
    "draft: '1 =', then spaces": ("draft", '"1 = " + " " * n + "x"'),
    "draft: 'answer', then spaces": ("draft", '"answer" + " \\t" * (n // 2) + "x"'),
    "draft: unclosed \\boxed{": ("draft", '"\\\\boxed{" * (n // 7)'),
    "draft: ordinary maths working": ("draft", '("She has 3 * 4 = 12 apples. " * n)[:n]'),
    "prompt: line breaks": ("prompt", '"\\n" * n + "x"'),
    "prompt: blank lines of spaces": ("prompt", '"\\n " * (n // 2) + "x"'),
    "prompt: digits": ("prompt", '"1" * n'),
    "prompt: SELECT without FROM": ("prompt", '"select " * (n // 7)'),
    "prompt: ordinary text": ("prompt", '("Explain why 3 apples cost $4. " * n)[:n]'),
}

CHILD = """
import os, sys, time
os.environ["LITELLM_LOCAL_MODEL_COST_MAP"] = "True"
sys.path.insert(0, {root!r})
from routing.engine import audit, signals
from routing.engine.complexity import profile_query
n = {n}
text = {expr}
kind = {kind!r}
queries = {queries!r}
profiles = [(profile_query(q), params) for q, params in queries.values()]
started = time.process_time()
if kind == "prompt":
    profile_query(text)
else:
    for query, params in profiles:
        signals.extract(signals.Draft(content=text), query, params)
        audit.extracted(signals.Draft(content=text), query, params)
print(time.process_time() - started)
"""


def measure(root: Path, kind: str, expr: str, n: int, budget: float) -> float | None:
    code = CHILD.format(root=str(root), n=n, expr=expr, kind=kind, queries=QUERIES)
    try:
        out = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, timeout=budget + 5
        )
    except subprocess.TimeoutExpired:
        return None
    if out.returncode != 0:
        raise SystemExit(out.stderr)
    seconds = float(out.stdout.strip())
    return None if seconds > budget else seconds


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="4000,16000,64000")
    parser.add_argument("--budget", type=float, default=10.0, help="seconds per measurement")
    parser.add_argument("--ref", help="measure the engine of this git ref instead")
    args = parser.parse_args(argv)
    sizes = [int(s) for s in args.sizes.split(",")]
    with exported(args.ref) if args.ref else contextlib.nullcontext((ROOT, "")) as (root, _):
        engine = args.ref or "working tree"
        print(f"CPU seconds per read (engine: {engine}; > {args.budget:g}: stopped)\n")
        head = " | ".join(f"{n:,} chars" for n in sizes)
        print(f"| shape | {head} | growth per 4x size |")
        print("|---|" + "---:|" * (len(sizes) + 1))
        for name, (kind, expr) in SHAPES.items():
            times = [measure(root, kind, expr, n, args.budget) for n in sizes]
            cells = [f"{t:.4f}" if t is not None else f"> {args.budget:g}" for t in times]
            pairs = [(a, b) for a, b in itertools.pairwise(times) if a and b and a > 1e-4]
            growth = max((b / a for a, b in pairs), default=None)
            grown = f"{growth:.1f}x" if growth is not None else "-"
            print(f"| {name} | {' | '.join(cells)} | {grown} |")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
    sys.exit(main())
