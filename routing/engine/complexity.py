"""What a query is about (domain) and how hard it is (complexity), from its text alone.

Both are cheap (regular expressions, no model call) because they run on every
request before the first draft. The domain picks a tenant's domain route and
nudges the acceptance threshold; complexity raises the threshold for hard
queries and sets how long an answer the query needs.

The detector's accuracy on a labelled set is reported by
``bench/cascade_replay.py --domains`` (see docs/benchmarks.md).
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterator
from dataclasses import dataclass

from routing.engine.types import Message

DOMAINS: tuple[str, ...] = ("code", "math", "medical", "legal", "finance", "general")


def _words(*words: str) -> re.Pattern[str]:
    return re.compile(r"\b(?:" + "|".join(words) + r")\b", re.I)


_PATTERNS: dict[str, list[tuple[re.Pattern[str], float]]] = {
    "code": [
        (
            re.compile(
                # SQL: a SELECT and the first FROM within 500 characters after it. (Written
                # "SELECT.+FROM" with DOTALL, each SELECT with no FROM after it made the
                # engine scan to the end of the text: quadratic in a text of SELECTs.)
                r"```|\bdef |\bclass \w+[:(]|\bimport \w+|#include|\bfunction\s*\(|=>|\bconsole\.log"
                r"|\bSELECT\b.{1,500}?\bFROM\b",
                re.I | re.S,
            ),
            3.0,
        ),
        (
            _words(
                "python",
                "javascript",
                "typescript",
                "java",
                "rust",
                "golang",
                "go",
                r"c\+\+",
                "c#",
                "sql",
                "bash",
                "shell",
                "regex",
                "html",
                "css",
                "json",
                "yaml",
                "api",
                r"compile[rd]?",
                r"debug\w*",
                r"stack ?trace",
                "exception",
                "function",
                "method",
                "variable",
                "algorithm",
                "recursion",
                "refactor",
                r"unit tests?",
                "git",
                "docker",
                "kubernetes",
                "code",
                "script",
                "bug",
                "runtime error",
                "syntax",
                "react",
                "component",
                r"re-?render\w*",
                "borrow checker",
                "list comprehension",
                "dict",
                "array",
                "linked list",
                "binary search",
                "database",
                r"\w+Error",
                r"null ?pointer",
                "segfault",
                "async",
                "compiler",
                "npm",
                "pip",
                "endpoint",
            ),
            1.0,
        ),
    ],
    "math": [
        (
            re.compile(
                # An operation starts at the first digit of a number: from any later digit
                # of it, "\d+" would run to the same place and fail the same way
                # (quadratic in a long run of digits).
                r"(?<!\d)\d+\s*[-+*/^\u00d7\u00f7]\s*\d+|\d\s*[a-z]\s*[-+=]\s*\d|\b\d+\s*%|\$\s?\d"
            ),
            1.5,
        ),
        (
            _words(
                "how many",
                "how much",
                "calculate",
                "compute",
                "solve",
                "equation",
                "integral",
                "derivative",
                "probability",
                r"percent(?:age)?",
                "ratio",
                "sum",
                "product",
                "average",
                "mean",
                "median",
                "prime",
                "fraction",
                "algebra",
                "geometry",
                "triangle",
                "circle",
                "area",
                "volume",
                "perimeter",
                "theorem",
                "proof",
                "prove",
                "matrix",
                "vector",
                "logarithm",
                "factorial",
                "remainder",
                "divisible",
                "solve for",
                r"integers?",
                "consecutive",
                "irrational",
                "square root",
                "average speed",
                "how many ways",
                "times as many",
                "dice",
                "sin",
                "cos",
                "tan",
            ),
            1.2,
        ),
    ],
    "medical": [
        (
            _words(
                r"symptoms?",
                r"diagnos\w+",
                "treatment",
                "therapy",
                "disease",
                "disorder",
                "syndrome",
                "patient",
                "clinical",
                "dose",
                "dosage",
                "mg",
                "medication",
                "drug",
                r"prescri\w+",
                r"side effects?",
                "infection",
                "virus",
                "bacteria",
                "cancer",
                r"tumou?r",
                "diabetes",
                "blood pressure",
                "heart",
                "pain",
                "fever",
                r"allerg\w+",
                r"vaccin\w+",
                r"pregnan\w+",
                "surgery",
                "doctor",
                "physician",
                "nurse",
                "hospital",
                "chronic",
                "acute",
                "flu",
                "contagious",
                "stroke",
                r"blood cells?",
                "migraine",
                "asthma",
                "cough",
                "rash",
                "ibuprofen",
                r"antibiotics?",
                "amoxicillin",
                r"statins?",
            ),
            1.5,
        ),
    ],
    "legal": [
        (
            _words(
                "law",
                "legal",
                "lawsuit",
                "sue",
                "court",
                "judge",
                "contract",
                r"clauses?",
                r"liabilit\w+",
                "liable",
                "tort",
                "statute",
                "regulation",
                "compliance",
                "gdpr",
                "hipaa",
                "copyright",
                "trademark",
                "patent",
                "plaintiff",
                "defendant",
                "attorney",
                "lawyer",
                "jurisdiction",
                "lease",
                "landlord",
                r"tenant'?s? rights",
                "rights",
                "breach",
                "negligence",
                r"indemnif\w+",
                "warranty",
                "terms of service",
                "llc",
                r"incorporat\w+",
                "employer",
                "agreement",
                "divorce",
                r"enforce\w*",
                "consent",
                "legally",
                "illegal",
                "fire me",
            ),
            1.5,
        ),
    ],
    "finance": [
        (
            _words(
                r"invest\w*",
                r"stocks?",
                r"bonds?",
                "portfolio",
                "dividend",
                "interest rate",
                "mortgage",
                "loan",
                "credit",
                "debt",
                r"tax(?:es)?",
                "ira",
                "401k",
                "roth",
                "etf",
                "index fund",
                "inflation",
                "revenue",
                "profit",
                "margin",
                "ebitda",
                "cash flow",
                "balance sheet",
                "valuation",
                "equity",
                "capital gains",
                "venture capital",
                r"budget\w*",
                "accounting",
                "audit",
                r"crypto\w*",
                "bitcoin",
                "forex",
                "hedge fund",
                "retirement",
                "pension",
                "insurance premium",
                "apr",
                r"amortiz\w+",
                "savings account",
                "emergency fund",
                "high-yield",
                "mutual fund",
            ),
            1.5,
        ),
    ],
}

_REASONING = re.compile(
    r"\b(why|explain|prove|derive|step[- ]by[- ]step|compare|contrast|analy[sz]e|evaluate|"
    r"trade-?offs?|justify|design|optimi[sz]e|implement|architecture|critique|assess|"
    r"what would happen|implications?)\b",
    re.I,
)
# A list item or a run of questions: ``(?m)^\s*(?:\d+[.)]|[-*\u2022])\s+\S|\?\s+\S[^?]*\?``,
# its list item searched at line starts by ``line_start_matches``.
_LIST_ITEM = re.compile(r"\s*(?:\d+[.)]|[-*\u2022])\s+\S")
_QUESTIONS = re.compile(r"\?\s+\S[^?]*\?")
_SIMPLE = re.compile(
    r"^\s*(what is|what's|who is|who was|when did|when was|where is|define|translate|"
    r"name|list|spell|convert)\b",
    re.I,
)
_NUMBER_WORDS = {
    "one": 1, "two": 2, "three": 3, "four": 4, "five": 5, "six": 6, "seven": 7,
    "eight": 8, "nine": 9, "ten": 10, "eleven": 11, "twelve": 12, "fifteen": 15,
    "twenty": 20, "thirty": 30, "forty": 40, "fifty": 50, "sixty": 60, "hundred": 100,
    "thousand": 1000, "half": 0.5, "twice": 2, "double": 2, "triple": 3, "dozen": 12,
    "quarter": 0.25,
}  # fmt: skip
# A number written in digits: ``(?<![\w.])-?\$?\d[\d,]*(?:\.\d+)?``, i.e. an optional minus
# and dollar sign, then digits and thousands separators, then decimals, not right after a
# word character or a dot. Written to start with its first character (a class the ``re``
# engine skips to), the look-behind checked once that character is read: the same matches,
# several times faster on a long draft (``tests/engine/test_signal_finders.py``). The class
# the engine skips to is ``[-$0-9]`` and every non-ASCII character (a range check, where
# ``\d`` asks the Unicode database of each character), the first character then checked
# to be ``[-$\d]`` by a look-behind: every non-ASCII decimal digit is in the range.
_NUM = re.compile(
    r"[-$0-9\x80-\U0010ffff](?<=[-$\d])(?<![\w.][-$\d])(?:(?<=-)\$?\d|(?<=\$)\d|(?<=\d))"
    r"[\d,]*(?:\.\d+)?"
)
# ``_NUM`` for ASCII text, where ``\d`` is ``[0-9]``: no look-behind to start with.
_NUM_ASCII = re.compile(_NUM.pattern.replace(r"[-$0-9\x80-\U0010ffff](?<=[-$\d])", "[-$0-9]", 1))
# A percentage. It starts at the first digit of a number: the same matches as without the
# look-behind (a match ends at "%", never inside a number), in linear time.
_PERCENT = re.compile(r"(?<!\d)(\d+(?:\.\d+)?)\s*%")
_COUNTING = re.compile(r"\bhow many\b|\bnumber of\b", re.I)
# An option of a multiple-choice question, ``(?m)^\s*\(?([A-J])[).:]\s+\S`` (at line starts).
_CHOICE = re.compile(r"\s*\(?([A-J])[).:]\s+\S")
_SPACES = re.compile(r"\s*")


def line_start_matches(tail: re.Pattern[str], text: str) -> Iterator[re.Match[str]]:
    r"""The matches of ``(?m)^`` followed by ``tail`` in ``text``, as ``finditer`` finds them, for
    a ``tail`` made of ``\s*`` and then something that cannot start with a space.

    In linear time. From a line start, ``\s*`` runs to the end of the run of spaces it is
    in, line breaks included, so every line start inside one run ends up at the same place:
    the pattern tries each of them, each time over the rest of the run (8 s of CPU for a
    query of 16,000 line breaks, on the request path). Here, when a line start fails, the
    next one tried is the first after its run.
    """
    size = len(text)
    at = 0
    while at <= size:
        m = tail.match(text, at)
        if m is not None:
            yield m
            at = m.end()  # past ``at``: the tail matches at least its non-space
            if text[at - 1] != "\n":
                at = text.find("\n", at) + 1
                if at == 0:
                    return
            continue
        after_spaces = _SPACES.match(text, at).end()  # type: ignore[union-attr]
        at = text.find("\n", after_spaces) + 1
        if at == 0:
            return


def multi_part(text: str, cap: int) -> int:
    """``min(len(re.findall(<list item or questions>, text)), cap)``: list items at line
    starts (``line_start_matches``) and runs of questions, left to right, never overlapping."""
    count, at = 0, 0
    items = line_start_matches(_LIST_ITEM, text)
    item = next(items, None)
    while count < cap:
        while item is not None and item.start() < at:
            item = next(items, None)
        question = _QUESTIONS.search(text, at)
        found = min(
            (m for m in (item, question) if m is not None), key=lambda m: m.start(), default=None
        )
        if found is None:
            break
        count += 1
        at = found.end()
    return count


@dataclass(frozen=True)
class QueryProfile:
    domain: str
    domain_scores: dict[str, float]
    complexity: float  # 0 (trivial) .. 1 (expert)
    numbers: frozenset[float]
    expects_integer: bool
    choices: tuple[str, ...]
    expected_log_tokens: float  # log(1 + tokens) a complete answer usually needs
    log_words: float = 0.0  # log(1 + words in the query)

    @classmethod
    def unjudged(cls) -> QueryProfile:
        """For requests nothing is judged on (one model, no domain routes): no analysis."""
        return cls("", {}, 0.0, frozenset(), False, (), 0.0)

    @property
    def band(self) -> str:
        if self.complexity < 0.3:
            return "simple"
        if self.complexity < 0.6:
            return "moderate"
        return "hard"


def query_text(messages: list[Message]) -> str:
    """The text the engine judges: the last user message (with content parts joined)."""
    for message in reversed(messages):
        if message.get("role") == "user":
            content = message.get("content")
            if isinstance(content, list):
                return "\n".join(p.get("text", "") for p in content if isinstance(p, dict))
            return content or ""
    return ""


def _count(pattern: re.Pattern[str], text: str, cap: int) -> int:
    """``min(len(pattern.findall(text)), cap)``, read no further than the ``cap``-th match: a
    long prompt that names its domain early is not read to its end by every pattern."""
    found = 0
    for _ in pattern.finditer(text):
        found += 1
        if found == cap:
            break
    return found


def detect_domain(text: str) -> tuple[str, dict[str, float]]:
    scores: dict[str, float] = {}
    for domain, patterns in _PATTERNS.items():
        score = 0.0
        for pattern, weight in patterns:
            score += weight * _count(pattern, text, 4)
        scores[domain] = score
    best = max(scores, key=lambda d: scores[d])
    if scores[best] < 1.0:
        return "general", scores
    return best, scores


def _numbers(text: str, digits: list[float]) -> frozenset[float]:
    """The query's numbers: ``digits`` (``numbers(text)``), number words and percentages."""
    found = {round(n, 6) for n in digits}
    for word in re.findall(r"[a-z]+", text.lower()):
        if word in _NUMBER_WORDS:
            found.add(float(_NUMBER_WORDS[word]))
    for pct in _PERCENT.findall(text):
        found.add(round(float(pct) / 100, 6))
    return frozenset(found)


