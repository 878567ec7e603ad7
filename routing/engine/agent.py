"""The cascade: draft with the cheapest capable model, check, escalate only when needed.

``CascadeAgent`` runs one request through an ordered chain of ``ModelSpec``
(cheapest first, any length). Every draft but the last model's is judged:
free signals (``signals``), optionally paid ones (self-verification by a cheap
model, agreement between k cheap samples), combined by a calibrated
``Scorer`` into the probability that the draft is acceptable, compared with a
threshold that depends on the step, the preset and the query's domain.
Accepted: returned. Rejected: the next model answers.

Provider failures fall back to the next deployment, then to the next model; if
the strongest model fails after a draft was rejected, the best rejected draft
is returned (``degraded``) rather than an error. A request fails only when no
model could answer at all.

No Django here: the gateway, tests and benchmarks drive the same class.
"""

from __future__ import annotations

import asyncio
import re
import time
import uuid
from collections.abc import AsyncGenerator, Awaitable, Callable, Coroutine, Sequence
from dataclasses import dataclass, field
from operator import attrgetter
from typing import Any, TypeVar

from routing.engine import signals, tracing
from routing.engine.calibration import Scorer
from routing.engine.complexity import QueryProfile, profile_query, query_text
from routing.engine.learning import pre_features
from routing.engine.openai_wire import FLAT_LOGPROBS
from routing.engine.policy import PRESETS, Calibration, Policy, StepCalibration
from routing.engine.pricing import reported_tokens
from routing.engine.resilience import (
    Caller,
    Stream,
    UpstreamError,
    counted_off_loop,
    counted_tokens,
)
from routing.engine.types import (
    Attempt,
    CascadeResult,
    Check,
    Message,
    ModelSpec,
    PaidCheck,
    check_reasons,
)

VERIFY_SYSTEM_PROMPT = (
    "You check answers. Reply with only a number between 0 and 1: the probability that the "
    "answer below is correct and complete."
)
_PROBABILITY = re.compile(r"(\d*\.\d+|\d+)\s*(%?)")
_LOGPROB = attrgetter("logprob")

_Answer = TypeVar("_Answer")  # what a walk of the chain delivers: a result or a stream


@dataclass(frozen=True)
class Route:
    """A chain (and its calibration) for queries of one domain."""

    chain: tuple[ModelSpec, ...]
    calibration: Calibration | None = None
    threshold_offset: float = 0.0


@dataclass
class Plan:
    query: QueryProfile
    chain: tuple[ModelSpec, ...]
    calibration: Calibration
    offset: float
    full_chain: tuple[ModelSpec, ...]  # the route's chain before any shortening
    strongest: ModelSpec  # the baseline: the strongest model of the route's full chain
    routed_past_draft: bool = False  # the calibration's router skipped the first model


def _draft_of(response: Any) -> signals.Draft:
    choice = response.choices[0]
    message = choice.message
    tool_calls = []
    for call in getattr(message, "tool_calls", None) or []:
        function = getattr(call, "function", None)  # an upstream may send a call without one
        tool_calls.append(
            {
                "id": getattr(call, "id", None),
                "type": "function",
                "function": {
                    "name": getattr(function, "name", None),
                    "arguments": getattr(function, "arguments", None),
                },
            }
        )
    token_logprobs: Sequence[float] | None = None
    logprobs = getattr(choice, "logprobs", None)
    content_lp = getattr(logprobs, "content", None) if logprobs is not None else None
    if content_lp is None and isinstance(logprobs, dict):
        content_lp = logprobs.get("content")
    if content_lp:
        # Kept as one array of floats when the OpenAI-wire client parsed the response
        # (``openai_wire.parse_completion``), for these very entries.
        hidden = getattr(response, "_hidden_params", None)
        kept = hidden.get(FLAT_LOGPROBS) if type(hidden) is dict else None
        if kept is not None and kept[0] is content_lp and len(kept[1]) == len(content_lp):
            token_logprobs = kept[1]
        # Entries are parsed JSON: dicts, or LiteLLM's objects. Without a Python step per
        # entry (one per token of the draft) when none is a dict.
        elif any(issubclass(kind, dict) for kind in set(map(type, content_lp))):
            token_logprobs = [
                float(t["logprob"] if isinstance(t, dict) else t.logprob) for t in content_lp
            ]
        else:
            token_logprobs = list(map(float, map(_LOGPROB, content_lp)))
    usage = getattr(response, "usage", None)
    return signals.Draft(
        content=message.content or "",
        finish_reason=choice.finish_reason,
        tool_calls=tool_calls,
        token_logprobs=token_logprobs,
        completion_tokens=int(getattr(usage, "completion_tokens", 0) or 0),
    )


