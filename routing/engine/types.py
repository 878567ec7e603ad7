"""The engine's vocabulary: models, attempts, checks and results.

Everything here is plain data (no Django, no I/O) so the gateway, tests and
benchmarks can build, inspect and serialise it. Money is integer nano-dollars.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

from routing.engine.pricing import ModelPrice

if TYPE_CHECKING:
    from routing.engine.complexity import QueryProfile

# One OpenAI chat message as the client sent it: JSON whose shape varies with the role
# (content as text or parts, tool calls, names), read field by field where needed.
Message = dict[str, Any]

# What a model does, in LiteLLM's words (its cost map's ``mode``): a chat model answers
# /v1/chat/completions (and /v1/responses, and cascades); an embedding model /v1/embeddings.
CHAT = "chat"
EMBEDDING = "embedding"
MODES = (CHAT, EMBEDDING)


@dataclass(frozen=True)
class Deployment:
    """One place a model can be called: LiteLLM model name plus call parameters."""

    litellm_model: str
    params: Mapping[str, Any] = field(default_factory=lambda: MappingProxyType({}))
    # Whose credentials it calls with ("": the platform's; "tenant:<id>": a tenant's own). Part
    # of the label, so one tenant's failing key never opens a breaker another relies on.
    owner: str = ""

    @property
    def label(self) -> str:
        base = self.params.get("api_base")
        label = f"{self.litellm_model}@{base}" if base else self.litellm_model
        return f"{self.owner}:{label}" if self.owner else label


@dataclass(frozen=True)
class ModelSpec:
    """A model the engine can put in a chain, cheapest first.

    ``domains`` lists the domains the model is suited to (empty: any). ``mode`` says what
    it serves (``CHAT`` or ``EMBEDDING``); an embedding model has ``dimensions`` (the size
    of its vectors, when known) and may take a smaller size (``supports_dimensions``).
    """

    name: str
    deployments: tuple[Deployment, ...]
    price: ModelPrice
    supports_logprobs: bool = False
    supports_tools: bool = True
    domains: frozenset[str] = frozenset()
    max_output_tokens: int | None = None
    owned_by: str = "cascadeflow"
    always_allowed: bool = False
    mode: str = CHAT
    dimensions: int | None = None
    supports_dimensions: bool = False

    @classmethod
    def simple(
        cls,
        name: str,
        *,
        input_usd_per_mtok: float | str,
        output_usd_per_mtok: float | str,
        litellm_model: str | None = None,
        supports_logprobs: bool = False,
        **params: Any,
    ) -> ModelSpec:
        return cls(
            name=name,
            deployments=(Deployment(litellm_model or name, MappingProxyType(params)),),
            price=ModelPrice.per_million_usd(str(input_usd_per_mtok), str(output_usd_per_mtok)),
            supports_logprobs=supports_logprobs,
        )


@dataclass
class Embeddings:
    """An embedding model's answer: one vector per input, in input order."""

    vectors: list[list[float]]
    model: str  # the model the provider says answered
    prompt_tokens: int


@dataclass
class PaidCheck:
    """A quality signal that cost money: self-verification or k-sample agreement."""

    kind: str  # "self_verify" | "agreement"
    model: str
    value: float | None
    cost_nanos: int
    prompt_tokens: int = 0
    completion_tokens: int = 0
    detail: str = ""


@dataclass
class Check:
    """The quality decision on one draft, with every signal that went into it."""

    probability: float
    threshold: float
    accepted: bool
    features: dict[str, float]
    contributions: dict[str, float]
    reasons: list[str]
    hard_fail: str | None = None
    paid: list[PaidCheck] = field(default_factory=list)


def check_reasons(
    *,
    probability: float,
    threshold: float,
    accepted: bool,
    contributions: Mapping[str, float],
    hard_fail: str | None,
    notes: list[str],
    domain: str,
    complexity: float,
) -> list[str]:
    """A check's reasons in words: all but ``notes`` follow from the check's numbers (the
    ledger stores the numbers and derives these sentences again on read)."""
    # Ties broken by name: the order of a stored dict's keys is the database's, not ours.
    top = sorted(contributions.items(), key=lambda kv: (-abs(kv[1]), kv[0]))[:4]
    reasons = [f"rejected: {hard_fail}"] if hard_fail else []
    reasons.extend(notes)
    reasons.append(
        f"p(acceptable)={probability:.3f} {'>=' if accepted else '<'} threshold {threshold:.3f}"
        f" ({domain}, complexity {complexity:.2f})"
    )
    if top:
        reasons.append("main signals: " + ", ".join(f"{k} {v:+.2f}" for k, v in top))
    return reasons


def lp_note(features: Any) -> str | None:
    """The note a draft's mean token log-probability gives, from its features."""
    value = features.get("lp_mean") if isinstance(features, Mapping) else None
    if not isinstance(value, int | float) or isinstance(value, bool):
        return None
    return f"mean token log-probability {value:.3f}"


@dataclass
class Attempt:
    """One upstream call (successful or not) made for a request."""

    model: str
    deployment: str
    role: str  # "draft" | "final" | "verify" | "sample"
    status: str  # "ok" | "error"
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost_nanos: int = 0
    latency_ms: int = 0
    error_code: str = ""
    error_message: str = ""
    decision: str = ""  # "accepted" | "escalated" | "returned" | "fallback" | ""
    check: Check | None = None

    def as_dict(self) -> dict[str, Any]:
        data = asdict(self)
        if self.check is None:
            data.pop("check")
        return data


@dataclass
class CascadeResult:
    response: Any  # litellm.ModelResponse of the answer returned
    model: ModelSpec
    attempts: list[Attempt]
    domain: str
    complexity: float
    escalated: bool
    baseline_cost_nanos: int
    baseline_method: str  # "actual" | "estimated" | "none"
    quality_score: float | None
    profile: str = ""
    degraded: bool = False  # returned a rejected draft because every stronger model failed
    routed_past_draft: bool = False  # the first model was skipped: its draft would be rejected
    query: QueryProfile | None = None  # the query's profile the plan was made from

    @property
    def cost_nanos(self) -> int:
        return sum(a.cost_nanos for a in self.attempts) + sum(
            p.cost_nanos for a in self.attempts if a.check for p in a.check.paid
        )

    @property
    def savings_nanos(self) -> int:
        return self.baseline_cost_nanos - self.cost_nanos

    @property
    def prompt_tokens(self) -> int:
        return sum(a.prompt_tokens for a in self.attempts)

    @property
    def completion_tokens(self) -> int:
        return sum(a.completion_tokens for a in self.attempts)

    @property
    def models_called(self) -> list[str]:
        return models_called(self.attempts)


def models_called(attempts: list[Attempt]) -> list[str]:
    """The models a request called, in first-call order."""
    return list(dict.fromkeys(a.model for a in attempts))
