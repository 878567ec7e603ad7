"""Settings of the test suite: development mode, chosen explicitly.

``cascadeflow_site.settings`` defaults to production. pytest selects this module
(``DJANGO_SETTINGS_MODULE`` in pyproject.toml), which opts into development
through the environment rather than by overriding settings, so that every process
the suite starts (uvicorn, manage.py, a Celery worker) makes the same choice.
Variables already set win: ``DJANGO_DEBUG=false pytest`` runs the suite as production.
"""

import os

DEVELOPMENT_ENV = {
    # A key generated for this install (var/secret_key), debug-only conveniences.
    "DJANGO_DEBUG": "true",
    # Fake budget-callback and webhook servers listen on 127.0.0.1.
    "CASCADEFLOW_ALLOW_PRIVATE_CALLBACKS": "true",
    # Tenants the suite's servers create (manage.py create_tenant) are on the free plan
    # and call the fake upstream's models at load: no free-tier limits. The limits'
    # own tests set them explicitly.
    "CASCADEFLOW_FREE_TIER_MONTHLY_BUDGET_USD": "",
    "CASCADEFLOW_FREE_TIER_RPM": "",
    "CASCADEFLOW_FREE_TIER_MODELS": "",
    # Tests revoke tokens, deactivate tenants and change plans, then assert the very next
    # request sees it; the token cache's own tests (tests/tenants/test_token_cache.py) turn
    # it on.
    "CASCADEFLOW_ADMISSION_CACHE_SECONDS": "0",
}

for _name, _value in DEVELOPMENT_ENV.items():
    os.environ.setdefault(_name, _value)
# A session run through PgBouncer (tests/support/pgbouncer.py) uses the pooled settings.
if os.environ.get("CASCADEFLOW_TEST_PGBOUNCER") == "1":
    os.environ.setdefault("DATABASE_POOLER", "transaction")

from cascadeflow_site.settings import *  # noqa: E402, F403
