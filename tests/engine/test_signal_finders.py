"""The quality check's fast finders find exactly what its patterns find.

``routing/engine/signals.py`` and ``complexity.py`` find hedges, second-guessing, final-answer
markers, equations and numbers without a full ``re`` scan of the draft (a check on a
2,000-token draft went from ~3.5 ms to ~1 ms of CPU: ``bench/cascade_overhead.py``). The
patterns stay the definition of every signal: each finder is compared here with the pattern
it stands for, on texts made from the pattern itself (random strings it matches, in random
case, with the characters that case-insensitive matching treats specially), between random
text. ``bench/cascade_overhead.py --compare-ref REF`` compares whole decisions with an older
engine on every recorded answer.
"""

import json
import math
import random
import re
import string
import time
from types import SimpleNamespace

import jsonschema
import pytest

from routing.engine import complexity, signals
from routing.engine.agent import _draft_of

try:  # the parser behind re.compile, to draw strings a pattern matches
    from re import _parser as sre_parse
except ImportError:  # pragma: no cover - Python < 3.11
    import sre_parse  # type: ignore[no-redef]

# What the finders replaced, as it was written.
ORIGINAL_NUM = re.compile(r"(?<![\w.])-?\$?\d[\d,]*(?:\.\d+)?")
# The patterns as they were before their runs of spaces were made unambiguous.
ORIGINAL_EQUATION = re.compile(
    r"((?:[\d.,$\s()]|[-+*/x\u00d7\u00f7^%]|\\\*)+?)\s*=\s*\$?\s*(-?[\d,]*\.?\d+)"
)
ORIGINAL_CHOICE = re.compile(
    r"(?i)(?:answer|option|choice)\s*(?:is|:)?\s*\(?([A-J])\)?\b|^\s*\(?([A-J])\)?\s*$|^\(?([A-J])[).:]"
)
ORIGINAL_FENCE = re.compile(r"```(?:json)?\s*(.*?)\s*```", re.DOTALL)

# Characters case-insensitive matching treats specially (dotted and dotless i, long s,
# Kelvin sign), Unicode digits and spaces, and the ASCII that the patterns are made of.
SPECIAL = "\u0130\u0131\u017f\u212a\u0663\u06f4\u00a0\u2003\u2028\x1c\x85\u00d7\u00f7"
ALPHABET = string.ascii_letters + string.digits + " \n\t\r.,$-+*/^%()=:'#\\_<>{}" + SPECIAL


def draw(pattern: str, rng: random.Random) -> str:
    """A random string that the body of ``pattern`` can match (look-arounds and anchors are
    left out: what surrounds it decides those, and the comparison covers both outcomes)."""

    def node(op, av) -> str:
        name = str(op)
        if name == "LITERAL":
            return chr(av)
        if name == "NOT_LITERAL":
            return rng.choice([c for c in "ab1 " if ord(c) != av])
        if name == "IN":
            return item_of_set(av)
        if name == "ANY":
            return rng.choice("a1 .")
        if name in {"MAX_REPEAT", "MIN_REPEAT", "POSSESSIVE_REPEAT"}:
            low, high, sub = av
            count = rng.randint(low, min(high, low + 3))
            return "".join(seq(sub) for _ in range(count))
        if name == "SUBPATTERN":
            return seq(av[-1])
        if name == "BRANCH":
            return seq(rng.choice(av[1]))
        return ""  # AT, ASSERT, ASSERT_NOT, GROUPREF...: nothing to draw

    def item_of_set(items) -> str:
        choices: list[str] = []
        negate = False
        for op, av in items:
            name = str(op)
            if name == "NEGATE":
                negate = True
            elif name == "LITERAL":
                choices.append(chr(av))
            elif name == "RANGE":
                choices.extend(chr(c) for c in range(av[0], min(av[1], av[0] + 40) + 1))
            elif name == "CATEGORY":
                choices.extend(
                    {
                        "CATEGORY_DIGIT": "0123456789\u0663\u06f4",
                        "CATEGORY_SPACE": " \t\n\u00a0\u2003\x1c",
                        "CATEGORY_WORD": "aZ_9\u00e9\u0131",
                    }.get(str(av), "a")
                )
        if negate:
            return rng.choice([c for c in "aZ1 .\n" if c not in choices] or ["\x00"])
        return rng.choice(choices)

    def seq(parsed) -> str:
        return "".join(node(op, av) for op, av in parsed)

    return seq(sre_parse.parse(pattern))


