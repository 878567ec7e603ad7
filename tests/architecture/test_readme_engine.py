"""The README's standalone-engine snippet runs as written, in a fresh interpreter with
no Django and nothing in the environment about LiteLLM's cost map."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]


def engine_snippet() -> str:
    readme = (ROOT / "README.md").read_text()
    match = re.search(r"<!-- engine-snippet:.*?-->\n```python\n(.*?)```", readme, re.S)
    assert match, "the README lost its engine snippet marker"
    return match.group(1)


def run(code: str) -> subprocess.CompletedProcess:
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("LITELLM_LOCAL_MODEL_COST_MAP", "DJANGO_SETTINGS_MODULE")
    }
    env["PYTHONPATH"] = str(ROOT)
    return subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        env=env,
        cwd=ROOT,
    )


def test_the_readme_engine_snippet_runs_as_written_without_django():
    code = engine_snippet() + "\nimport sys\nprint(sorted(m for m in sys.modules if m == 'django'))"
    result = run(code)

    assert result.returncode == 0, result.stderr
    first, reasons, loaded = result.stdout.strip().splitlines()[-3:]
    model, escalated, cost = first.split()
    assert model in ("demo/small", "demo/large")
    assert escalated in ("True", "False") and int(cost) > 0
    assert reasons.startswith("[")
    assert loaded == "[]"  # the engine pulled in no Django


def test_importing_the_engine_keeps_litellm_offline():
    result = run(
        "import os, routing.engine.agent, litellm\n"
        "print(os.environ['LITELLM_LOCAL_MODEL_COST_MAP'])\n"
        "print(len(litellm.model_cost) > 100)"
    )

    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["True", "True"]
