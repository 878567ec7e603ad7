"""PostgreSQL, Redis and the broker: missing locally, a test skips; in CI it fails."""

import os

import pytest


def services_required() -> bool:
    return os.environ.get("CASCADEFLOW_REQUIRE_SERVICES") == "1"


def skip_or_fail(reason: str) -> None:
    """A missing service skips locally and fails in CI (CASCADEFLOW_REQUIRE_SERVICES=1)."""
    if services_required():
        pytest.fail(f"{reason} (CASCADEFLOW_REQUIRE_SERVICES=1)")
    pytest.skip(reason)