def recase(text: str, rng: random.Random) -> str:
    """Letters in random case, some swapped for what matches them case-insensitively."""
    swaps = {"i": "\u0131", "I": "\u0130", "s": "\u017f", "k": "\u212a"}
    out = []
    for c in text:
        roll = rng.random()
        if c in swaps and roll < 0.1:
            out.append(swaps[c])
        elif roll < 0.5:
            out.append(c.swapcase())
        else:
            out.append(c)
    return "".join(out)


def texts(pattern: re.Pattern[str], count: int, seed: int) -> list[str]:
    """Random text with strings the pattern matches in it (and in it twice, back to back)."""
    rng = random.Random(seed)
    noise = lambda: "".join(rng.choice(ALPHABET) for _ in range(rng.randint(0, 12)))  # noqa: E731
    out = []
    for _ in range(count):
        parts = [noise()]
        for _ in range(rng.randint(1, 4)):
            piece = draw(pattern.pattern, rng)
            if pattern.flags & re.IGNORECASE:
                piece = recase(piece, rng)
            parts += [piece, rng.choice(["", " ", "\n", noise()])]
        out.append("".join(parts))
    return out


def spans(matches) -> list[tuple]:
    return [(m.span(), m.groups()) for m in matches]


@pytest.mark.parametrize(
    "phrases",
    [signals._HEDGE_PHRASES, signals._SELF_CORRECTION_PHRASES, signals._FINAL_PHRASES],
    ids=["hedges", "self-correction", "final answer"],
)
def test_phrase_finders_find_what_their_pattern_finds(phrases):
    found_some = 0
    for text in texts(phrases.pattern, 3000, seed=1):
        expected = spans(phrases.pattern.finditer(text))
        assert spans(phrases.finditer(text, signals._folded(text))) == expected, text
        assert phrases.findall(text, signals._folded(text)) == phrases.pattern.findall(text)
        found_some += bool(expected)
    assert found_some > 1500  # the texts do hold matches


def test_phrase_finders_on_plain_sentences():
    text = (
        "I think it is PROBABLY fine. However, I'm not entirely sure: it's hard to say. "
        "Let me recalculate... actually, on second thought, roughly 12. Final Answer: 12"
    )
    folded = signals._folded(text)
    assert signals._HEDGE_PHRASES.findall(text, folded) == signals._HEDGES.findall(text)
    assert len(signals._HEDGES.findall(text)) == 5
    assert signals._SELF_CORRECTION_PHRASES.findall(text, folded) == (
        signals._SELF_CORRECTION.findall(text)
    )
    assert signals.final_answer(text) == ("12", 12.0)


def test_folding_covers_every_character_that_matches_an_ascii_letter():
    """Every character that a case-insensitive pattern matches with an ASCII letter is that
    letter once lower-cased, or ``_folded`` refuses the text (it then falls back to the
    pattern's own scan)."""
    every = "".join(chr(c) for c in range(0x110000) if not 0xD800 <= c <= 0xDFFF)
    for letter in string.ascii_lowercase:
        for c in set(re.findall(f"(?i){letter}", every)):
            lowered = c.lower()
            assert lowered == letter or c in signals._UNFOLDED or len(lowered) != 1, (c, letter)
            if c in signals._UNFOLDED or len(lowered) != 1:
                assert signals._folded(f"x{c}y") is None
    assert signals._folded("Ab\u212a") == "abk"  # Kelvin sign: lower() makes it k


def test_equations_found_around_each_equals_sign():
    rng = random.Random(2)
    samples = [
        *texts(signals._EQUATION, 3000, seed=3),
        "She has 3 * 4 = 12 apples, then 12 + 5 = 17, so 17 - 2 = 15 and 10% x 20 = 2.",
        "x = 5\ny = x * 2 = 10 = 10\n\\* 3 = 30\n 2 \u00d7 3 = 6, 8 \u00f7 2 = 4, $5 + $6 = $11",
        "= 3 = 4 == 5 =\u0663 (1+2)=3 1,000 * 2 = 2,000.50",
    ]
    for _ in range(2000):
        samples.append("".join(rng.choice(" 0123456789=+-*x.,$()%\n\u0663a") for _ in range(30)))
    for text in samples:
        assert spans(signals._equations(text)) == spans(signals._EQUATION.finditer(text)), text


