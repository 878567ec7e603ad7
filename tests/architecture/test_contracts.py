"""The layers and the engine's independence are checked by import-linter (``.importlinter``):
the contracts hold on the tree, and an import that breaks one fails the check."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("core", "tenants", "routing", "billing", "dashboard", "demo", "cascadeflow_site")
LINT_IMPORTS = Path(sys.executable).with_name("lint-imports")


def lint_imports(cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(LINT_IMPORTS), "--no-cache", "--config", str(cwd / ".importlinter")],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
        env={"PYTHONPATH": str(cwd), "PATH": "/usr/bin:/bin"},
    )


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    """A copy of the project's packages, to break on purpose."""
    for package in PACKAGES:
        shutil.copytree(ROOT / package, tmp_path / package, ignore=shutil.ignore_patterns("*.pyc"))
    shutil.copy(ROOT / ".importlinter", tmp_path / ".importlinter")
    return tmp_path


def test_the_tree_keeps_every_contract():
    result = lint_imports(ROOT)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 broken" in result.stdout


@pytest.mark.parametrize(
    ("module", "line", "contract"),
    [
        ("routing/gateway.py", "from dashboard import selectors", "layered"),
        ("tenants/budgets.py", "import routing.enforcement", "layered"),
        ("core/money.py", "import tenants.models", "layered"),
        ("routing/engine/agent.py", "import django.conf", "import no Django"),
        ("routing/providers/demo.py", "from routing import models", "import no Django"),
    ],
)
def test_an_import_against_a_contract_fails_the_check(tree: Path, module, line, contract):
    path = tree / module
    path.write_text(f"{line}  # noqa\n{path.read_text()}")

    result = lint_imports(tree)

    assert result.returncode != 0
    assert "BROKEN" in result.stdout
    assert contract in result.stdout.split("BROKEN")[0].splitlines()[-1]