class CascadeAgent:
    def __init__(
        self,
        chain: Sequence[ModelSpec],
        *,
        policy: str | Policy = "balanced",
        calibration: Calibration | None = None,
        caller: Caller | None = None,
        verifier: ModelSpec | None = None,
        domain_routes: dict[str, Route] | None = None,
        profile: str = "",
    ):
        if not chain:
            raise ValueError("A cascade needs at least one model.")
        self.chain = tuple(chain)
        self.policy = PRESETS[policy] if isinstance(policy, str) else policy
        self.calibration = calibration or Calibration()
        self.caller = caller or Caller()
        self.verifier = verifier or self.chain[0]
        self.domain_routes = domain_routes or {}
        self.profile = profile
        # The upstream calls of the latest run or stream, kept even when it raises:
        # what was paid for is recorded whatever happens next.
        self.attempts: list[Attempt] = []

    # --- planning ----------------------------------------------------------------

    def plan(self, messages: list[Message], params: dict[str, Any]) -> Plan:
        if len(self.chain) == 1 and not self.domain_routes:
            return Plan(
                QueryProfile.unjudged(),
                self.chain,
                self.calibration,
                0.0,
                self.chain,
                self.chain[0],
            )
        query = profile_query(query_text(messages))
        route = self.domain_routes.get(query.domain)
        chain = route.chain if route else self.chain
        calibration = (
            route.calibration if route and route.calibration else None
        ) or self.calibration
        offset = route.threshold_offset if route else 0.0
        full_chain = chain
        strongest = chain[-1]
        if params.get("tools"):
            chain = tuple(m for m in chain if m.supports_tools) or chain
        if (params.get("n") or 1) > 1:
            chain = chain[-1:]  # several choices cannot be judged as one draft
        elif self.policy.direct_when_hard and query.band == "hard":
            chain = chain[-1:]
        elif self.policy.first_and_last_only and len(chain) > 2:
            chain = (chain[0], chain[-1])
        routed = False
        router = calibration.router
        if router is not None and len(chain) > 1 and chain[0] is full_chain[0]:
            if router.skips(pre_features(query)):
                # Its draft would most likely be thrown away.
                chain, routed = chain[min(router.skip_to, len(chain) - 1) :], True
        return Plan(query, chain, calibration, offset, full_chain, strongest, routed)

    @staticmethod
    def _step_index(plan: Plan, spec: ModelSpec) -> int:
        names = [m.name for m in plan.full_chain]
        return names.index(spec.name) if spec.name in names else 0

    # --- judging -------------------------------------------------------------------

    async def judge(
        self,
        *,
        plan: Plan,
        spec: ModelSpec,
        response: Any,
        messages: list[Message],
        params: dict[str, Any],
    ) -> Check:
        """Decide whether ``response`` (a draft of ``spec``) is good enough to return."""
        with tracing.span("quality check", {"gen_ai.request.model": spec.name}) as span:
            check = await self._judge(plan, spec, response, messages, params)
            if span.is_recording():
                span.set_attributes(
                    {
                        "cascadeflow.check.score": check.probability,
                        "cascadeflow.check.threshold": check.threshold,
                        "cascadeflow.check.accepted": check.accepted,
                        "cascadeflow.check.hard_fail": check.hard_fail or "",
                        "cascadeflow.domain": plan.query.domain,
                    }
                )
            return check

    async def _judge(
        self,
        plan: Plan,
        spec: ModelSpec,
        response: Any,
        messages: list[Message],
        params: dict[str, Any],
    ) -> Check:
        step: StepCalibration = plan.calibration.step(self._step_index(plan, spec))
        draft = _draft_of(response)
        report = signals.extract(draft, plan.query, params)
        features = dict(report.features)
        # A calibration learned from audits measured each domain's risk: no blanket margin.
        learned = bool(plan.calibration.meta.get("learned"))
        margin = (0.0 if learned else self.policy.margin(plan.query.domain)) + plan.offset
        base = step.threshold if step.threshold is not None else self.policy.default_threshold
        scorer: Scorer = step.scorer
        probability, contributions = scorer.assess(features)
        threshold = base + margin
        paid: list[PaidCheck] = []

        mode = {"never": "free", "always": "always"}.get(self.policy.paid_checks, step.paid_mode)
        if report.hard_fail is None and (
            mode == "always" or (mode == "band" and step.band_low <= probability < step.band_high)
        ):
            kinds = step.paid_kinds or ("self_verify",)
            paid = await self._paid_checks(kinds, plan, spec, messages, params, draft, report)
            for check in paid:
                if check.value is None:
                    continue
                if check.kind == "self_verify":
                    features["has_verify"], features["verify_p"] = 1.0, check.value
                elif check.kind == "agreement":
                    features["has_agree"], features["agree"] = 1.0, check.value
            scorer = step.paid_scorer or Scorer()
            probability, contributions = scorer.assess(features)
            paid_base = step.paid_threshold if step.paid_threshold is not None else base
            threshold = paid_base + margin
        elif mode == "band" and probability >= step.band_high:
            threshold = min(threshold, probability)

        accepted = report.hard_fail is None and probability >= threshold
        # The reasons are worded from the numbers the check keeps (the ledger derives them
        # again from what it stores: routing.ledger_attempts).
        probability, threshold = round(probability, 4), round(threshold, 4)
        reasons = check_reasons(
            probability=probability,
            threshold=threshold,
            accepted=accepted,
            contributions=contributions,
            hard_fail=report.hard_fail,
            notes=list(report.notes),
            domain=plan.query.domain,
            complexity=round(plan.query.complexity, 4),
        )
        return Check(
            probability=probability,
            threshold=threshold,
            accepted=accepted,
            features={k: round(v, 4) for k, v in features.items() if v},
            contributions=contributions,
            reasons=reasons,
            hard_fail=report.hard_fail,
            paid=paid,
        )

    async def _paid_checks(
        self,
        kinds: tuple[str, ...],
        plan: Plan,
        spec: ModelSpec,
        messages: list[Message],
        params: dict[str, Any],
        draft: signals.Draft,
        report: signals.SignalReport,
    ) -> list[PaidCheck]:
        tasks: list[Coroutine[Any, Any, PaidCheck]] = []
        if "self_verify" in kinds:
            tasks.append(self._self_verify(messages, draft))
        if "agreement" in kinds and not draft.tool_calls:
            tasks.append(self._agreement(spec, messages, params, report.answer))
        return list(await asyncio.gather(*tasks))

    async def _self_verify(self, messages: list[Message], draft: signals.Draft) -> PaidCheck:
        question = query_text(messages)
        verify_messages = [
            {"role": "system", "content": VERIFY_SYSTEM_PROMPT},
            {
                "role": "user",
                "content": f"Question:\n{question}\n\nAnswer:\n{draft.content}\n\n"
                "Probability that the answer is correct:",
            },
        ]
        attempts: list[Attempt] = []
        try:
            response, attempt = await self.caller.complete(
                self.verifier,
                {"messages": verify_messages, "max_tokens": 8, "temperature": 0},
                attempts,
                role="verify",
            )
        except UpstreamError as exc:
            return PaidCheck("self_verify", self.verifier.name, None, 0, detail=str(exc)[:200])
        text = response.choices[0].message.content or ""
        return PaidCheck(
            "self_verify",
            self.verifier.name,
            parse_probability(text),
            attempt.cost_nanos,
            attempt.prompt_tokens,
            attempt.completion_tokens,
            detail=text.strip()[:40],
        )

    async def _agreement(
        self, spec: ModelSpec, messages: list[Message], params: dict[str, Any], answer: str | None
    ) -> PaidCheck:
        k = self.policy.agreement_samples
        kwargs = {**draft_params(spec, params), "messages": messages, "temperature": 0.8}
        kwargs.pop("logprobs", None)
        kwargs.pop("top_logprobs", None)

        async def sample(i: int) -> tuple[Any, Attempt] | None:
            attempts: list[Attempt] = []
            try:
                return await self.caller.complete(
                    spec, {**kwargs, "seed": 1000 + i}, attempts, role="sample"
                )
            except UpstreamError:
                return None

        results = [r for r in await asyncio.gather(*(sample(i) for i in range(k))) if r]
        if not results:
            return PaidCheck("agreement", spec.name, None, 0, detail="no sample answered")
        target = signals.normalise_answer(answer)
        same = 0
        for response, _ in results:
            other = signals.extract(
                _draft_of(response), profile_query(query_text(messages)), params
            )
            same += signals.normalise_answer(other.answer) == target
        return PaidCheck(
            "agreement",
            spec.name,
            same / len(results),
            sum(a.cost_nanos for _, a in results),
            sum(a.prompt_tokens for _, a in results),
            sum(a.completion_tokens for _, a in results),
            detail=f"{same}/{len(results)} samples agree",
        )

    # --- running ---------------------------------------------------------------------

    async def run(self, messages: list[Message], params: dict[str, Any]) -> CascadeResult:
        async def answer(
            plan: Plan,
            spec: ModelSpec,
            kwargs: dict[str, Any],
            attempts: list[Attempt],
            escalated: bool,
        ) -> CascadeResult:
            response, attempt = await self.caller.complete(spec, kwargs, attempts, role="final")
            attempt.decision = "returned"
            return self._result(plan, response, spec, attempts, params, escalated=escalated)

        def judged(plan: Plan, attempts: list[Attempt], result: CascadeResult) -> CascadeResult:
            return result

        return await self._walk(messages, params, answer, judged)

    async def _walk(
        self,
        messages: list[Message],
        params: dict[str, Any],
        answer: Callable[
            [Plan, ModelSpec, dict[str, Any], list[Attempt], bool], Awaitable[_Answer]
        ],
        judged: Callable[[Plan, list[Attempt], CascadeResult], _Answer],
    ) -> _Answer:
        """The walk down the chain that ``run`` and ``stream`` share.

        Drafts are called, judged, accepted or escalated here; how the answer is
        delivered is the caller's: ``answer`` calls the last model of the chain and
        delivers it (buffered or streamed), ``judged`` delivers a draft that was
        judged (accepted, or the best rejected one when the last model failed).
        An upstream error that another model would not give ends the walk; any
        other moves on to the next model.
        """
        plan = self.plan(messages, params)
        attempts: list[Attempt] = []
        self.attempts = attempts
        rejected: list[tuple[Check, Any, ModelSpec, Attempt]] = []
        last_error: UpstreamError | None = None
        for index, spec in enumerate(plan.chain):
            kwargs = {**draft_params(spec, params), "messages": messages}
            try:
                if index == len(plan.chain) - 1:
                    return await answer(plan, spec, kwargs, attempts, index > 0)
                response, attempt = await self.caller.complete(spec, kwargs, attempts, role="draft")
            except UpstreamError as exc:
                if not exc.failure.retryable and not _model_specific(exc):
                    exc.attempts = attempts
                    raise
                last_error = exc
                continue
            check = await self.judge(
                plan=plan, spec=spec, response=response, messages=messages, params=params
            )
            attempt.check = check
            if check.accepted:
                attempt.decision = "accepted"
                return judged(
                    plan,
                    attempts,
                    self._result(
                        plan, response, spec, attempts, params, escalated=index > 0, check=check
                    ),
                )
            attempt.decision = "escalated"
            rejected.append((check, response, spec, attempt))
        if rejected:
            check, response, spec, attempt = max(rejected, key=lambda r: r[0].probability)
            attempt.decision = "fallback"
            return judged(
                plan,
                attempts,
                self._result(
                    plan,
                    response,
                    spec,
                    attempts,
                    params,
                    escalated=True,
                    check=check,
                    degraded=True,
                ),
            )
        assert last_error is not None
        last_error.attempts = attempts
        raise last_error

    def _result(
        self,
        plan: Plan,
        response: Any,
        spec: ModelSpec,
        attempts: list[Attempt],
        params: dict[str, Any],
        *,
        escalated: bool,
        check: Check | None = None,
        degraded: bool = False,
    ) -> CascadeResult:
        if not params.get("logprobs"):
            for choice in response.choices:
                if getattr(choice, "logprobs", None) is not None:
                    choice.logprobs = None
        answering = next(a for a in reversed(attempts) if a.model == spec.name and a.status == "ok")
        baseline, method = baseline_cost(plan.strongest, spec, answering)
        return CascadeResult(
            response=response,
            model=spec,
            attempts=attempts,
            domain=plan.query.domain,
            complexity=round(plan.query.complexity, 4),
            escalated=escalated,
            baseline_cost_nanos=baseline,
            baseline_method=method,
            quality_score=check.probability if check else None,
            profile=self.profile,
            degraded=degraded,
            routed_past_draft=plan.routed_past_draft,
            query=plan.query,
        )

    # --- streaming ---------------------------------------------------------------------

    async def stream(self, messages: list[Message], params: dict[str, Any]) -> CascadeStream:
        """Drafts are buffered and judged; an accepted draft, or the final model, is streamed.

        Returns once the answering model is known (so errors before any output
        are still raised as errors); iterate ``chunks`` for the answer.
        """

        async def answer(
            plan: Plan,
            spec: ModelSpec,
            kwargs: dict[str, Any],
            attempts: list[Attempt],
            escalated: bool,
        ) -> CascadeStream:
            upstream = await self.caller.open_stream(spec, kwargs, attempts, role="final")
            upstream.attempt.decision = "returned"
            return CascadeStream(
                self, plan, attempts, params, messages, upstream=upstream, escalated=escalated
            )

        def judged(plan: Plan, attempts: list[Attempt], result: CascadeResult) -> CascadeStream:
            return CascadeStream(self, plan, attempts, params, messages, buffered=result)

        return await self._walk(messages, params, answer, judged)


