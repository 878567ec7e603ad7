"""Migrations 0011 and 0012: an audit row's kind.

0011: the rows written before it, which were all uniform audits or labels by agreement, get
the kind they are. 0012: ``uniform`` is no longer stored (it said again what the kind
says); migrating back restores it from the kind.
"""

import pytest
from django.db import connection
from django.db.migrations.executor import MigrationExecutor

from routing.models import Audit as Current

pytestmark = pytest.mark.django_db(transaction=True)

BEFORE_KIND = [("routing", "0010_ledger_late_hours")]
KIND = [("routing", "0011_learning_router_rows")]
KIND_ALONE = [("routing", "0012_audit_kind_alone")]


def migrate(targets):
    executor = MigrationExecutor(connection)
    executor.loader.build_graph()
    executor.migrate(targets)
    return executor.loader.project_state(targets).apps


@pytest.fixture
def at_latest():
    """Every test here leaves the database as the rest of the suite expects it: migrated."""
    yield
    executor = MigrationExecutor(connection)
    executor.loader.build_graph()
    executor.migrate(executor.loader.graph.leaf_nodes())


def _audit(Audit, tenant, request_id, **values):
    return Audit.objects.create(
        tenant_id=tenant.pk,
        request_id=request_id,
        profile="cascade/balanced",
        status="done",
        chain=["demo/small", "demo/large"],
        chain_key="k",
        reference_model="demo/large",
        **values,
    )


def test_earlier_non_uniform_rows_become_labels_by_agreement(tenant, at_latest):
    Audit = migrate(BEFORE_KIND).get_model("routing", "Audit")
    _audit(Audit, tenant, "req_sampled", uniform=True)
    _audit(Audit, tenant, "req_escalated", uniform=False)

    apps = migrate(KIND)

    kinds = dict(apps.get_model("routing", "Audit").objects.values_list("request_id", "kind"))
    assert kinds == {"req_sampled": "audit", "req_escalated": "agreement"}


def test_uniform_is_read_from_the_kind_and_restored_from_it_going_back(tenant, at_latest):
    Audit = migrate(KIND).get_model("routing", "Audit")
    for kind, uniform in (("audit", True), ("agreement", False), ("router", False)):
        _audit(Audit, tenant, f"req_{kind}", kind=kind, uniform=uniform)

    migrate(KIND_ALONE)

    assert {a.request_id: a.uniform for a in Current.objects.all()} == {
        "req_audit": True,
        "req_agreement": False,
        "req_router": False,
    }

    Audit = migrate(KIND).get_model("routing", "Audit")
    assert dict(Audit.objects.values_list("request_id", "uniform")) == {
        "req_audit": True,
        "req_agreement": False,
        "req_router": False,
    }
