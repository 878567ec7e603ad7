"""Fit the cold-start prior: the quality check's scorer learned on public labelled answers.

    python bench/fit_prior.py FILE.jsonl[:CHEAP,STRONG] ... [--out routing/engine/prior.json]

For every file (replay format; a two-model chain per file, the cheapest and
the most expensive model by default) each cheap draft is labelled against the
strong model's answer as an audit would label it, with the recorded grades
standing in for the judge where extracted answers do not agree. One scorer is
fitted on all of them (shrunk towards the hand-set weights) and written with
its sources; ``routing.engine.learning.prior_scorers`` reads it. A profile's
own audits take over as they accumulate: the prior only sets where its
scorers start.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from pathlib import Path

os.environ["LITELLM_LOCAL_MODEL_COST_MAP"] = "True"
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from routing.engine.agent import CascadeAgent
from routing.engine.audit import extraction_verdict
from routing.engine.calibration import Scorer, fit_scorer
from routing.engine.learning import Verdict
from routing.engine.policy import PRESETS
from routing.engine.resilience import Caller
from routing.engine.signals import Draft
from routing.providers import replay

ROOT = Path(__file__).resolve().parent.parent


async def labelled(path: str, chain: list[str] | None) -> tuple[list[dict], list[float], str]:
    file = replay.ReplayFile.load(path)
    replay.register(file)
    if chain is None:
        by_price = sorted(file.prices, key=lambda m: file.prices[m].get("input_usd_per_mtok", 0))
        chain = [by_price[0], by_price[-1]]
    rows, _ = replay.load_rows(file, chain)
    specs = [file.spec(m) for m in chain]
    agent = CascadeAgent(specs, policy=PRESETS["balanced"], caller=Caller(retries=0))
    observations = await replay.gather_limited(
        replay.observe(agent, r, specs, chain, set()) for r in rows
    )
    graded = any(0 < r.quality(m) < 1 for r in rows for m in chain)
    features, labels = [], []
    for row, observation in zip(rows, observations, strict=True):
        draft, reference = (Draft(row.raw["responses"][m]["text"]) for m in (chain[0], chain[-1]))
        plan = agent.plan(row.messages, {})
        verdict, _ = extraction_verdict(draft, reference, {}, plan.query)
        if verdict is None:
            gap = row.quality(chain[0]) - row.quality(chain[-1])
            tolerance = 0.05 if graded else 0.0
            verdict = Verdict.WORSE if gap < -tolerance else Verdict.AS_GOOD
        step = observation.steps[0]
        if step.hard_fail:
            continue
        features.append(step.features)
        labels.append(1.0 if verdict >= Verdict.AS_GOOD else 0.0)
    return features, labels, f"{Path(path).name}:{chain[0]},{chain[-1]}"


async def main_async(args) -> None:
    features: list[dict] = []
    labels: list[float] = []
    sources = []
    for spec in args.files:
        path, _, chain = spec.partition(":")
        f, y, source = await labelled(path, chain.split(",") if chain else None)
        features += f
        labels += y
        sources.append({"file": source, "drafts": len(y)})
    fitted = fit_scorer(features, labels, prior=Scorer())
    # Signals the public answers never carry (logprobs, self-checks...) keep the hand-set
    # weights: no evidence is not evidence of no effect.
    seen = {name for row in features for name, value in row.items() if value}
    hand = Scorer()
    weights = {f: (w if f in seen else hand.weights.get(f, 0.0)) for f, w in fitted.weights.items()}
    scorer = Scorer(weights=weights, bias=fitted.bias)
    out = {"version": 1, "sources": sources, "drafts": len(labels), "scorer": scorer.to_json()}
    Path(args.out).write_text(json.dumps(out, indent=2, sort_keys=True) + "\n")
    print(f"prior fitted on {len(labels)} drafts from {len(sources)} files -> {args.out}")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("files", nargs="+", help="FILE.jsonl[:CHEAP,STRONG]")
    parser.add_argument("--out", default=str(ROOT / "routing" / "engine" / "prior.json"))
    asyncio.run(main_async(parser.parse_args()))


if __name__ == "__main__":
    main()