def _model_specific(exc: UpstreamError) -> bool:
    """A 400 that another model may not give (this model's context window is too small)."""
    return "context" in exc.failure.message.lower() and "window" in exc.failure.message.lower()


def draft_params(spec: ModelSpec, params: dict[str, Any]) -> dict[str, Any]:
    """The parameters a draft of ``spec`` is asked with (logprobs on where supported)."""
    kwargs = dict(params)
    kwargs.pop("stream", None)
    kwargs.pop("stream_options", None)
    if spec.supports_logprobs and "logprobs" not in kwargs:
        kwargs["logprobs"] = True  # free signal; stripped from the answer if the client did not ask
    if not spec.supports_logprobs and not params.get("logprobs"):
        kwargs.pop("logprobs", None)
        kwargs.pop("top_logprobs", None)
    return kwargs


def draft_signals(
    response: Any, query: QueryProfile, params: dict[str, Any]
) -> signals.SignalReport:
    """The free signals of a model's answer, as the quality check computes them."""
    return signals.extract(_draft_of(response), query, params)


def baseline_cost(strongest: ModelSpec, answered: ModelSpec, attempt: Attempt) -> tuple[int, str]:
    """What the request would have cost on the chain's strongest model.

    Actual when the strongest model answered; otherwise estimated from the
    answering call's token counts at the strongest model's prices.
    """
    if answered.name == strongest.name:
        return attempt.cost_nanos, "actual"
    return (
        strongest.price.cost_nanos(attempt.prompt_tokens, attempt.completion_tokens),
        "estimated",
    )


