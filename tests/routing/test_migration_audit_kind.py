"""Migration 0011: the audit rows written before it, which were all uniform audits or labels by
agreement, get the kind they are."""

import pytest
from django.db import connection
from django.db.migrations.executor import MigrationExecutor

pytestmark = pytest.mark.django_db(transaction=True)

BEFORE = [("routing", "0010_ledger_late_hours")]
AFTER = [("routing", "0011_learning_router_rows")]


def migrate(targets):
    executor = MigrationExecutor(connection)
    executor.loader.build_graph()
    executor.migrate(targets)
    return executor.loader.project_state(targets).apps


def test_earlier_non_uniform_rows_become_labels_by_agreement(tenant):
    apps = migrate(BEFORE)
    try:
        Audit = apps.get_model("routing", "Audit")
        for request_id, uniform in (("req_sampled", True), ("req_escalated", False)):
            Audit.objects.create(
                tenant_id=tenant.pk,
                request_id=request_id,
                profile="cascade/balanced",
                uniform=uniform,
                status="done",
                chain=["demo/small", "demo/large"],
                chain_key="k",
                reference_model="demo/large",
            )
    finally:
        apps = migrate(AFTER)

    kinds = dict(apps.get_model("routing", "Audit").objects.values_list("request_id", "kind"))
    assert kinds == {"req_sampled": "audit", "req_escalated": "agreement"}
