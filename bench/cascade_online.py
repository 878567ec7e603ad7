"""Online benchmark: a brand-new profile learns from live traffic, audits as in production.

    python bench/cascade_online.py FILE.jsonl --chain CHEAP[,MID...],STRONG \
        [--audit-rate-floor 0.03] [--audit-cap 0.1] [--seed 0] [--judge-error 0.1] \
        [--target-retention 0.95] [--prior public|hand] [--no-route] \
        [--confidence 0.9] [--refit-every 25] [--requests N] [--explain] [--json OUT]

Every row of a replay file (both splits), in a seeded random order, is one
request through the real engine (``CascadeAgent`` -> LiteLLM -> the replay
provider), for a profile that starts with no calibration. Audits run as in
production (``routing.engine.learning``, ``routing.engine.audit``):

- a uniform share of requests is audited (every one while labels are few and
  still pay for themselves, then ``--audit-rate-floor``; ``learning.settled``),
  within an audit budget (``--audit-cap``, a
  share of what the traffic so far would cost on the reference model, as a
  tenant's monthly cap bounds it); an audit asks every chain model that did not
  answer (the reference included; it costs what the file says it costs) and
  labels each draft against the reference's answer with the production
  labeller: agreement of the extracted answers is "as good"; a disagreement,
  or answers with nothing to compare, go to the judge, modelled by the file's
  recorded grades (worse / as good / better than the reference, 0.05 apart
  for graded scores) replaced by a wrong verdict at ``--judge-error``, and
  charged two calls at the reference model's price;
- requests that escalated anyway are labelled by agreement alone, for
  training only; a request whose draft was served keeps its drafts' checks,
  unlabelled, for the router (``routing.audits``: *router rows*; here every
  such request, where production takes one in ten past 2,000);
- every ``--refit-every`` requests the profile is refitted and the new
  calibration promoted if its bound holds (``learning.refit``).

Retention is always scored against the file's ground truth (``correct``),
never against the audits' labels. Saving is net of every draft, audit and
judge call. Printed per window of 200 requests, and for the whole stream and
its second half (the steady state); ``--json`` has ``retention``, ``saving``,
``steady_retention``, ``steady_saving``, ``audits``, ``audit_cost_share`` and
``routed_past_draft`` (fractions), and the history of promotions.

Beside it, in the same run, for context: the best single threshold of the
final scorers picked in hindsight on the whole stream (the most saving at the
target), which no online method can know in advance.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

os.environ["LITELLM_LOCAL_MODEL_COST_MAP"] = "True"
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from routing.engine import learning
from routing.engine.agent import CascadeAgent, draft_params, draft_signals
from routing.engine.agent import _draft_of as draft_of
from routing.engine.audit import extraction_verdict, judge_cost_tokens
from routing.engine.calibration import Scorer
from routing.engine.learning import Observation, StepLabel, Verdict
from routing.engine.policy import PRESETS, Policy
from routing.engine.resilience import Caller
from routing.providers import replay

WINDOW = 200


@dataclass
class Served:
    quality: float
    reference_quality: float
    cost: int  # the request's own calls
    reference_cost: int  # what the strongest model alone would have cost
    audit_cost: int
    escalated: bool
    audited: bool
    routed: bool


def simulated_judge(draft_q: float, reference_q: float, graded: bool, rng, error: float) -> Verdict:
    tolerance = 0.05 if graded else 0.0
    if draft_q > reference_q + tolerance:
        verdict = Verdict.BETTER
    elif draft_q < reference_q - tolerance:
        verdict = Verdict.WORSE
    else:
        verdict = Verdict.AS_GOOD
    if rng.random() < error:
        verdict = rng.choice([v for v in Verdict if v != verdict])
    return verdict


async def run(args) -> dict[str, Any]:
    file = replay.ReplayFile.load(args.file)
    replay.register(file)
    chain = [m.strip() for m in args.chain.split(",") if m.strip()]
    rows, _ = replay.load_rows(file, chain)
    if not rows:
        raise SystemExit(f"No row of {args.file} has answers from every model of the chain.")
    specs = [file.spec(m) for m in chain]
    graded = any(0 < r.quality(m) < 1 for r in rows for m in chain)
    base = PRESETS["balanced"]
    policy = Policy(
        **{
            **base.__dict__,
            "target_retention": args.target_retention,
            "paid_checks": "never",
            "first_and_last_only": False,
            "direct_when_hard": False,
        }
    )
    # The cold-start prior is fitted on public labelled answers; a file it was fitted on is
    # scored with the hand-set weights instead, so no figure rests on its own rows.
    _, sources = learning.public_prior()
    held_back = Path(args.file).name in sources
    priors = (
        tuple(Scorer() for _ in specs[:-1])
        if held_back or args.prior == "hand"
        else learning.prior_scorers(len(specs))
    )
    agent = CascadeAgent(
        specs,
        policy=policy,
        calibration=learning.cold_start_calibration(len(specs), priors),
        caller=Caller(retries=0),
    )
    rng = random.Random(args.seed)
    if args.requests:
        # A longer stream than the file: each request drawn from its rows with replacement
        # (a tenant whose traffic follows the file's distribution, for longer).
        order = [rng.choice(rows) for _ in range(args.requests)]
    else:
        order = list(rows)
        rng.shuffle(order)
    prices = {m: file.prices.get(m) or {} for m in chain}
    observations: list[Observation] = []
    served: list[Served] = []
    promotions: list[dict[str, Any]] = []
    uniform_labels = 0

    async def answer(spec, row) -> tuple[Any, int]:
        params = draft_params(spec, {"metadata": {"replay_id": row.id}})
        response, attempt = await agent.caller.complete(
            spec, {**params, "messages": row.messages}, [], role="draft"
        )
        return response, attempt.cost_nanos

    for index, row in enumerate(order):
        result = await agent.run(row.messages, {"metadata": {"replay_id": row.id}})
        plan = agent.plan(row.messages, {"metadata": {"replay_id": row.id}})
        answered = result.model.name
        cost = result.cost_nanos
        reference_cost = replay.answer_cost_nanos(
            row.raw["responses"][chain[-1]], prices[chain[-1]]
        )
        # The features each draft was judged on when it was served (None: not judged).
        outputs = {
            a.model: (dict(a.check.features), a.check.hard_fail is not None) if a.check else None
            for a in result.attempts
            if a.status == "ok" and a.role in {"draft", "final"}
        }
        # The audit budget (a tenant's monthly cap, here a share of the traffic's cost so far)
        # depends on past requests only: the sample stays uniform.
        spent_on_audits = sum(s.audit_cost for s in served)
        baseline_so_far = sum(s.reference_cost for s in served) + reference_cost
        audited = (
            spent_on_audits < args.audit_cap * baseline_so_far
            and rng.random()
            < learning.audit_rate(
                uniform_labels,
                floor=args.audit_rate_floor,
                warm=args.warm,
                settled=learning.settled(agent.calibration.meta),
            )
        )
        audit_cost = 0
        if audited or answered == chain[-1]:
            # The chain's answers to this request: produced already, or asked now (audits).
            responses: dict[str, tuple[Any, int]] = {}
            for spec in specs:
                if spec.name in outputs:
                    responses[spec.name] = await answer(spec, row)  # replayed: same answer, free
                    responses[spec.name] = (responses[spec.name][0], 0)
                elif audited:
                    responses[spec.name] = await answer(spec, row)
                    audit_cost += responses[spec.name][1]
            if chain[-1] in responses:
                reference = draft_of(responses[chain[-1]][0])
                steps = []
                for spec in specs[:-1]:
                    if spec.name not in responses:
                        steps.append(StepLabel({}, None))
                        continue
                    draft = draft_of(responses[spec.name][0])
                    if outputs.get(spec.name):
                        features, hard_fail = outputs[spec.name]
                    else:  # asked by the audit: the same signals the check would compute
                        report = draft_signals(responses[spec.name][0], plan.query, {})
                        features, hard_fail = report.features, report.hard_fail is not None
                    verdict, comparable = extraction_verdict(draft, reference, {}, plan.query)
                    if verdict is None and audited:
                        verdict = simulated_judge(
                            row.quality(spec.name),
                            row.quality(chain[-1]),
                            graded,
                            rng,
                            args.judge_error,
                        )
                        tokens = judge_cost_tokens(row.messages, draft.content, reference.content)
                        judge_price = prices[chain[-1]]
                        audit_cost += 2 * int(
                            tokens * float(judge_price.get("input_usd_per_mtok", 0)) * 1000
                            + 2 * float(judge_price.get("output_usd_per_mtok", 0)) * 1000
                        )
                    elif verdict is None and comparable:
                        verdict = Verdict.WORSE  # escalated anyway, no judge: disagreement
                    steps.append(
                        StepLabel(
                            features,
                            verdict,
                            hard_fail,
                            replay.answer_cost_nanos(
                                row.raw["responses"][spec.name], prices[spec.name]
                            ),
                        )
                    )
                next_costs = tuple(
                    replay.answer_cost_nanos(row.raw["responses"][m], prices[m]) for m in chain[1:]
                )
                # Labelled, or (nothing to compare) a router row: the router learns from both.
                if audited or any(s.features or s.hard_fail for s in steps):
                    observations.append(
                        Observation(
                            key=f"{args.seed}:{row.id}" + (f":{index}" if args.requests else ""),
                            steps=tuple(steps),
                            pre=learning.pre_features(plan.query),
                            reference_cost_nanos=reference_cost,
                            next_cost_nanos=next_costs,
                            uniform=audited,
                        )
                    )
                    uniform_labels += audited
        elif outputs.get(chain[0]):
            # A served draft, not audited: no label, but what the router learns from (the
            # draft's score), so that its rows are not only the drafts that escalated.
            observations.append(
                Observation(
                    key=f"{args.seed}:{row.id}" + (f":{index}" if args.requests else ""),
                    steps=tuple(
                        StepLabel(
                            outputs[s.name][0],
                            None,
                            outputs[s.name][1],
                            replay.answer_cost_nanos(row.raw["responses"][s.name], prices[s.name]),
                        )
                        if outputs.get(s.name)
                        else StepLabel({}, None)
                        for s in specs[:-1]
                    ),
                    pre=learning.pre_features(plan.query),
                    reference_cost_nanos=0,
                    next_cost_nanos=(),
                    uniform=False,
                )
            )
        served.append(
            Served(
                quality=row.quality(answered),
                reference_quality=row.quality(chain[-1]),
                cost=cost,
                reference_cost=reference_cost,
                audit_cost=audit_cost,
                escalated=answered != chain[0],
                audited=audited,
                routed=result.routed_past_draft,
            )
        )
        if (index + 1) % args.refit_every == 0:
            refit = learning.refit(
                observations,
                chain_length=len(chain),
                target_retention=args.target_retention,
                confidence=args.confidence,
                priors=priors,
                route=not args.no_route,
                economics=economics(served),
            )
            agent.calibration = refit.rule.calibration(refit.evidence)
            if refit.certified:
                promotions.append({"after": index + 1, **refit.evidence})
    args.prior_used = "hand-set" if held_back or args.prior == "hand" else "public"
    scorers = [step.scorer for step in agent.calibration.steps]
    best = await hindsight(agent, rows, specs, chain, prices, scorers, args.target_retention)
    labels = sum(learning.labelled(o) for o in observations)
    result = summarise(args, chain, served, promotions, labels, len(observations) - labels, best)
    if args.explain:
        result["sequences"] = explain(args, observations, len(chain), priors)
    return result


def explain(args, observations, chain_length: int, priors) -> dict[str, list[dict[str, Any]]]:
    """The last refit's two fixed sequences over every label of the stream, each candidate
    as the exact test sees it, past the first failure too: where the certified rule
    stopped, and why."""
    budget = 1 - args.target_retention
    tables = {}
    for family in learning.families(
        observations, chain_length=chain_length, confidence=args.confidence, priors=priors
    ):
        rows = learning.sequence(family, budget=budget, route=not args.no_route)
        tables[family.name] = rows
        print(
            f"\n{family.name} family: {len(family.test)} test labels, tested at "
            f"{family.level:.3f} (budget {budget:.0%} net loss)"
        )
        print("    threshold  acceptance  worse  better    loss  p-value")
        for row in rows:
            mark = "" if row["passes"] else "  fails"
            if row["passes"] and not row["reached"]:
                mark = "  passes, not reached"
            print(
                f"    {row['threshold']:9.4f}  {row['acceptance']:10.1%}  {row['worse']:5d}  "
                f"{row['better']:6d}  {row['loss']:6.1%}  {row['p_value']:7.3f}{mark}"
            )
    return tables


def economics(served: list[Served], recent: int = 100) -> learning.Economics:
    """As production weighs a label (``routing.selectors.audit_economics``, which takes a
    month of the profile's traffic as the horizon): here the stream so far stands in for
    it (as much again to come), and a label's cost is that of the latest audits, over what
    the reference costs on an average request."""
    audits = [s.audit_cost for s in served if s.audited][-recent:]
    reference = sum(s.reference_cost for s in served) / max(len(served), 1)
    cost = sum(audits) / len(audits) / reference if audits and reference else 1.0
    return learning.Economics(horizon=len(served), label_cost=cost)


async def hindsight(agent, rows, specs, chain, prices, scorers, target) -> dict[str, float]:
    """The final scorers' best single threshold, picked knowing every answer's grade: the most
    saving whose retention on the whole stream meets the target (no online method can know it)."""
    observed = await replay.gather_limited(
        replay.observe(agent, r, specs, chain, set()) for r in rows
    )
    probabilities = [
        [
            -1.0 if step.hard_fail else scorers[i].probability(step.features)
            for i, step in enumerate(o.steps[:-1])
        ]
        for o in observed
    ]
    best = {"threshold": None, "retention": 1.0, "saving": 0.0}
    candidates = sorted({round(p, 4) for ps in probabilities for p in ps if p >= 0})
    reference_q = sum(r.quality(chain[-1]) for r in rows)
    reference_c = sum(o.steps[-1].cost_nanos for o in observed)
    for threshold in candidates[:: max(1, len(candidates) // 200)]:
        quality = cost = 0.0
        for row, o, ps in zip(rows, observed, probabilities, strict=True):
            served = next((i for i, p in enumerate(ps) if p >= threshold), len(chain) - 1)
            quality += row.quality(chain[served])
            cost += sum(step.cost_nanos for step in o.steps[: served + 1])
        retention, saving = quality / reference_q, 1 - cost / reference_c
        if retention >= target and saving > best["saving"]:
            best = {"threshold": threshold, "retention": retention, "saving": saving}
    return best


def figures(rows: list[Served]) -> dict[str, float]:
    quality = sum(r.quality for r in rows)
    reference = sum(r.reference_quality for r in rows)
    spent = sum(r.cost + r.audit_cost for r in rows)
    baseline = sum(r.reference_cost for r in rows)
    n = len(rows)
    return {
        "retention": quality / reference if reference else 1.0,
        "saving": 1 - spent / baseline if baseline else 0.0,
        "escalation": sum(r.escalated for r in rows) / n,
        "audit_rate": sum(r.audited for r in rows) / n,
        "audit_cost_share": sum(r.audit_cost for r in rows) / baseline if baseline else 0.0,
        "routed_past_draft": sum(r.routed for r in rows) / n,
    }


def summarise(args, chain, served, promotions, labels, router_rows, best) -> dict[str, Any]:
    print(f"\n{Path(args.file).name}  chain: {' -> '.join(chain)}  seed {args.seed}")
    print(
        f"target retention {args.target_retention:.0%} at {args.confidence:.0%} confidence, "
        f"audit floor {args.audit_rate_floor:.0%}, cap {args.audit_cap:.0%}, "
        f"judge error {args.judge_error:.0%}, "
        f"{len(served)} requests, {args.prior_used} prior"
    )
    header = f"{'requests':>12} {'retention':>10} {'saving':>8} {'escalated':>10} {'audited':>8} {'routed':>7}"
    print(header)
    for start in range(0, len(served), WINDOW):
        window = figures(served[start : start + WINDOW])
        label = f"{start + 1}-{min(start + WINDOW, len(served))}"
        print(
            f"{label:>12} {window['retention']:>10.1%} {window['saving']:>8.1%} "
            f"{window['escalation']:>10.1%} {window['audit_rate']:>8.1%} "
            f"{window['routed_past_draft']:>7.1%}"
        )
    whole = figures(served)
    steady = figures(served[len(served) // 2 :])
    print(
        f"\nwhole stream: retention {whole['retention']:.1%}, net saving {whole['saving']:.1%} "
        f"(audits {whole['audit_cost_share']:.1%} of the baseline), "
        f"escalated {whole['escalation']:.1%}, routed past the draft {whole['routed_past_draft']:.1%}"
    )
    print(
        f"second half:  retention {steady['retention']:.1%}, net saving {steady['saving']:.1%} "
        f"(audits {steady['audit_cost_share']:.1%}), escalated {steady['escalation']:.1%}"
    )
    first = promotions[0]["after"] if promotions else None
    last = promotions[-1] if promotions else {}
    print(
        f"labels {labels} ({sum(s.audited for s in served)} audits), router rows {router_rows}; "
        f"first certified after "
        f"{first} requests; last: threshold {last.get('threshold')}, held-out loss "
        f"{last.get('held_out_loss')} (upper bound {last.get('held_out_loss_upper_bound')})"
    )
    print(
        f"in hindsight, the final scorers' best single threshold ({best['threshold']}) would "
        f"keep {best['retention']:.1%} and save {best['saving']:.1%} (no audits, no cold start)"
    )
    return {
        "hindsight": best,
        "file": Path(args.file).name,
        "chain": chain,
        "seed": args.seed,
        "requests": len(served),
        "retention": whole["retention"],
        "saving": whole["saving"],
        "steady_retention": steady["retention"],
        "steady_saving": steady["saving"],
        "audits": sum(s.audited for s in served),
        "audit_cost_share": whole["audit_cost_share"],
        "steady_audit_cost_share": steady["audit_cost_share"],
        "routed_past_draft": whole["routed_past_draft"],
        "escalation": whole["escalation"],
        "labels": labels,
        "router_rows": router_rows,
        "prior": args.prior_used,
        "promotions": promotions,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("file")
    parser.add_argument("--chain", required=True, help="comma-separated, cheapest first")
    parser.add_argument("--audit-rate-floor", type=float, default=0.03)
    parser.add_argument("--warm", type=int, default=400, help="audit everything until this many")
    parser.add_argument(
        "--audit-cap",
        type=float,
        default=0.1,
        help="audit spend cap, as a share of what the traffic so far would cost on the reference",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--judge-error", type=float, default=0.1)
    parser.add_argument("--target-retention", type=float, default=0.95)
    parser.add_argument("--confidence", type=float, default=0.9)
    parser.add_argument("--refit-every", type=int, default=25)
    parser.add_argument("--no-route", action="store_true", help="never route past the draft")
    parser.add_argument(
        "--prior",
        choices=["public", "hand"],
        default="public",
        help="cold-start scorers: fitted on public data (never on this file), or hand-set",
    )
    parser.add_argument(
        "--requests",
        type=int,
        help="stream this many requests, each drawn from the file's rows with replacement "
        "(default: every row once)",
    )
    parser.add_argument(
        "--explain",
        action="store_true",
        help="print (and add to --json) the last refit's fixed sequences, every candidate",
    )
    parser.add_argument("--json", dest="json_out")
    args = parser.parse_args()
    result = asyncio.run(run(args))
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