def parse_probability(text: str) -> float | None:
    match = _PROBABILITY.search(text or "")
    if not match:
        return None
    value = float(match.group(1))
    if match.group(2) == "%" or value > 1:
        value /= 100
    return value if 0.0 <= value <= 1.0 else None


# Top-level keys of OpenAI's chunks that are relayed as the provider sent them; the
# rest (id, object, created, model) are the stream's own, the usage is its last chunk.
_RELAYED_CHUNK_KEYS = ("system_fingerprint", "service_tier")
# OpenAI's breakdowns of a usage (cached, reasoning tokens…), kept where the provider sent them.
_USAGE_DETAILS = ("prompt_tokens_details", "completion_tokens_details")


@dataclass
class CascadeStream:
    """The answer as OpenAI chunk dicts; ``result`` is complete once ``chunks`` is exhausted.

    Every chunk has the same frame whatever answered (a replayed draft, a relayed
    provider stream, LiteLLM's or the OpenAI-wire transport): one ``id`` and one
    ``created`` for the whole stream, ``object`` ``chat.completion.chunk``, ``model``
    the catalog name of the model that answered. ``chunks`` carries the choices
    only; the usage, known once they end, is ``usage_chunk``.
    """

    agent: CascadeAgent
    plan: Plan
    attempts: list[Attempt]
    params: dict[str, Any]
    messages: list[Message]
    upstream: Stream | None = None
    buffered: CascadeResult | None = None
    escalated: bool = False
    result: CascadeResult | None = None
    failure: Exception | None = None
    _id: str = field(default_factory=lambda: f"chatcmpl-cf-{uuid.uuid4().hex[:24]}")
    _created: int = field(default_factory=lambda: int(time.time()))
    _reported_usage: dict[str, Any] = field(default_factory=dict)  # the answering call's own

    @property
    def model(self) -> ModelSpec:
        return self.buffered.model if self.buffered else self.upstream.spec  # type: ignore[union-attr]

    async def chunks(self) -> AsyncGenerator[dict[str, Any], None]:
        if self.buffered is not None:
            async for chunk in self._replay(self.buffered):
                yield chunk
            self.result = self.buffered
            return
        relay = self._relay()
        try:
            async for chunk in relay:
                yield chunk
        finally:
            await relay.aclose()  # a consumer that stops early still settles the attempt

    def _frame(self, choices: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
        return {
            "id": self._id,
            "object": "chat.completion.chunk",
            "created": self._created,
            "model": self.model.name,
            "choices": choices,
            **extra,
        }

    def _chunk(self, delta: dict[str, Any], finish_reason: str | None = None) -> dict[str, Any]:
        return self._frame([{"index": 0, "delta": delta, "finish_reason": finish_reason}])

    def _framed(self, data: dict[str, Any]) -> dict[str, Any] | None:
        """A provider's chunk in the stream's frame; None when it carries no choice at all."""
        choices = [
            {
                **choice,
                "delta": choice.get("delta") or {},
                "finish_reason": choice.get("finish_reason"),
            }
            for choice in data.get("choices") or []
            if choice.get("delta") or choice.get("finish_reason") or choice.get("logprobs")
        ]
        if not choices:
            return None
        relayed = {k: data[k] for k in _RELAYED_CHUNK_KEYS if data.get(k) is not None}
        return self._frame(choices, **relayed)

    def usage_chunk(self, **extra: Any) -> dict[str, Any]:
        """The last chunk of a stream whose client asked for usage (OpenAI's shape: no choices).

        ``usage`` counts the answer's call, as the body of an answer that is not streamed
        does (with the provider's token breakdowns, where it sent them); ``extra`` is what
        the caller adds beside it.
        """
        assert self.result is not None, "the stream has not ended"
        name = self.result.model.name
        answer = next(
            (a for a in reversed(self.attempts) if a.model == name and a.status == "ok"), None
        )
        prompt = answer.prompt_tokens if answer else 0
        completion = answer.completion_tokens if answer else 0
        usage: dict[str, Any] = {
            "prompt_tokens": prompt,
            "completion_tokens": completion,
            "total_tokens": prompt + completion,
        }
        reported = self._reported_usage
        if self.buffered is not None:
            own: Any = getattr(self.buffered.response, "usage", None)
            reported = own.model_dump(exclude_none=True) if hasattr(own, "model_dump") else {}
        for key in _USAGE_DETAILS:
            if isinstance(reported.get(key), dict):
                usage[key] = reported[key]
        return self._frame([], usage=usage, **extra)

    async def _replay(self, result: CascadeResult) -> AsyncGenerator[dict[str, Any], None]:
        choice = result.response.choices[0]
        message = choice.message
        yield self._chunk({"role": "assistant", "content": ""})
        for index, call in enumerate(getattr(message, "tool_calls", None) or []):
            yield self._chunk(
                {
                    "tool_calls": [
                        {
                            "index": index,
                            "id": call.id,
                            "type": "function",
                            "function": {
                                "name": call.function.name,
                                "arguments": call.function.arguments,
                            },
                        }
                    ]
                }
            )
        content = message.content or ""
        for piece in re.findall(r"\s*\S+\s*", content) or ([content] if content else []):
            yield self._chunk({"content": piece})
        yield self._chunk({}, choice.finish_reason or "stop")

    async def _relay(self) -> AsyncGenerator[dict[str, Any], None]:
        upstream = self.upstream
        assert upstream is not None
        usage: Any = None  # as the provider reported it (``pricing.reported_tokens`` reads it)
        texts: list[str] = []
        chunk = upstream.first_chunk
        try:
            try:
                while True:
                    data = clean_payload(chunk.model_dump(exclude_none=True))
                    if data.get("usage"):
                        usage = data["usage"]
                    for choice in data.get("choices") or []:
                        delta = choice.get("delta") or {}
                        texts.append(delta.get("content") or "")
                        for call in delta.get("tool_calls") or []:
                            function = call.get("function") or {}
                            texts.append(function.get("name") or "")
                            texts.append(function.get("arguments") or "")
                    framed = self._framed(data)
                    if framed is not None:
                        yield framed
                    try:
                        chunk = await upstream.rest.__anext__()
                    except StopAsyncIteration:
                        break
            except Exception as exc:  # the upstream failed mid-stream: what came is charged
                self.failure = exc
            tokens = await self._tokens(usage, texts)
        except (asyncio.CancelledError, GeneratorExit):
            # Torn down (the client left), while relaying or counting. A stream cut short has
            # no usage from the provider (it comes last): its tokens are counted as on any
            # other path, in a worker thread.
            self._settle(usage, await self._tokens_torn_down(usage, texts))
            raise
        self._settle(usage, tokens)
        if self.failure is not None:
            upstream.attempt.status = "error"

    async def _tokens(self, usage: Any, texts: list[str]) -> tuple[int, int]:
        """The stream's tokens: as the provider reported them, else counted in a worker
        thread."""
        return reported_tokens(usage) or await counted_off_loop(*self._counting(texts))

    async def _tokens_torn_down(self, usage: Any, texts: list[str]) -> tuple[int, int]:
        """``_tokens`` of a stream torn down, and counted on the event loop if the stream is
        cancelled again meanwhile, so that the attempt is always charged."""
        try:
            return await asyncio.shield(self._tokens(usage, texts))
        except asyncio.CancelledError:
            return reported_tokens(usage) or counted_tokens(*self._counting(texts))

    def _counting(self, texts: list[str]) -> tuple[str, Any, str]:
        """What counting the stream's tokens reads: the model, the prompt, the answer."""
        assert self.upstream is not None
        answer = "".join(t for t in texts if isinstance(t, str))
        return self.upstream.deployment.litellm_model, self.messages, answer

    def _settle(self, usage: Any, tokens: tuple[int, int]) -> None:
        upstream = self.upstream
        assert upstream is not None
        self._reported_usage = usage if isinstance(usage, dict) else {}
        prompt, completion = tokens
        attempt = upstream.attempt
        attempt.prompt_tokens = prompt
        attempt.completion_tokens = completion
        attempt.cost_nanos = upstream.spec.price.cost_nanos(prompt, completion)
        attempt.latency_ms = int((time.perf_counter() - upstream.started) * 1000)
        upstream.span.set_attributes(
            {
                "gen_ai.usage.input_tokens": prompt,
                "gen_ai.usage.output_tokens": completion,
                "cascadeflow.cost_usd": attempt.cost_nanos / 1e9,
            }
        )
        upstream.span.end()
        baseline, method = baseline_cost(self.plan.strongest, upstream.spec, attempt)
        self.result = CascadeResult(
            response=None,
            model=upstream.spec,
            attempts=self.attempts,
            domain=self.plan.query.domain,
            complexity=round(self.plan.query.complexity, 4),
            escalated=self.escalated,
            baseline_cost_nanos=baseline,
            baseline_method=method,
            quality_score=None,
            profile=self.agent.profile,
            routed_past_draft=self.plan.routed_past_draft,
            query=self.plan.query,
        )


def clean_payload(value: Any) -> Any:
    """Drop LiteLLM's private fields so chunks are exactly OpenAI's shape."""
    if isinstance(value, dict):
        return {
            k: clean_payload(v)
            for k, v in value.items()
            if k != "provider_specific_fields" and not (k == "function_call" and v is None)
        }
    if isinstance(value, list):
        return [clean_payload(v) for v in value]
    return value
