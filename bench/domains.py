"""Accuracy of the domain detector (routing/engine/complexity.py) on labelled queries.

    python bench/domains.py [--data-dir ../shared/data]

Three labelled sets, reported separately:
- bench/data/domains.jsonl: 90 hand-written queries, 15 per domain. The
  detector's keyword tables were written alongside this set, so its figure is
  optimistic.
- MT-Bench turn-1 questions (public, from the replay data), labelled by their
  MT-Bench category: coding -> code, math -> math, every other category ->
  general. Not used to write the rules.
- GSM8K test questions (public, replay data): all math. Not used to write the rules.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections import Counter
from pathlib import Path

os.environ["LITELLM_LOCAL_MODEL_COST_MAP"] = "True"
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from routing.engine.complexity import profile_query  # noqa: E402
from routing.engine.jsonl import read_jsonl  # noqa: E402

MT_BENCH = {range(111, 121): "math", range(121, 131): "code"}


def mt_bench_label(row_id: str) -> str:
    qid = int(row_id.split("-")[1])
    return next((label for ids, label in MT_BENCH.items() if qid in ids), "general")


def score(pairs: list[tuple[str, str]]) -> tuple[float, Counter]:
    confusion: Counter = Counter()
    for truth, guess in pairs:
        confusion[(truth, guess)] += 1
    correct = sum(n for (t, g), n in confusion.items() if t == g)
    return correct / len(pairs), confusion


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data-dir", default=str(ROOT.parent / "shared" / "data"))
    args = parser.parse_args()
    sets: dict[str, list[tuple[str, str]]] = {}
    hand = read_jsonl(ROOT / "bench" / "data" / "domains.jsonl")
    sets["hand-written (90)"] = [(r["domain"], profile_query(r["query"]).domain) for r in hand]
    data = Path(args.data_dir)
    mt = data / "routellm_mt_bench.jsonl"
    if mt.exists():
        rows = read_jsonl(mt)
        sets[f"MT-Bench categories ({len(rows)})"] = [
            (mt_bench_label(r["id"]), profile_query(r["messages"][0]["content"]).domain)
            for r in rows
        ]
    gsm = data / "routellm_gsm8k.jsonl"
    if gsm.exists():
        rows = read_jsonl(gsm)
        sets[f"GSM8K ({len(rows)})"] = [
            ("math", profile_query(r["messages"][0]["content"]).domain) for r in rows
        ]
    print(f"{'labelled set':<28}{'accuracy':>9}   most frequent confusions")
    for name, pairs in sets.items():
        accuracy, confusion = score(pairs)
        wrong = [(f"{t}->{g}", n) for (t, g), n in confusion.most_common() if t != g][:4]
        print(f"{name:<28}{accuracy:>9.1%}   " + ", ".join(f"{k} x{n}" for k, n in wrong))


if __name__ == "__main__":
    main()
