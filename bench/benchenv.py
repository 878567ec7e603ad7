"""Environment the benchmarks give CascadeFlow, and the helpers they share.

Benchmark tenants start on the free plan, like every new tenant; its default
limits (a small budget, 20 requests a minute, the demo models only) would
measure the free plan, not the gateway. Empty values lift them.
"""

import contextlib
import io
import statistics
import subprocess
import tarfile
import tempfile
from collections.abc import Iterator
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

FREE_TIER_UNLIMITED = {
    "CASCADEFLOW_FREE_TIER_MONTHLY_BUDGET_USD": "",
    "CASCADEFLOW_FREE_TIER_RPM": "",
    "CASCADEFLOW_FREE_TIER_MODELS": "",
}

# The local server's maintenance database: throwaway databases are created and dropped from it.
PG_ADMIN = "postgresql://postgres@127.0.0.1:5432/postgres"


def percentile(values: list[float], p: float) -> float:
    """Nearest rank, the value below which ``p`` % of ``values`` fall."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(p / 100 * len(ordered)))]


def stats_ms(samples: list[float]) -> dict:
    """p50 / p95 / max / mean of samples in milliseconds, rounded to 0.1 ms."""
    return {
        "p50_ms": round(percentile(samples, 50), 1),
        "p95_ms": round(percentile(samples, 95), 1),
        "max_ms": round(max(samples), 1),
        "mean_ms": round(statistics.fmean(samples), 1),
        "n": len(samples),
    }


@contextlib.contextmanager
def exported(ref: str) -> Iterator[tuple[Path, str]]:
    """The project as of git ref ``ref`` (``git archive``), in a temporary directory, and
    the commit it names (also written to ``.commit`` there): to measure an older engine."""
    commit = subprocess.run(
        ["git", "-C", str(REPO), "rev-parse", "--verify", f"{ref}^{{commit}}"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    with tempfile.TemporaryDirectory(prefix="cf-engine-") as tmp:
        archive = subprocess.run(
            ["git", "-C", str(REPO), "archive", "--format=tar", commit],
            capture_output=True,
            check=True,
        ).stdout
        with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
            tar.extractall(tmp, filter="data")
        (Path(tmp) / ".commit").write_text(commit)
        yield Path(tmp), commit
