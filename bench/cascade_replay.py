"""Replay benchmark: the real cascade engine on recorded LLM answers.

    python bench/cascade_replay.py FILE.jsonl --chain CHEAP[,MID...],STRONG \
        [--target-retention 0.95] [--preset balanced] [--confidence 0.9] [--json OUT]

Every call goes through ``CascadeAgent`` -> LiteLLM -> the replay provider,
which serves the recorded answers (text, token counts, logprob, self-check
confidence and its cost). The engine is calibrated on ``split == "train"``
(out-of-fold probabilities, thresholds from a bootstrap lower bound on
retention) and reported on ``split == "test"`` beside: always-cheap,
always-strong, the oracle (escalate exactly when the draft is not acceptable),
and the ``cascadeflow`` 1.2.0 package's own acceptance decision on the same
drafts (two-model chains; needs the ``bench`` extra).

Figures (test split): retention = cascade quality / strongest model's quality;
saving = 1 - cascade cost / always-strongest cost, net of every check's cost;
escalation rate = share of queries answered by a model after the first;
AUROC = how well the step-1 acceptance probability separates acceptable
drafts from the rest. A Pareto table sweeps the first step's threshold.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from pathlib import Path
from typing import Any

os.environ["LITELLM_LOCAL_MODEL_COST_MAP"] = "True"
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from routing.engine.agent import (
    CascadeAgent,
)
from routing.engine.calibrate import acceptable
from routing.engine.calibration import auroc, centred
from routing.engine.complexity import profile_query, query_text
from routing.engine.policy import PRESETS, Policy
from routing.engine.resilience import Caller, UpstreamError
from routing.providers import replay


def policy_summary(
    quality: list[float], cost: list[float], escalated: list[bool], ref_q: float, ref_c: float
) -> dict[str, float]:
    n = len(quality)
    return {
        "retention": sum(quality) / ref_q if ref_q else 1.0,
        "saving": 1 - sum(cost) / ref_c if ref_c else 0.0,
        "escalation_rate": sum(escalated) / n if n else 0.0,
        "accuracy": sum(quality) / n if n else 0.0,
        "mean_cost_usd": sum(cost) / n / 1e9 if n else 0.0,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("file")
    parser.add_argument("--chain", required=True, help="comma-separated, cheapest first")
    parser.add_argument("--target-retention", type=float, default=None)
    parser.add_argument("--preset", default="balanced", choices=sorted(PRESETS))
    parser.add_argument(
        "--confidence", type=float, default=0.9, help="of the retention lower bound"
    )
    parser.add_argument("--no-paid", action="store_true", help="never use paid checks")
    parser.add_argument("--json", dest="json_out")
    args = parser.parse_args()
    result = asyncio.run(run(args))
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(result, indent=2) + "\n")


async def run(args) -> dict[str, Any]:
    file = replay.ReplayFile.load(args.file)
    replay.register(file)
    chain = [m.strip() for m in args.chain.split(",") if m.strip()]
    missing = [
        m for m in chain if m not in file.prices and not any(m in r["responses"] for r in file.rows)
    ]
    if missing:
        raise SystemExit(f"Models not in {args.file}: {', '.join(missing)}")
    specs = [file.spec(m) for m in chain]
    base = PRESETS[args.preset]
    target = args.target_retention if args.target_retention is not None else base.target_retention
    policy = Policy(
        **{
            **base.__dict__,
            "target_retention": target,
            "paid_checks": "never" if args.no_paid else base.paid_checks,
            "first_and_last_only": False,
            "direct_when_hard": False,
        }
    )
    calibration, rows, by_id, graded = await replay.calibrate_on_file(
        file,
        specs,
        chain,
        policy=policy,
        target_retention=target,
        confidence=args.confidence,
        allow_paid=not args.no_paid,
    )
    resplit = len({r.raw.get("split") for r in rows}) < 2
    train = [r for r in rows if r.split == "train"]
    test = [r for r in rows if r.split == "test"]
    agent = CascadeAgent(specs, policy=policy, calibration=calibration, caller=Caller(retries=0))

    async def engine_run(row: replay.Row):
        return await agent.run(row.messages, {"metadata": {"replay_id": row.id}})

    results = await replay.gather_limited(engine_run(r) for r in test)

    strongest = chain[-1]
    ref_q = sum(r.quality(strongest) for r in test)
    ref_c = sum(by_id[r.id].steps[-1].cost_nanos for r in test)
    quality = [r.quality(res.model.name) for r, res in zip(test, results, strict=True)]
    cost = [res.cost_nanos for res in results]
    escalated = [res.escalated for res in results]
    first_probs = [
        res.attempts[0].check.probability if res.attempts[0].check else 0.0 for res in results
    ]
    labels = [acceptable(r.quality(chain[0]), r.quality(strongest), graded) > 0.5 for r in test]
    engine = policy_summary(quality, cost, escalated, ref_q, ref_c)
    engine["auroc"] = auroc(first_probs, labels)
    engine["threshold"] = calibration.steps[0].threshold if calibration.steps else None
    engine["paid_mode"] = [s.paid_mode for s in calibration.steps]
    engine["degraded"] = sum(res.degraded for res in results)

    obs = [by_id[r.id] for r in test]
    cheap = policy_summary(
        [o.steps[0].quality for o in obs],
        [o.steps[0].cost_nanos for o in obs],
        [False] * len(obs),
        ref_q,
        ref_c,
    )
    strong = policy_summary(
        [o.steps[-1].quality for o in obs],
        [o.steps[-1].cost_nanos for o in obs],
        [True] * len(obs),
        ref_q,
        ref_c,
    )
    oracle_q, oracle_c, oracle_e = [], [], []
    for o in obs:
        spent = 0
        for index, step in enumerate(o.steps):
            spent += step.cost_nanos
            last = index == len(o.steps) - 1
            if last or acceptable(step.quality, o.steps[-1].quality, graded) > 0.5:
                oracle_q.append(step.quality)
                oracle_c.append(spent)
                oracle_e.append(index > 0)
                break
    oracle = policy_summary(oracle_q, oracle_c, oracle_e, ref_q, ref_c)

    peer: dict[str, Any] = {"available": False}
    import peer_cascadeflow

    if len(chain) >= 2 and peer_cascadeflow.available():
        decider = peer_cascadeflow.PeerCascadeflow(chain[0], strongest)
        pq, pc, pe = [], [], []
        accepted_right, accepted_wrong = [], []
        for r, o in zip(test, obs, strict=True):
            draft = r.raw["responses"][chain[0]]
            ok = decider.accepts(query_text(r.messages), draft["text"], draft.get("logprob"))
            pq.append(o.steps[0].quality if ok else o.steps[-1].quality)
            pc.append(o.steps[0].cost_nanos + (0 if ok else o.steps[-1].cost_nanos))
            pe.append(not ok)
            (
                accepted_right
                if acceptable(o.steps[0].quality, o.steps[-1].quality, graded) > 0.5
                else accepted_wrong
            ).append(ok)
        peer = policy_summary(pq, pc, pe, ref_q, ref_c)
        peer["available"] = True
        peer["accept_rate_when_draft_right"] = sum(accepted_right) / max(len(accepted_right), 1)
        peer["accept_rate_when_draft_wrong"] = sum(accepted_wrong) / max(len(accepted_wrong), 1)

    pareto = pareto_table(obs, calibration, graded, ref_q, ref_c)
    domains = {}
    for r in test:
        d = profile_query(query_text(r.messages)).domain
        domains[d] = domains.get(d, 0) + 1

    result = {
        "file": os.path.basename(args.file),
        "chain": chain,
        "preset": args.preset,
        "target_retention": target,
        "confidence": args.confidence,
        "graded": graded,
        "resplit_60_40": resplit,
        "n_train": len(train),
        "n_test": len(test),
        "engine": engine,
        "always_cheap": cheap,
        "always_strong": strong,
        "oracle": oracle,
        "cascadeflow_1_2_0": peer,
        "pareto": pareto,
        "calibration": calibration.to_json(),
        "test_domains": domains,
    }
    print_report(result)
    return result


def pareto_table(obs, calibration, graded, ref_q, ref_c) -> list[dict[str, float]]:
    """Sweep the first step's threshold; later steps keep their calibrated rules."""
    if not calibration.steps:
        return []
    step0 = calibration.steps[0]
    rows = []
    for o in obs:
        # outcome of escalating from step 0: the calibrated cascade from step 1
        spent = 0
        sub_q = o.steps[-1].quality
        for index in range(1, len(o.steps)):
            spent += o.steps[index].cost_nanos
            if index == len(o.steps) - 1:
                sub_q = o.steps[index].quality
                break
            s = calibration.steps[index]
            scorer = (
                s.paid_scorer
                if s.paid_mode == "always" and o.steps[index].paid_features
                else s.scorer
            )
            feats = (
                o.steps[index].paid_features
                if s.paid_mode == "always" and o.steps[index].paid_features
                else o.steps[index].features
            )
            if s.paid_mode == "always":
                spent += o.steps[index].paid_cost_nanos
            p = (
                -1.0
                if o.steps[index].hard_fail
                else scorer.probability(feats) - o.steps[index].margin
            )
            if p >= (s.threshold or 0.5):
                sub_q = o.steps[index].quality
                break
        use_paid = step0.paid_mode == "always" and o.steps[0].paid_features is not None
        scorer = step0.paid_scorer if use_paid else step0.scorer
        feats = o.steps[0].paid_features if use_paid else o.steps[0].features
        p0 = -1.0 if o.steps[0].hard_fail else scorer.probability(feats) - o.steps[0].margin
        draft_cost = o.steps[0].cost_nanos + (o.steps[0].paid_cost_nanos if use_paid else 0)
        rows.append((p0, o.steps[0].quality, draft_cost, sub_q, spent))
    table = []
    for t in [x / 20 for x in range(0, 21)]:
        q = c = e = 0.0
        for p0, dq, dc, sq, sc in rows:
            c += dc
            if p0 >= t:
                q += dq
            else:
                q += sq
                c += sc
                e += 1
        table.append(
            {
                "threshold": t,
                "retention": q / ref_q if ref_q else 1.0,
                "saving": 1 - c / ref_c if ref_c else 0.0,
                "escalation_rate": e / len(rows) if rows else 0.0,
            }
        )
    return table


