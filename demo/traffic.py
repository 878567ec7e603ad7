"""Demo traffic: what the demo tenant's apps send, and a simulator that sends it live.

The request mix (``sample_request``) is shared by the 30-day history that
``seed_demo`` writes (``demo.history``) and by ``run``, which
sends the same kind of requests through the HTTP API while ``make demo`` runs,
so the dashboard keeps moving. Three "apps" of the demo tenant call three
cascades: a support bot (``cascade/support``), an IDE plugin
(``cascade/coding``) and a web assistant (the built-in ``cascade/balanced``),
plus a little direct use of ``demo/small`` for classification. Prompts span
code, math, medical, legal, finance and general questions; about one in four
is hard enough that the small model's draft is rejected and the cascade
escalates.

Standalone::

    python -m demo.traffic --url http://127.0.0.1:8000 --token cf_... --rate 1

No Django here: the simulator is a plain HTTP client.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import httpx

# --- the demo tenant's end users, tokens and apps ----------------------------------------

# (external id, end-user tier slug). Pro users are the busier ones.
END_USERS: tuple[tuple[str, str], ...] = (
    ("ana.silva", "pro"),
    ("bo.chen", "pro"),
    ("carla.mendes", "pro"),
    ("dev.patel", "pro"),
    ("elif.kaya", "pro"),
    ("felix.wagner", "pro"),
    ("grace.okafor", "pro"),
    ("hiro.tanaka", "free"),
    ("ines.moreau", "free"),
    ("jonas.berg", "free"),
    ("kemal.aydin", "free"),
    ("lena.novak", "free"),
    ("mateo.rossi", "free"),
    ("nadia.haddad", "free"),
    ("oscar.lind", "free"),
    ("priya.nair", "free"),
    ("quinn.walsh", "free"),
    ("rosa.diaz", "free"),
    ("sami.laine", "free"),
    ("tomas.kral", "free"),
    ("yuki.sato", "free"),
)
USER_WEIGHT = {"pro": 3.0, "free": 1.0}
# An end user trying the product hard: a busy user whose answers are short (max_tokens)
# and who has a small daily budget of their own (``demo_history``), so the live demo
# crosses its warn and degrade thresholds, then refuses with a 402, every day.
TRIAL_USER = "yuki.sato"
TRIAL_WEIGHT = 4.0
TRIAL_MAX_TOKENS = 128
# Requests per second ``make demo`` sends (each costs about $0.0004 on the demo models).
DEFAULT_RATE = 0.1

SUPPORT_SYSTEM = (
    "You are the support assistant of Northwind Cloud. Answer customers briefly and politely."
)
CODING_SYSTEM = "You are a senior software engineer helping inside an IDE. Be precise."


@dataclass(frozen=True)
class App:
    """One of the demo tenant's products: the key it calls with and the cascade it uses."""

    name: str
    token_name: str  # the API key it uses (history rows are attributed to it)
    model: str
    weight: float
    domains: tuple[tuple[str, float], ...]  # (domain, weight)
    hard_share: float  # share of its prompts that are hard
    system: str = ""
    stream_share: float = 0.0
    json_share: float = 0.0  # share of requests asking for a JSON object


APPS: tuple[App, ...] = (
    App(
        "support-bot",
        "support-bot",
        "cascade/support",
        0.38,
        (("support", 0.55), ("finance", 0.2), ("medical", 0.15), ("legal", 0.1)),
        hard_share=0.2,
        system=SUPPORT_SYSTEM,
        stream_share=0.3,
        json_share=0.08,
    ),
    App(
        "ide-plugin",
        "ide-plugin",
        "cascade/coding",
        0.24,
        (("code", 0.85), ("math", 0.15)),
        hard_share=0.2,
        system=CODING_SYSTEM,
        stream_share=0.5,
    ),
    App(
        "web-assistant",
        "web-app",
        "cascade/balanced",
        0.32,
        (("general", 0.35), ("math", 0.3), ("medical", 0.15), ("finance", 0.1), ("code", 0.1)),
        hard_share=0.26,
        stream_share=0.2,
    ),
    App("classifier", "web-app", "demo/small", 0.06, (("classify", 1.0),), hard_share=0.0),
)
PROFILE_MODELS: tuple[str, ...] = tuple(dict.fromkeys(a.model for a in APPS))

# --- prompts -------------------------------------------------------------------------