def test_numbers_pattern_finds_what_it_replaced():
    rng = random.Random(4)
    samples = [
        *texts(ORIGINAL_NUM, 3000, seed=5),
        "-$1,000.50 x2 3.5.6 .7 a-3 $-4 --5 1,,2 \u0663\u06f4 _9 9_ 2024-01-02",
    ]
    for _ in range(3000):
        samples.append("".join(rng.choice("-$.,0123456789 a_\n\u0663") for _ in range(25)))
    ascii_with_numbers = 0
    for text in samples:
        assert complexity._NUM.findall(text) == ORIGINAL_NUM.findall(text), text
        expected = [float(r.replace("$", "").replace(",", "")) for r in ORIGINAL_NUM.findall(text)]
        assert complexity.numbers(text) == expected
        if text.isascii():  # numbers() uses the ASCII pattern there
            assert complexity._NUM_ASCII.findall(text) == ORIGINAL_NUM.findall(text), text
            ascii_with_numbers += bool(expected)
    assert complexity._NUM_ASCII.pattern != complexity._NUM.pattern
    assert ascii_with_numbers > 300


def test_numbers_of_the_working_without_the_last_line():
    rng = random.Random(6)
    pieces = ["12", " 3.5", "$4,000", "\n", "\r\n", "\r", "\x1c", "\u2028", "\x85", " ", "a", "."]
    samples = ["", "7", "1\n2", "1\n2\n\n  ", "no numbers\nhere", "3 = 3\n#### 3\n"]
    samples += ["".join(rng.choice(pieces) for _ in range(rng.randint(0, 15))) for _ in range(5000)]
    for text in samples:
        assert signals._numbers_before_final(text, complexity.numbers(text)) == (
            complexity.numbers(signals._before_final(text))
        ), text


SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 5},
        "items": {"type": "array", "items": {"type": "integer"}},
    },
    "required": ["name", "items"],
    "additionalProperties": False,
}


def original_schema_error(payload, schema):
    try:
        jsonschema.validate(payload, schema)
    except jsonschema.ValidationError as exc:
        return exc.message[:200]
    except jsonschema.SchemaError:
        return None
    return None


@pytest.mark.parametrize(
    "payload",
    [
        {"name": "ok", "items": [1, 2]},
        {"name": "too long", "items": [1, "x"]},
        {"items": []},
        {"name": "a", "items": [1], "extra": True},
        [],
        "text",
    ],
)
@pytest.mark.parametrize(
    "schema",
    [
        SCHEMA,
        dict(reversed(list(SCHEMA.items()))),  # same schema, keys in another order
        {"type": "nonsense"},  # broken: no draft is blamed for it
        {"$schema": "http://json-schema.org/draft-07/schema#", **SCHEMA},
        {"type": "array", "items": {"type": "string"}, "minItems": 1},
    ],
)
def test_schema_errors_as_jsonschema_validate_says_them(payload, schema):
    for _ in range(2):  # the second time from the cached validator
        assert signals._schema_error(payload, schema) == original_schema_error(payload, schema)


def test_logprobs_read_from_objects_and_from_dicts_alike():
    entries = [{"token": "a", "logprob": -0.5}, {"token": "b", "logprob": 0}]

    def response(content):
        choice = SimpleNamespace(
            message=SimpleNamespace(content="ab", tool_calls=None),
            finish_reason="stop",
            logprobs=SimpleNamespace(content=content),
        )
        return SimpleNamespace(choices=[choice], usage=None)

    objects = [SimpleNamespace(**e) for e in entries]
    mixed = [objects[0], entries[1]]
    for content in (entries, objects, mixed):
        draft = _draft_of(response(content))
        assert draft.token_logprobs == [-0.5, 0.0]
        assert all(type(v) is float for v in draft.token_logprobs)


def test_json_keys_order_kept_in_the_schema_cache():
    # Two schemas equal as dicts but written in another order are two cache entries: the
    # order of a schema's keys is the order jsonschema reports errors in.
    first = json.dumps(SCHEMA)
    second = json.dumps(dict(reversed(list(SCHEMA.items()))))
    assert first != second
    signals._schema_error({}, SCHEMA)
    signals._schema_error({}, json.loads(second))
    assert first in signals._VALIDATORS and second in signals._VALIDATORS