def print_report(r: dict[str, Any]) -> None:
    print(
        f"\n{r['file']}  chain: {' -> '.join(r['chain'])}  preset: {r['preset']}  "
        f"target retention {r['target_retention']:.0%} (lower bound at {r['confidence']:.0%} confidence)"
    )
    print(
        f"train {r['n_train']} / test {r['n_test']} rows{' (re-split 60/40)' if r['resplit_60_40'] else ''}"
        f"{', graded scores' if r['graded'] else ''}\n"
    )
    print(
        f"{'policy (test split)':<24}{'retention':>10}{'saving':>9}{'escalated':>11}{'accuracy':>10}{'AUROC':>8}"
    )
    rows = [
        ("CascadeFlow engine", r["engine"]),
        ("always cheap", r["always_cheap"]),
        ("always strong", r["always_strong"]),
        ("oracle", r["oracle"]),
    ]
    if r["cascadeflow_1_2_0"].get("available"):
        rows.append(("cascadeflow 1.2.0", r["cascadeflow_1_2_0"]))
    for name, s in rows:
        area = s.get("auroc")
        print(
            f"{name:<24}{s['retention']:>10.1%}{s['saving']:>9.1%}{s['escalation_rate']:>11.1%}"
            f"{s['accuracy']:>10.3f}{(f'{area:.3f}' if area is not None else '-'):>8}"
        )
    if not r["cascadeflow_1_2_0"].get("available"):
        print("cascadeflow 1.2.0: not installed (pip install the 'bench' extra) or chain too short")
    step_stats = [s["stats"] for s in r["calibration"]["steps"]]
    for i, s in enumerate(step_stats):
        print(
            f"\nstep {i + 1} calibration (train, out-of-fold): threshold {r['calibration']['steps'][i]['threshold']:.3f} "
            f"mode {r['calibration']['steps'][i]['paid_mode']}, retention {s['train_retention']:.1%} "
            f"(lower bound {s['train_retention_lower_bound']:.1%}), saving {s['train_saving']:.1%}, "
            f"AUROC {s['auroc']}"
        )
    print("\nPareto (test, first-step threshold swept):")
    print(f"{'threshold':>10}{'retention':>11}{'saving':>9}{'escalated':>11}")
    for p in r["pareto"]:
        print(
            f"{p['threshold']:>10.2f}{p['retention']:>11.1%}{p['saving']:>9.1%}{p['escalation_rate']:>11.1%}"
        )
    print(
        f"\nengine on test: retention {r['engine']['retention']:.1%}, saving {r['engine']['saving']:.1%}, "
        f"escalation {r['engine']['escalation_rate']:.1%}, AUROC {r['engine']['auroc']}"
    )


if __name__ == "__main__":
    main()


__all__ = ["UpstreamError", "centred"]