_FILL: dict[str, tuple[str, ...]] = {
    "month": ("January", "February", "March", "April", "May", "June", "September", "October"),
    "day": ("Monday", "Tuesday", "Friday", "Saturday", "Sunday"),
    "country": ("Canada", "Japan", "Brazil", "Kenya", "Norway", "Australia", "Mexico", "Poland"),
    "language": ("Spanish", "French", "German", "Japanese", "Portuguese", "Italian"),
    "phrase": ("good morning", "thank you very much", "where is the station", "see you soon"),
    "lang": ("Python", "JavaScript", "TypeScript", "Go", "Rust", "Java"),
    "task": (
        "reverse a list",
        "read a file line by line",
        "parse a JSON string",
        "sort a dictionary by value",
        "remove duplicates from an array",
        "format a date as ISO 8601",
        "make an HTTP GET request",
        "check if a key exists in a map",
    ),
    "fn": (
        "checks whether a string is a palindrome",
        "returns the n-th Fibonacci number",
        "counts the words in a sentence",
        "converts Celsius to Fahrenheit",
        "finds the largest number in a list",
    ),
    "disease": ("the flu", "migraine", "asthma", "strep throat", "chickenpox", "a sinus infection"),
    "drug": ("paracetamol", "an antihistamine", "amoxicillin", "vitamin D"),
    "book": ("Hamlet", "Pride and Prejudice", "The Odyssey", "Moby-Dick", "Don Quixote"),
    "thing": (
        "the sky is blue",
        "ice is slippery",
        "bread rises",
        "the sea is salty",
        "the moon changes shape",
    ),
    "topic": (
        "microservices and a monolith",
        "SQL and NoSQL databases",
        "renting and buying a home",
        "remote and office work",
        "electric and hybrid cars",
    ),
    "plan": ("Starter", "Team", "Business"),
    "feature": ("SSO", "audit logs", "custom domains", "the API", "two-factor authentication"),
    "review": (
        "The delivery was fast and the product works great.",
        "Terrible support, I waited two weeks for an answer.",
        "It does the job, nothing special.",
        "Love the new dashboard, much easier to use!",
        "The app crashes every time I open settings.",
    ),
    "symptoms": (
        "chest pain, shortness of breath and a low fever",
        "sudden headache, neck stiffness and sensitivity to light",
        "fatigue, weight loss and increased thirst",
        "joint pain, a facial rash and intermittent fever",
    ),
}

# Easy prompts: the small model answers them and its draft is accepted.
_EASY: dict[str, tuple[str, ...]] = {
    "support": (
        "How do I reset my password?",
        "Where can I download my invoice for {month}?",
        "Can I change the email address on my account?",
        "What are your support hours on {day}?",
        "How do I cancel my subscription?",
        "My order #{n4} hasn't arrived yet, what should I do?",
        "Do you ship to {country}?",
        "How do I add a team member to my workspace?",
        "Does the {plan} plan include {feature}?",
        "How do I turn on {feature} for my team?",
    ),
    "finance": (
        "Why was I charged ${n2} twice this month?",
        "Can I get a refund for my annual plan?",
        "Do you offer a discount for nonprofits?",
        "Can I pay by bank transfer instead of credit card?",
    ),
    "medical": (
        "What are common symptoms of {disease}?",
        "Is it safe to take ibuprofen with {drug}?",
        "How long is {disease} contagious?",
        "What is a normal resting heart rate for adults?",
    ),
    "legal": (
        "Can my landlord keep my deposit for normal wear and tear?",
        "Do I need consent to record a phone call?",
        "How long do I have to return a product bought online?",
    ),
    "code": (
        "How do I {task} in {lang}?",
        "Write a {lang} function that {fn}.",
        "What does a KeyError mean in Python?",
        "How do I undo the last git commit?",
        "What is the difference between let and const in JavaScript?",
        "How do I list running docker containers?",
    ),
    "math": (
        "What is {a} * {b}?",
        "What is {n4} + {n3}?",
        "Calculate {p}% of {n3}.",
        "What is {n3} - {a} + {b}?",
        "How many minutes are there in {a} hours?",
    ),
    "general": (
        "What is the capital of {country}?",
        "Translate '{phrase}' into {language}.",
        "Summarise the plot of {book} in two sentences.",
        "Give me three name ideas for a coffee shop.",
        "What is a good title for a blog post about {feature}?",
        "Write a short thank-you note to a colleague.",
    ),
    "classify": (
        "Classify the sentiment of this review as positive, negative or neutral: '{review}'",
        "Tag this support ticket with one word (billing, bug, account, other): '{review}'",
    ),
}