def numbers(text: str) -> list[float]:
    """Every number written in digits ($ and thousands separators allowed)."""
    found = (_NUM_ASCII if text.isascii() else _NUM).findall(text)
    if not found:
        return []
    try:  # all at once (a match holds no line break); one by one if one is not a float
        return list(map(float, "\n".join(found).replace("$", "").replace(",", "").split("\n")))
    except ValueError:
        pass
    out = []
    for raw in found:
        try:
            out.append(float(raw.replace("$", "").replace(",", "")))
        except ValueError:
            continue
    return out


# A query longer than twice this is profiled on its first and last PROFILE_WINDOW characters.
PROFILE_WINDOW = 32_768


def profile_query(text: str) -> QueryProfile:
    """The query's domain, complexity, numbers and options, from its text.

    A long query is profiled on its beginning (the instructions) and its end (where the
    question usually is), 64 KiB in all; its words are counted whole. The profile runs on
    every cascade request on the gateway's event loop, at up to about 3 µs a character of
    text with no keyword in it: a prompt of 4 MB (the body limit) took 13 s of CPU, while
    every request on the process waited.
    """
    words = len(text.split())
    if len(text) > 2 * PROFILE_WINDOW:
        text = text[:PROFILE_WINDOW] + "\n" + text[-PROFILE_WINDOW:]
    domain, scores = detect_domain(text)
    digits = numbers(text)
    nums = _numbers(text, digits)
    score = 0.12
    score += min(math.log1p(words) / math.log1p(400), 1.0) * 0.3
    score += _count(_REASONING, text, 3) * 0.1
    score += multi_part(text, 3) * 0.05
    score += min(len(nums), 8) * 0.02
    if domain in {"code", "medical", "legal"}:
        score += 0.1
    if _SIMPLE.search(text) and words < 15:
        score -= 0.15
    complexity = max(0.0, min(score, 1.0))
    choices = tuple(sorted({m.group(1) for m in line_start_matches(_CHOICE, text)}))
    choices = choices if len(choices) >= 2 else ()
    expected_tokens = 3 if choices else 20 + 400 * complexity
    return QueryProfile(
        domain=domain,
        domain_scores=scores,
        complexity=complexity,
        numbers=nums,
        # Counting questions, and word problems stated in whole numbers, have whole answers.
        expects_integer=bool(_COUNTING.search(text))
        or (bool(nums) and all(float(n).is_integer() for n in digits)),
        choices=choices,
        expected_log_tokens=math.log1p(expected_tokens),
        log_words=math.log1p(words),
    )