# --- JSON documents a schema's fast check finds valid -------------------------------------

DRAFTS = [
    None,  # no $schema: the latest draft
    "http://json-schema.org/draft-04/schema#",
    "http://json-schema.org/draft-06/schema#",
    "http://json-schema.org/draft-07/schema#",
    "https://json-schema.org/draft/2019-09/schema",
    "https://json-schema.org/draft/2020-12/schema",
]
TYPES = ["object", "array", "string", "integer", "number", "boolean", "null"]


def random_schema(rng: random.Random, depth: int = 0, booleans: bool = True):
    if booleans and rng.random() < 0.05:
        return rng.choice([True, False])
    schema: dict = {}
    if rng.random() < 0.7:
        schema["type"] = rng.choice(TYPES) if rng.random() < 0.8 else rng.sample(TYPES, 2)
    if depth < 3 and rng.random() < 0.5:
        names = rng.sample(["a", "b", "c", "id", "answer"], rng.randint(0, 3))
        schema["properties"] = {n: random_schema(rng, depth + 1, booleans) for n in names}
    if rng.random() < 0.4:
        schema["required"] = rng.sample(["a", "b", "c", "id"], rng.randint(0, 2))
    if rng.random() < 0.4:
        schema["additionalProperties"] = (
            rng.choice([True, False]) if rng.random() < 0.7 else random_schema(rng, 3, booleans)
        )
    if depth < 3 and rng.random() < 0.3:
        schema["items"] = random_schema(rng, depth + 1, booleans)
    if rng.random() < 0.1:
        schema["enum"] = rng.sample(["x", "y", "z", 1, None], rng.randint(1, 3))
    if rng.random() < 0.05:
        schema["const"] = rng.choice(["x", 1, 1.0, True])
    if depth < 2 and rng.random() < 0.1:
        schema["anyOf"] = [random_schema(rng, depth + 1, booleans) for _ in range(2)]
    for key in ("minItems", "maxItems", "minLength", "maxLength"):
        if rng.random() < 0.08:
            schema[key] = rng.randint(0, 3)
    extra = rng.random()
    if extra < 0.05:
        schema["patternProperties"] = {"^x": {"type": "string"}}
    elif extra < 0.08:
        schema["not"] = {"type": "null"}
    elif extra < 0.11:
        schema["format"] = "date"
    elif extra < 0.14:
        schema["title"] = "T"
        schema["description"] = "D"
    elif extra < 0.16:
        schema["minimum"] = 1
    return schema


def random_document(rng: random.Random, depth: int = 0):
    roll = rng.random()
    if depth < 3 and roll < 0.3:
        keys = rng.sample(["a", "b", "c", "id", "answer", "x"], rng.randint(0, 4))
        return {k: random_document(rng, depth + 1) for k in keys}
    if depth < 3 and roll < 0.45:
        return [random_document(rng, depth + 1) for _ in range(rng.randint(0, 4))]
    return rng.choice(["x", "y", "", "long text", 0, 1, -3, 1.0, 1.5, True, False, None, 2**60])


def test_fast_json_check_says_valid_only_what_jsonschema_finds_valid():
    rng = random.Random(11)
    fast_checks = used = 0
    for _ in range(800):
        draft = rng.choice(DRAFTS)
        schema = random_schema(rng, booleans=draft != DRAFTS[1])
        if draft is not None:
            schema = {"$schema": draft, **schema} if isinstance(schema, dict) else schema
        validator, valid = signals._build_validator(schema)
        if validator is None:
            continue
        fast_checks += valid is not None
        for i in range(12):
            document = random_document(rng)
            if valid is not None:
                found = list(validator.iter_errors(document))
                assert valid(document) == (not found), (schema, document, found)
                used += 1
            if i < 2:  # jsonschema.validate checks the schema each time: slow
                assert signals._schema_error(document, schema) == original_schema_error(
                    document, schema
                ), (schema, document)
    assert fast_checks > 300 and used > 4000


