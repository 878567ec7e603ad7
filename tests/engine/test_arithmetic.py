"""The quality check's arithmetic without ``ast.parse`` computes what ``ast.parse`` computes.

``signals.arithmetic`` evaluates most equations of a draft with its own operator-precedence
parser (``_arithmetic_fast``) and sends the rest to Python's parser (``_arithmetic_ast``).
Both are compared here with the evaluator the engine had before (``ORIGINAL`` below, as it
was written), value for value and type for type, on the equations of drafts and on random
and hostile expressions: huge numbers, deep nesting, ``**`` towers, division by zero,
Unicode digits. None of them may hang or take much memory.
"""

from __future__ import annotations

import ast
import math
import operator
import random
import time

import pytest

from routing.engine import signals

# --- the evaluator before, as it was written ---------------------------------------------

_BINARY = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
    ast.Pow: operator.pow,
}
_UNARY = {ast.USub: operator.neg, ast.UAdd: operator.pos}


def original(expr: str):
    def ev(node):
        if isinstance(node, ast.Constant) and isinstance(node.value, int | float):
            return node.value
        if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
            left, right = ev(node.left), ev(node.right)
            if isinstance(node.op, ast.Pow) and abs(right) > 12:
                raise ValueError
            return _BINARY[type(node.op)](left, right)
        if isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY:
            return _UNARY[type(node.op)](ev(node.operand))
        raise ValueError

    try:
        value = ev(ast.parse(expr.strip(), mode="eval").body)
    except (SyntaxError, ValueError, ZeroDivisionError, OverflowError, RecursionError, TypeError):
        return None
    return value if isinstance(value, int | float) else None


def same(a, b) -> bool:
    """Equal values of the same type (floats to the last bit, the sign of zero included)."""
    if type(a) is not type(b):
        return False
    if isinstance(a, float):
        return a.hex() == b.hex() or (math.isnan(a) and math.isnan(b))
    return a == b


def check(expr: str) -> None:
    expected = original(expr)
    assert same(signals.arithmetic(expr), expected), (expr, signals.arithmetic(expr), expected)
    through_ast = signals._arithmetic_ast(expr.strip())
    assert same(through_ast if isinstance(through_ast, int | float) else None, expected)
    fast = signals._arithmetic_fast(expr.strip())
    if fast is not signals._NOT_FAST:
        fast = fast if isinstance(fast, int | float) else None
        assert same(fast, expected), (expr, fast, expected)


# --- expressions --------------------------------------------------------------------------

STATED = [
    " 10 * 0.25",
    "11*12",
    "72-49",
    " (1.5 / 7.5) * 100",
    "\n\n(50 + 80 + 80 + 60 + 40 + 90 + 100 + 70 + 60) / 9",
    "500*105+250*150+450*45",
    " 6 * (2/3)",
    "0.40*9*1040",
    "2**10",
    "2 ** -2",
    "-2**2",
    "2**3**2",
    "2 ** - 3 ** 2",
    "--3 - -3",
    "+-+3",
    "(((1)))",
    "1.",
    ".5 + 1.",
    "00 + 007.5",
    "0123",  # leading zeros: a syntax error
    "0123.5",
    "1 2",
    "2 (3)",
    "(2)(3)",
    "6 // 2",
    "6 / / 2",
    "2 * * 3",
    "2 *** 3",
    "()",
    "(1",
    "1)",
    ")(",
    "",
    "   ",
    "3 +",
    "+",
    "1 / 0",
    "1 / (2 - 2)",
    "0 ** -1",
    "0.0 ** -1",
    "(-8) ** (1/3)",  # a complex root: no real value
    "(-8) ** (1/3) * 0",
    "10.0 ** 400",  # OverflowError
    "10 ** 12 * 1.5",
    "2 ** 13",  # exponents past 12 are refused
    "2 ** 12.5",
    "2 ** -13",
    "9 ** 12 ** 12",
    "1.5e3",
    "3 x 4",
    "1 +\n2",
    "(1 +\n2)",
    "1\t+\t2",
    "1 \x0c+ 2",
    "\u0663 + 1",  # an Arabic-Indic three: not a Python number
    "1\u00a0+ 2",
    "1 + 2\u2003",
    "1 % 2",
    "1 @ 2",
    "1_000 + 1",
    "0x10",
    "1j",
    "True + 1",
    "-0.0",
    "0 * -1.0",
    "-(0.0)",
    "9" * 400 + ".0 * 1",  # a float literal past the float range: inf
    "9" * 4300 + " + 1",  # the longest integer literal Python converts
    "9" * 4301 + " + 1",  # one digit more: a syntax error
    "(" * 100 + "1" + ")" * 100,
    "(" * 250 + "1" + ")" * 250,  # too many nested parentheses for Python's parser
    "-" * 60 + "1",
    "-" * 5000 + "1",  # too deep for the tree walk
    "+".join(["1"] * 40),
    "+".join(["1"] * 2000),  # too deep for the tree walk
    "*".join(["99999"] * 30),
]


@pytest.mark.parametrize("expr", STATED)
def test_stated_and_edge_expressions(expr):
    check(expr)


