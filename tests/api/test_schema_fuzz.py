"""Schemathesis against the management API's OpenAPI schema: no 500, responses match the schema.

Bounded (a few examples per operation) so CI stays fast; every operation is
called with a tenant token that has every scope. Operations are driven with
Hypothesis directly (schemathesis's own pytest plugin does not load on this
pytest version).
"""

import pytest
import schemathesis
from django.core.signals import request_finished, request_started
from django.core.wsgi import get_wsgi_application
from django.db import close_old_connections
from hypothesis import HealthCheck, given, settings

from tenants.services import token_create

pytestmark = pytest.mark.django_db


@pytest.fixture
def keep_test_connection():
    """As Django's test client does: requests must not close the test's database connection."""
    request_started.disconnect(close_old_connections)
    request_finished.disconnect(close_old_connections)
    yield
    request_started.connect(close_old_connections)
    request_finished.connect(close_old_connections)


def test_every_operation_never_errors_and_matches_its_schema(tenant, keep_test_connection):
    token = token_create(tenant=tenant, name="fuzz").raw
    schema = schemathesis.openapi.from_wsgi("/api/v1/schema/", get_wsgi_application())
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 15
    failures = []

    def fuzz(operation):
        @given(case=operation.as_strategy())
        @settings(
            max_examples=8, deadline=None, suppress_health_check=list(HealthCheck), database=None
        )
        def run(case):
            response = case.call(headers={"Authorization": f"Bearer {token}"})
            if response.status_code >= 500:
                failures.append(
                    f"{operation.method.upper()} {operation.path}: {response.status_code}"
                )
            content_type = response.headers.get("Content-Type") or response.headers.get(
                "content-type"
            )
            if isinstance(content_type, list):
                content_type = content_type[0]
            if response.status_code < 300 and content_type and "json" in content_type:
                case.validate_response(
                    response, checks=[schemathesis.checks.response_schema_conformance]
                )

        run()

    for operation in operations:
        fuzz(operation)

    assert sorted(set(failures)) == []