def test_fast_json_check_of_structured_output_schemas():
    schema = {
        "type": "object",
        "properties": {
            "answers": {
                "type": "array",
                "items": {
                    "type": "object",
                    "properties": {
                        "id": {"type": "string"},
                        "score": {"type": "integer"},
                        "kind": {"enum": ["a", "b"]},
                    },
                    "required": ["id"],
                    "additionalProperties": False,
                },
                "minItems": 1,
            }
        },
        "required": ["answers"],
    }
    validator, valid = signals._build_validator(schema)
    assert valid is not None
    documents = [
        {"answers": [{"id": "1", "score": 3, "kind": "a"}]},
        {"answers": [{"id": "1", "score": 3.0}]},  # 3.0 is an integer in draft 2020-12
        {"answers": [{"id": "1", "score": 3.5}]},
        {"answers": [{"id": "1", "score": True}]},
        {"answers": [{"id": "1", "kind": "c"}]},
        {"answers": [{"id": "1", "extra": 1}]},
        {"answers": []},
        {"answers": [{}]},
        {},
        [],
    ]
    for document in documents:
        assert valid(document) == (not list(validator.iter_errors(document)))
        assert signals._schema_error(document, schema) == original_schema_error(document, schema)
    draft4 = {"$schema": "http://json-schema.org/draft-04/schema#", **schema}
    assert signals._schema_error(documents[1], draft4) == original_schema_error(
        documents[1], draft4
    )
    assert signals._schema_error(documents[1], draft4) is not None  # 3.0 is no draft 4 integer


def test_schemas_the_fast_check_does_not_mirror_are_validated_by_jsonschema():
    for schema in [
        {"type": "object", "patternProperties": {"^x": {"type": "string"}}},
        {"$defs": {"a": {"type": "string"}}, "properties": {"a": {"$ref": "#/$defs/a"}}},
        {"type": "number", "minimum": 3},
        {"enum": [1, 2]},
        {"prefixItems": [{"type": "string"}], "items": False},
        {"properties": {"a": {"$schema": "http://json-schema.org/draft-04/schema#"}}},
        {"type": "array", "items": [{"type": "string"}]},
        {"not": {"type": "string"}},
    ]:
        assert signals._build_validator(schema)[1] is None, schema


def test_answer_in_work_at_once_when_it_is_there():
    rng = random.Random(12)
    values = [0.0, -0.0, 1.0, 2.5, 1e308, float("inf"), -float("inf"), 0.011, 0.02, 12.0, 1e9]
    for _ in range(20000):
        work = [rng.choice(values) + rng.choice([0, 0, 0.005, 1e-3, 0.5]) for _ in range(5)]
        answer = rng.choice(values)
        expected = any(abs(v - answer) <= max(0.011, abs(v) * 1e-6) for v in work)
        assert signals._in_work(answer, work) == expected, (answer, work)


def test_code_blocks_found_as_the_pattern_finds_them():
    rng = random.Random(8)
    samples = [
        *texts(signals._CODE_BLOCK, 3000, seed=9),
        "```python\nprint(1)\n```\ntext\n````py\nx = 1\n```` and ```\n```",
        "``` python\nno\n```\n```\u00e9\u0663\nyes\n``````\n```",
        "```py\nnever closed",
        "```py\n``` ```\n```x\n",
    ]
    for _ in range(3000):
        samples.append("".join(rng.choice("````\n\npy \u00e9_1") for _ in range(30)))
    found_some = 0
    for text in samples:
        expected = signals._CODE_BLOCK.findall(text)
        assert signals._code_blocks(text) == expected, text
        found_some += bool(expected)
    assert found_some > 2000


# --- the same matches, in linear time ---------------------------------------------------


@pytest.mark.parametrize(
    ("new", "old"),
    [(signals._EQUATION, ORIGINAL_EQUATION), (signals._CHOICE_IN_DRAFT, ORIGINAL_CHOICE)],
    ids=["equation", "choice"],
)
def test_patterns_without_ambiguous_runs_of_spaces_match_what_they_replaced(new, old):
    rng = random.Random(6)
    samples = texts(old, 3000, seed=7)
    for _ in range(3000):  # spaces, "$", "is" and ":" around "=" and the option words
        samples.append(
            "".join(
                rng.choice(
                    [
                        " ",
                        "\t",
                        "\n",
                        "\u2003",
                        "$",
                        "=",
                        "is",
                        ":",
                        "1",
                        "-",
                        "(",
                        "B",
                        "x",
                        "answer",
                        "Option",
                        "a",
                    ]
                )
                for _ in range(rng.randint(0, 14))
            )
        )
    for text in samples:
        assert spans(new.finditer(text)) == spans(old.finditer(text)), text
        assert spans(new.finditer(text.strip())) == spans(old.finditer(text.strip())), text