def random_expression(rng: random.Random, depth: int = 0) -> str:
    """A random arithmetic expression, mostly well formed, in Python's notation."""
    roll = rng.random()
    if depth > 4 or roll < 0.35:
        number = rng.choice(
            [
                str(rng.randint(0, 20)),
                str(rng.randint(0, 10**6)),
                f"{rng.uniform(0, 100):.{rng.randint(0, 4)}f}",
                "0",
                "0.0",
                ".5",
                "7.",
                "00",
                "012",
                "9" * rng.randint(15, 40),
            ]
        )
        return number
    if roll < 0.5:
        return rng.choice(["-", "+", "- ", "--"]) + random_expression(rng, depth + 1)
    if roll < 0.65:
        return "(" + random_expression(rng, depth + 1) + ")"
    op = rng.choice(["+", "-", "*", "/", "**", "**", "//", "%", "* *"])
    space = rng.choice(["", " ", "  ", "\t"])
    return (
        random_expression(rng, depth + 1) + space + op + space + random_expression(rng, depth + 1)
    )


def test_random_expressions():
    rng = random.Random(7)
    with_value = 0
    for _ in range(40000):
        expr = random_expression(rng)
        if rng.random() < 0.05:  # break some: drop or add a character
            at = rng.randrange(len(expr) + 1)
            expr = expr[:at] + rng.choice(["", "(", ")", "*", " ", "1", "x", "\n"]) + expr[at + 1 :]
        check(expr)
        with_value += original(expr) is not None
    assert with_value > 15000  # most have a value


def test_random_strings_of_the_arithmetic_alphabet():
    rng = random.Random(8)
    alphabet = ["1", "2", "0", "3.5", ".5", "1.", "00", "012", " ", "\t", "+", "-", "*", "/"]
    alphabet += ["**", "(", ")", "//", "(", ")", "12", "\u0663", "\n"]
    for _ in range(60000):
        check("".join(rng.choice(alphabet) for _ in range(rng.randint(1, 14))))


def test_the_equations_of_drafts_are_evaluated_without_the_parser():
    """Stated equations, as ``safe_eval`` cleans them, take the fast path."""
    rng = random.Random(9)
    for _ in range(3000):
        a, b, c = rng.randint(0, 5000), rng.randint(1, 500), rng.randint(0, 99)
        op = rng.choice(["+", "-", "*", "/", "x", "\u00d7", "\u00f7", "^"])
        expr = rng.choice(
            [f" ${a:,} {op} {b}", f"{a}{op}{b}", f" ({a} + {b}) {op} {c}.5", f"{c}% {op} {a}"]
        )
        cleaned = signals.python_arithmetic(expr)
        if "x" not in cleaned:  # "21% x 3": an "x" after "%" stays a letter
            assert signals._arithmetic_fast(cleaned.strip()) is not signals._NOT_FAST, cleaned
        check(cleaned)


# --- hostile drafts ------------------------------------------------------------------------

TOWERS = [
    "((((9**12)**12)**12)**12)**12",
    "(((((((((9**12)**12)**12)**12)**12)**12)**12)**12)**12)**12",
    "((((((((((((9^12)^12)^12)^12)^12)^12)^12)^12)^12)^12)^12)^12)",
    "(" * 30 + "99" + "**12)" * 30,
    "*".join(["(" + "9" * 4000 + ")"] * 40),
    "(" + "*".join(["9" * 4000] * 5) + ")**12",
]


@pytest.mark.parametrize("expr", TOWERS)
def test_towers_and_huge_products_end_at_once_without_a_value(expr):
    for evaluate in (signals.arithmetic, signals._arithmetic_ast, signals.safe_eval):
        started = time.process_time()
        assert evaluate(expr) is None
        assert time.process_time() - started < 0.5


def test_huge_values_that_are_computed_are_those_before():
    # Below the size limit, exact integers as before: big products, powers, and a
    # quotient of huge numbers that is an ordinary float.
    for expr in [
        "(9**12)**12",
        "((9**12)**12)**12",
        "(9**12)**12 / (9**12)**12",
        "({n}) * ({n}) / (({n}) * ({n}) - 1)".format(n="9" * 4000),
        "(2**12)**12 - (2**12)**12 + 0.5",
        "((2**12)**12 * (2**12)**12)**12",
    ]:
        check(expr)
        assert signals.arithmetic(expr) is not None


def test_a_draft_full_of_hostile_equations_is_checked_quickly():
    lines = []
    for i in range(200):
        lines.append(f"((((((9^12)^12)^12)^12)^12)^12) = {i}")
        lines.append("(" * 300 + "1" + ")" * 300 + " = 1")
        lines.append("- " * 3000 + "1 + 1 = 2")
        lines.append(f"{'9' * 5000} * 2 = {i}")
        lines.append(f"1 / 0 = {i}, 7 \u0663 2 = 3, 2 ** 99 = 5")
    draft = "\n".join(lines)
    started = time.process_time()
    results = signals.check_arithmetic(draft)[3]
    assert time.process_time() - started < 10
    assert len(results) >= 600
