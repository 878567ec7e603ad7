"""A small replay file written by the tests: three models, logprobs and self-checks.

The cheap model is right on about half the rows; its answer logprob and its
self-check confidence are informative but noisy, as in real recordings.
"""

import hashlib
import json
from pathlib import Path

CHEAP, MID, STRONG = "cheap/a", "mid/b", "strong/c"
PRICES = {
    CHEAP: {"input_usd_per_mtok": 0.1, "output_usd_per_mtok": 0.4, "source": "test"},
    MID: {"input_usd_per_mtok": 1.0, "output_usd_per_mtok": 4.0, "source": "test"},
    STRONG: {"input_usd_per_mtok": 10.0, "output_usd_per_mtok": 30.0, "source": "test"},
}


def _u(*parts) -> float:
    return int(hashlib.sha256("|".join(map(str, parts)).encode()).hexdigest()[:8], 16) / 2**32


def build_rows(n: int = 120) -> list[dict]:
    rows = []
    for i in range(n):
        a, b = 3 + i % 17, 4 + (i * 7) % 23
        question = f"Question {i}: which option is right?\nA) {a}\nB) {b}\nC) {a + b}\nD) {a * b}"
        truth = "ABCD"[i % 4]
        cheap_right = _u("cheap", i) < 0.55
        mid_right = cheap_right or _u("mid", i) < 0.6
        strong_right = _u("strong", i) < 0.95

        def answer(right: bool, model: str, truth: str = truth, i: int = i) -> str:
            letter = (
                truth
                if right
                else "ABCD"[("ABCD".index(truth) + 1 + int(_u(model, "w", i) * 3)) % 4]
            )
            return f"The answer is ({letter})."

        noise = _u("noise", i)
        responses = {
            CHEAP: {
                "text": answer(cheap_right, CHEAP),
                "prompt_tokens": 40,
                "completion_tokens": 6,
                "cost_usd": None,
                "latency_s": None,
                "logprob": (-0.05 - 0.8 * noise) if cheap_right else (-0.3 - 1.5 * noise),
                "confidence": min(1.0, (0.6 + 0.4 * noise) if cheap_right else (0.2 + 0.6 * noise)),
                "confidence_cost_usd": 0.000001,
                "correct": 1.0 if cheap_right else 0.0,
            },
            MID: {
                "text": answer(mid_right, MID),
                "prompt_tokens": 40,
                "completion_tokens": 6,
                "cost_usd": None,
                "latency_s": None,
                "logprob": -0.1 if mid_right else -1.2,
                "confidence": None,
                "confidence_cost_usd": None,
                "correct": 1.0 if mid_right else 0.0,
            },
            STRONG: {
                "text": answer(strong_right, STRONG),
                "prompt_tokens": 40,
                "completion_tokens": 6,
                "cost_usd": None,
                "latency_s": None,
                "logprob": None,
                "confidence": None,
                "confidence_cost_usd": None,
                "correct": 1.0 if strong_right else 0.0,
            },
        }
        rows.append(
            {
                "id": f"tiny-{i:03d}",
                "task": "mcq",
                "split": "train" if i % 5 < 3 else "test",
                "messages": [{"role": "user", "content": question}],
                "reference": truth,
                "responses": responses,
            }
        )
    return rows


def write(directory: Path, n: int = 120) -> Path:
    path = directory / "tiny.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in build_rows(n)))
    (directory / "tiny.models.json").write_text(json.dumps(PRICES))
    return path