def original_strip_fence(text: str) -> str:
    stripped = text.strip()
    match = ORIGINAL_FENCE.fullmatch(stripped)
    return match.group(1) if match else stripped


def test_the_fence_is_stripped_as_the_pattern_did():
    rng = random.Random(8)
    pieces = [
        "`",
        "```",
        "```json",
        "json",
        " ",
        "\n",
        "\t",
        "\u2003",
        "\u2028",
        '{"a": 1}',
        "x",
        "j",
    ]
    samples = [
        '```json\n{"a": 1}\n```',
        "```{}```",
        "``````",
        "`````",
        "```json```",
        "  ```\n[1]\n```  ",
    ]
    for _ in range(20000):
        samples.append("".join(rng.choice(pieces) for _ in range(rng.randint(0, 8))))
    for text in samples:
        assert signals.strip_fence(text) == original_strip_fence(text), repr(text)


def test_boxed_answers_found_up_to_the_last_brace_are_all_of_them():
    rng = random.Random(9)
    pieces = ["\\boxed{", "\\BOXED{", "}", "{", "7", " ", "\n", "x"]
    for _ in range(5000):
        text = "".join(rng.choice(pieces) for _ in range(rng.randint(0, 12)))
        found = signals._BOXED.findall(text, 0, text.rfind("}") + 1)
        assert found == signals._BOXED.findall(text), text