# Hard prompts: long, multi-step, technical; the small model often errs and the cascade escalates.
_HARD: dict[str, tuple[str, ...]] = {
    "support": (
        "Our integration with your API fails intermittently with timeouts since {day}. Analyze "
        "the likely causes, explain how to diagnose them step by step, and compare retrying "
        "with queueing the requests.",
        "Explain why my invoice shows a prorated charge of ${n3} after I upgraded to the {plan} "
        "plan on {day}, and compare it with what I would pay on the annual plan.",
    ),
    "finance": (
        "Compare index funds and individual stocks for retirement savings. Explain the "
        "trade-offs, the tax implications and how inflation changes the analysis.",
        "We have revenue of ${n4}k and a margin of {p}%. Explain step by step how to evaluate "
        "whether to finance an expansion with debt or equity, and analyze the risks.",
    ),
    "medical": (
        "A {age}-year-old patient presents with {symptoms}. Explain the differential diagnosis "
        "step by step and why each condition is considered.",
        "Compare the treatment options for type 2 diabetes, explain why metformin is usually "
        "first-line, and analyze the trade-offs for a patient with kidney disease.",
    ),
    "legal": (
        "Analyze the liability clauses of a SaaS contract: explain why a limitation of "
        "liability might not be enforceable, and compare how regulators treat data breaches.",
    ),
    "code": (
        "```python\ndef merge(a, b):\n    return sorted(a + b)\n```\nWhy is this slow for two "
        "already sorted lists? Optimize it and explain the complexity step by step.",
        "Design a rate limiter for a distributed {lang} API. Explain the architecture, analyze "
        "the concurrency issues and compare the trade-offs of token buckets and sliding "
        "windows.",
        "Explain why this {lang} code deadlocks under load and how to fix it: two workers each "
        "lock an account, then wait for the other account's lock. Analyze the concurrency "
        "step by step.",
        "Refactor a 2,000-line class that mixes database access, HTTP handling and business "
        "rules. Explain the design you would use, why, and compare the trade-offs.",
    ),
    "math": (
        "Explain step by step why the derivative of x^2 is 2x, and prove it from the limit "
        "definition.",
        "What is the probability of rolling at least two sixes with {a} dice? Explain why, "
        "step by step.",
        "Prove that the square root of 2 is irrational, and explain why the proof works.",
        "Derive the formula for the sum of the first n integers and prove it by induction.",
    ),
    "general": (
        "Compare {topic}, and explain the trade-offs for a small company.",
        "Explain why {thing} in a way a ten-year-old would understand, then compare it with "
        "the scientific explanation.",
        "Analyze the causes of the 2008 financial crisis and explain why regulation changed "
        "afterwards.",
    ),
}

# Domains as the engine names them (support questions are "general" to the detector).
DOMAINS = ("code", "math", "medical", "legal", "finance", "general")


def _fill(template: str, rng: random.Random) -> str:
    values = {k: rng.choice(v) for k, v in _FILL.items() if "{" + k + "}" in template}
    values.update(
        a=rng.randint(3, 19),
        b=rng.randint(11, 99),
        n2=rng.randint(12, 99),
        n3=rng.randint(120, 980),
        n4=rng.randint(1000, 9999),
        p=rng.choice((5, 10, 12, 15, 20, 25, 30)),
        age=rng.randint(24, 78),
    )
    return template.format(**values)


@dataclass(frozen=True)
class DemoRequest:
    """One request of the mix: what an app sends, and for whom."""

    app: str
    token_name: str
    user: str
    body: dict[str, Any]

    @property
    def model(self) -> str:
        return self.body["model"]

    @property
    def stream(self) -> bool:
        return bool(self.body.get("stream"))


def _weighted(rng: random.Random, items: tuple[tuple[Any, float], ...]) -> Any:
    return rng.choices([i for i, _ in items], weights=[w for _, w in items])[0]


def sample_request(
    rng: random.Random,
    *,
    users: tuple[tuple[str, str], ...] = END_USERS,
    models: tuple[str, ...] | None = None,
) -> DemoRequest:
    """A request of the demo mix. ``models`` restricts it to the apps calling those models."""
    apps = tuple(a for a in APPS if models is None or a.model in models)
    if not apps:  # models outside the demo apps: the web assistant's mix on those models
        web = next(a for a in APPS if a.name == "web-assistant")
        apps = tuple(App(f"custom-{m}", web.token_name, m, 1.0, web.domains, 0.2) for m in models)
    app = _weighted(rng, tuple((a, a.weight) for a in apps))
    domain = _weighted(rng, app.domains)
    hard = domain in _HARD and rng.random() < app.hard_share
    prompt = _fill(rng.choice((_HARD if hard else _EASY)[domain]), rng)
    messages: list[dict[str, str]] = []
    if app.system:
        messages.append({"role": "system", "content": app.system})
    messages.append({"role": "user", "content": prompt})
    user = _weighted(rng, tuple((u, user_weight(u, t)) for u, t in users))
    body: dict[str, Any] = {"model": app.model, "messages": messages, "user": user}
    if rng.random() < app.json_share:
        body["response_format"] = {"type": "json_object"}
        messages[-1]["content"] += " Reply with a JSON object."
    elif rng.random() < app.stream_share:
        body["stream"] = True
        body["stream_options"] = {"include_usage": True}
    if rng.random() < 0.3:
        body["max_tokens"] = rng.choice((400, 800, 1024))
    if rng.random() < 0.25:
        body["temperature"] = rng.choice((0.2, 0.7))
    if user == TRIAL_USER:
        body["max_tokens"] = TRIAL_MAX_TOKENS
    return DemoRequest(app.name, app.token_name, user, body)


