"""The offline demo: ``make demo`` (``server``), the demo tenant's 30 days of history
(``history``, written by ``manage.py seed_demo``) and its live traffic (``traffic``).
The top layer: it drives tenants, routing and the dashboard as a user would."""