# Runs that made a pattern try every split of them: each shape, at 4,000 and 16,000
# characters, must cost no more than ~4 times as much (linear), with slack for noise.
HOSTILE_SHAPES = {
    "fence then tabs and spaces": lambda n: "```json" + "\t " * (n // 2) + "x",
    "fence then line breaks": lambda n: "```" + "\n" * n + "x",
    "equals then spaces": lambda n: "1 = " + " " * n + "x",
    "calculator then spaces": lambda n: "<<1=" + " " * n + "x",
    "dollar then spaces": lambda n: "= $" + " " * n + "x",
    "option word then spaces": lambda n: "answer" + " \t" * (n // 2) + "x",
    "boxed, never closed": lambda n: "\\boxed{" * (n // 7),
    "equals everywhere": lambda n: "= " * (n // 2),
    "digits and commas": lambda n: "= " + "1," * (n // 2) + "x",
}
QUERIES = {
    "maths": ("What is 12 * 7 + 3? Answer with a number.", {}),
    "choice": ("Which is right?\nA) one\nB) two\nC) three\nD) four", {}),
    "json": ("Give JSON.", {"response_format": {"type": "json_object"}}),
}


def cpu_of(text: str, query, params) -> float:
    from routing.engine import audit

    best = float("inf")
    for _ in range(3):
        started = time.process_time()
        signals.extract(signals.Draft(content=text), query, params)
        audit.extracted(signals.Draft(content=text), query, params)
        best = min(best, time.process_time() - started)
    return best


@pytest.mark.parametrize("shape", HOSTILE_SHAPES.values(), ids=HOSTILE_SHAPES.keys())
def test_the_check_of_a_draft_made_of_long_runs_grows_linearly(shape):
    for question, params in QUERIES.values():
        query = complexity.profile_query(question)
        small, large = cpu_of(shape(4000), query, params), cpu_of(shape(16000), query, params)
        assert large < 0.05 or large < 8 * small, (question, small, large)
        assert large < 0.5, (question, large)


# --- the query's list items and options, at line starts ---------------------------------

ORIGINAL_MULTI_PART = re.compile(r"(?m)^\s*(?:\d+[.)]|[-*\u2022])\s+\S|\?\s+\S[^?]*\?")
ORIGINAL_CHOICE_IN_QUERY = re.compile(r"(?m)^\s*\(?([A-J])[).:]\s+\S")
LINE_PIECES = ["\n", "\n", " ", "\t", "\r", "\u2003", "\x0c", "1.", "12)", "-", "*", "\u2022",
               "?", "? ", "(", "A)", "B.", "(C)", "J:", "K)", "a", "x y", "What", "1"]  # fmt: skip


def line_texts(count: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return [
        "".join(rng.choice(LINE_PIECES) for _ in range(rng.randint(0, 20))) for _ in range(count)
    ]


def test_list_items_and_questions_are_counted_as_the_pattern_counts_them():
    samples = line_texts(20000, seed=10) + texts(ORIGINAL_MULTI_PART, 3000, seed=11)
    for text in samples:
        expected = len(ORIGINAL_MULTI_PART.findall(text))
        for cap in (1, 3, 50):
            assert complexity.multi_part(text, cap) == min(expected, cap), (text, cap)


def test_options_at_line_starts_are_those_the_pattern_finds():
    samples = line_texts(20000, seed=12) + texts(ORIGINAL_CHOICE_IN_QUERY, 3000, seed=13)
    for text in samples:
        found = complexity.line_start_matches(complexity._CHOICE, text)
        assert spans(found) == spans(ORIGINAL_CHOICE_IN_QUERY.finditer(text)), text


QUERY_SHAPES = {
    "line breaks": lambda n: "\n" * n + "x",
    "blank lines of spaces": lambda n: "\n " * (n // 2) + "x",
    "CRLF": lambda n: "\r\n" * (n // 2) + "x",
    "a list marker, then line breaks": lambda n: "1." + "\n" * n,
    "options, then line breaks": lambda n: "A)\n" * (n // 6) + "\n" * (n // 2),
    "questions": lambda n: "? " * (n // 2),
    "an option letter per line": lambda n: "\nA" * (n // 2),
    "digits": lambda n: "1" * n,
    "digits and a point": lambda n: "1" * n + ".5 x",
    "SELECT without FROM": lambda n: "select " * (n // 7),
    "FROM, then SELECTs": lambda n: "from " + "select " * (n // 7),
}


@pytest.mark.parametrize("shape", QUERY_SHAPES.values(), ids=QUERY_SHAPES.keys())
def test_a_query_made_of_long_runs_is_profiled_in_linear_time(shape):
    def cpu(text: str) -> float:
        best = float("inf")
        for _ in range(3):
            started = time.process_time()
            complexity.profile_query(text)
            best = min(best, time.process_time() - started)
        return best

    small, large = cpu(shape(4000)), cpu(shape(16000))
    assert large < 0.05 or large < 8 * small, (small, large)
    assert large < 0.5, large


def test_percentages_start_at_the_first_digit_of_a_number_as_before():
    original = re.compile(r"(\d+(?:\.\d+)?)\s*%")
    rng = random.Random(14)
    for _ in range(20000):
        text = "".join(
            rng.choice(["1", "23", ".", "5", " ", "%", "a", "\u0663", "\n"]) for _ in range(12)
        )
        assert complexity._PERCENT.findall(text) == original.findall(text), text


def test_counts_stop_at_their_cap_with_the_same_result():
    patterns = [p for group in complexity._PATTERNS.values() for p, _ in group]
    patterns.append(complexity._REASONING)
    rng = random.Random(15)
    pieces = ["python ", "def ", "2 + 3 ", "50% ", "why ", "court ", "stocks ", "x ", "\n"]
    for _ in range(2000):
        text = "".join(rng.choice(pieces) for _ in range(rng.randint(0, 12)))
        for pattern in patterns:
            for cap in (1, 3, 4):
                assert complexity._count(pattern, text, cap) == min(
                    len(pattern.findall(text)), cap
                ), (pattern.pattern, text)


def test_a_long_query_is_profiled_on_its_beginning_and_its_end():
    context = "lorem ipsum dolor sit amet " * 20_000  # 540,000 characters of context
    question = "Which is right?\nA) one\nB) two\nC) three\n"
    query = "Solve: 12 * 7 + 3 = ?\n" + context + question
    profile = complexity.profile_query(query)

    assert profile.choices == ("A", "B", "C")  # the options at the end
    assert 12.0 in profile.numbers  # the numbers at the beginning
    assert profile.log_words == math.log1p(len(query.split()))  # counted whole
    assert len(query.split()) > 100_000
    short = complexity.profile_query("Solve: 12 * 7 + 3 = ?\n" + question)
    assert (profile.domain, profile.choices) == (short.domain, short.choices)


@pytest.mark.parametrize("text", ["a " * 2_000_000, "\n" * 4_000_000, "select " * 570_000])
def test_a_query_of_four_megabytes_is_profiled_in_a_bounded_time(text):
    started = time.process_time()
    complexity.profile_query(text)
    assert time.process_time() - started < 1.0