def user_weight(user: str, tier: str) -> float:
    """How often an end user sends a request, relative to the others."""
    return TRIAL_WEIGHT if user == TRIAL_USER else USER_WEIGHT.get(tier, 1.0)


def user_share(user: str, users: tuple[tuple[str, str], ...] = END_USERS) -> float:
    """The share of the mix's requests sent as ``user``."""
    weights = {u: user_weight(u, t) for u, t in users}
    return weights.get(user, 0.0) / sum(weights.values())


# --- the live simulator ------------------------------------------------------------------


@dataclass
class TrafficStats:
    sent: int = 0
    ok: int = 0
    escalated: int = 0
    errors: int = 0  # HTTP errors and transport failures
    cost_usd: float = 0.0
    by_status: dict[str, int] = field(default_factory=dict)

    def line(self) -> str:
        statuses = ", ".join(f"{k}: {v}" for k, v in sorted(self.by_status.items()))
        return (
            f"[traffic] {self.sent} requests sent, {self.ok} ok ({self.escalated} escalated), "
            f"{self.errors} errors, ${self.cost_usd:.4f} spent ({statuses})"
        )


class _Backoff:
    """Pause new requests after server or transport errors, longer each time, up to a cap."""

    def __init__(self, base: float = 1.0, cap: float = 30.0):
        self.base, self.cap, self.failures, self.until = base, cap, 0, 0.0

    def failed(self, retry_after: float | None = None) -> float:
        self.failures += 1
        delay = retry_after or min(self.cap, self.base * 2 ** (self.failures - 1))
        self.until = max(self.until, time.monotonic() + delay)
        return delay

    def succeeded(self) -> None:
        self.failures = 0

    def remaining(self) -> float:
        return max(0.0, self.until - time.monotonic())


def _cost_of_summary(text: str) -> str:
    try:
        return str(json.loads(text).get("cost_usd") or "")
    except (ValueError, AttributeError):
        return ""


async def _send(
    client: httpx.AsyncClient, request: DemoRequest, stats: TrafficStats, backoff: _Backoff
) -> None:
    streamed_cost = ""
    try:
        if request.stream:
            async with client.stream("POST", "/v1/chat/completions", json=request.body) as resp:
                async for line in resp.aiter_lines():
                    # A stream's cost is known at its end: its closing ": cascade {...}" comment.
                    if line.startswith(": cascade "):
                        streamed_cost = _cost_of_summary(line.removeprefix(": cascade "))
        else:
            resp = await client.post("/v1/chat/completions", json=request.body)
    except (httpx.HTTPError, OSError) as exc:
        stats.errors += 1
        key = type(exc).__name__
        stats.by_status[key] = stats.by_status.get(key, 0) + 1
        backoff.failed()
        return
    key = str(resp.status_code)
    stats.by_status[key] = stats.by_status.get(key, 0) + 1
    if resp.status_code == 200:
        stats.ok += 1
        stats.escalated += resp.headers.get("x-cascade-escalated") == "true"
        try:
            stats.cost_usd += float(streamed_cost or resp.headers.get("x-cascade-cost-usd") or 0)
        except ValueError:
            pass
        backoff.succeeded()
        return
    stats.errors += 1
    if resp.status_code == 429:
        try:
            backoff.failed(float(resp.headers.get("retry-after") or 1))
        except ValueError:
            backoff.failed()
    elif resp.status_code >= 500:
        backoff.failed()


async def _sleep_until(deadline: float, stop_event: threading.Event) -> bool:
    """Sleep until ``deadline`` (monotonic); True as soon as ``stop_event`` is set."""
    await asyncio.sleep(0)  # let answers in flight be read first
    while not stop_event.is_set():
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return False
        await asyncio.sleep(min(remaining, 0.2))
    return True


async def run_async(
    base_url: str,
    token: str,
    rate_per_s: float = 1.0,
    stop_event: threading.Event | None = None,
    *,
    models: tuple[str, ...] | None = None,
    users: tuple[tuple[str, str], ...] = END_USERS,
    seed: int | None = None,
    max_requests: int | None = None,
    log_every: int = 25,
    max_in_flight: int = 8,
    timeout_s: float = 120.0,
    log: Callable[[str], None] | None = None,
    transport: httpx.AsyncBaseTransport | None = None,
) -> TrafficStats:
    """Send the demo mix with Poisson arrivals until ``stop_event`` is set (or ``max_requests``)."""
    if rate_per_s <= 0:
        raise ValueError("rate_per_s must be positive.")
    log = log or (lambda text: print(text, flush=True))
    stop_event = stop_event or threading.Event()
    rng = random.Random(seed)  # noqa: S311 - traffic shape, not security
    stats = TrafficStats()
    backoff = _Backoff()
    in_flight: set[asyncio.Task] = set()
    headers = {"Authorization": f"Bearer {token}", "User-Agent": "cascadeflow-demo-traffic"}
    async with httpx.AsyncClient(
        base_url=base_url.rstrip("/"), headers=headers, timeout=timeout_s, transport=transport
    ) as client:
        next_at = time.monotonic()
        while not stop_event.is_set() and (max_requests is None or stats.sent < max_requests):
            next_at += rng.expovariate(rate_per_s)
            if await _sleep_until(max(next_at, time.monotonic() + backoff.remaining()), stop_event):
                break
            if len(in_flight) >= max_in_flight:  # the server is slower than the arrivals
                await asyncio.wait(in_flight, return_when=asyncio.FIRST_COMPLETED)
            if backoff.remaining() > 0:  # an answer just said to wait
                next_at = time.monotonic()
                continue
            request = sample_request(rng, users=users, models=models)
            task = asyncio.create_task(_send(client, request, stats, backoff))
            in_flight.add(task)
            task.add_done_callback(in_flight.discard)
            stats.sent += 1
            if log_every and stats.sent % log_every == 0:
                log(stats.line())
        if in_flight:
            # Let answers in progress finish briefly; cancel the rest.
            _, pending = await asyncio.wait(in_flight, timeout=5)
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
    return stats


def run(
    base_url: str,
    token: str,
    rate_per_s: float = 1.0,
    stop_event: threading.Event | None = None,
    **options: Any,
) -> TrafficStats:
    """Blocking ``run_async``: call it from a thread of its own. Never raises on server errors."""
    return asyncio.run(run_async(base_url, token, rate_per_s, stop_event, **options))


def start_in_background(
    base_url: str, token: str, rate_per_s: float = 1.0, **options: Any
) -> tuple[threading.Thread, threading.Event]:
    """Run the simulator in a daemon thread; set the returned event to stop it."""
    stop_event = threading.Event()

    def target() -> None:
        try:
            run(base_url, token, rate_per_s, stop_event, **options)
        except Exception as exc:  # a demo convenience must never take the demo down
            print(f"[traffic] stopped: {exc!r}", file=sys.stderr, flush=True)

    thread = threading.Thread(target=target, name="demo-traffic", daemon=True)
    thread.start()
    return thread, stop_event


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", default="http://127.0.0.1:8000", help="CascadeFlow base URL")
    parser.add_argument("--token", required=True, help="an API token of the demo tenant (cf_...)")
    parser.add_argument("--rate", type=float, default=1.0, help="mean requests per second")
    parser.add_argument("--requests", type=int, default=None, help="stop after this many")
    parser.add_argument("--seed", type=int, default=None, help="random seed of the mix")
    parser.add_argument("--log-every", type=int, default=25, help="a status line every N")
    parser.add_argument(
        "--models", default="", help="comma-separated models/profiles to use (default: the mix)"
    )
    args = parser.parse_args(argv)
    models = tuple(m.strip() for m in args.models.split(",") if m.strip()) or None
    stop_event = threading.Event()
    print(f"[traffic] sending ~{args.rate:g} requests/s to {args.url}; Ctrl-C stops.", flush=True)
    try:
        stats = run(
            args.url,
            args.token,
            args.rate,
            stop_event,
            models=models,
            seed=args.seed,
            max_requests=args.requests,
            log_every=args.log_every,
        )
    except KeyboardInterrupt:
        return
    print(stats.line(), flush=True)
    print(json.dumps({"sent": stats.sent, "ok": stats.ok, "errors": stats.errors}), flush=True)


if __name__ == "__main__":
    main()
