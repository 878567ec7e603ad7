"""CascadeFlow settings.

Everything comes from the environment through one reader, with embedded
defaults that run on a laptop (SQLite, in-memory channel layer, a filesystem
Celery broker, offline demo models).

Production is the default: without ``DJANGO_DEBUG`` every hardening setting
below is on and ``DJANGO_SECRET_KEY`` is required (start-up stops with
``ImproperlyConfigured`` otherwise). Development is opted into explicitly with
``DJANGO_DEBUG=true`` (``make demo`` and the test suite do); only then, and only
without ``DJANGO_SECRET_KEY``, a key is generated for this install and kept in
``var/secret_key`` (mode 0600). No key is ever a constant of the code: export
links are signed and tenants' secrets encrypted with it.
"""

import os
import secrets
from datetime import timedelta
from decimal import Decimal
from pathlib import Path

import environ
from django.core.exceptions import ImproperlyConfigured

os.environ["LITELLM_LOCAL_MODEL_COST_MAP"] = "True"
# Forecasts fit small models: one BLAS thread each is faster than two fighting over
# a shared core (measured in bench/forecast.py). Must be set before numpy loads.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

BASE_DIR = Path(__file__).resolve().parent.parent
VAR_DIR = Path(os.environ.get("CASCADEFLOW_VAR_DIR", BASE_DIR / "var"))
VAR_DIR.mkdir(parents=True, exist_ok=True)

env = environ.Env()

DEBUG = env.bool("DJANGO_DEBUG", default=False)


def development_secret_key(path: Path) -> str:
    """This install's own development key: made once with ``secrets``, readable by its owner only.

    Concurrent first starts (web server, worker, manage.py) agree on one key: each
    writes a private temporary file and links it into place; the first link wins.
    """
    if not path.exists():
        candidate = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}")
        fd = os.open(candidate, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as handle:
            handle.write(secrets.token_urlsafe(50))
        try:
            os.link(candidate, path)
        except FileExistsError:
            pass
        finally:
            candidate.unlink()
    key = path.read_text().strip()
    if not key:
        raise ImproperlyConfigured(f"{path} is empty: delete it to generate a new key.")
    return key


SECRET_KEY = env.str("DJANGO_SECRET_KEY", default="")
if not SECRET_KEY:
    if not DEBUG:
        raise ImproperlyConfigured(
            "DJANGO_SECRET_KEY must be set: settings are production ones unless "
            "DJANGO_DEBUG=true (for local development only, where a key is generated for "
            "this install in var/secret_key)."
        )
    SECRET_KEY = development_secret_key(VAR_DIR / "secret_key")

ALLOWED_HOSTS = env.list(
    "DJANGO_ALLOWED_HOSTS", default=["localhost", "127.0.0.1", "[::1]", "testserver"]
)
CSRF_TRUSTED_ORIGINS = env.list("DJANGO_CSRF_TRUSTED_ORIGINS", default=[])

INSTALLED_APPS = [
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "axes",
    "rest_framework",
    "drf_spectacular",
    "drf_spectacular_sidecar",
    "channels",
    "tenants",
    "routing",
    "billing",
    "dashboard",
    "demo",
]

# Prometheus metrics (routing.metrics): on unless CASCADEFLOW_METRICS=false.
CASCADEFLOW_METRICS = env.bool("CASCADEFLOW_METRICS", default=True)
_METRICS_MIDDLEWARE = ["routing.metrics.HttpMetricsMiddleware"] if CASCADEFLOW_METRICS else []

MIDDLEWARE = [
    "cascadeflow_site.middleware.RequestIdMiddleware",
    *_METRICS_MIDDLEWARE,
    "cascadeflow_site.middleware.DatabaseUnavailableMiddleware",
    "django.middleware.security.SecurityMiddleware",
    "whitenoise.middleware.WhiteNoiseMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
    # Last: turns a login refused for too many failures into the lockout page.
    "axes.middleware.AxesMiddleware",
]

# The OpenAI-compatible API (/v1/) needs none of the session, CSRF, auth or
# message middleware; cascadeflow_site.handlers serves it with this stack.
CASCADEFLOW_GATEWAY_MIDDLEWARE = [
    "cascadeflow_site.middleware.RequestIdMiddleware",
    *_METRICS_MIDDLEWARE,
    "cascadeflow_site.middleware.DatabaseUnavailableMiddleware",
    # Django's SecurityMiddleware, without its two thread hops per request.
    "cascadeflow_site.middleware.GatewaySecurityMiddleware",
]

ROOT_URLCONF = "cascadeflow_site.urls"
ASGI_APPLICATION = "cascadeflow_site.asgi.application"

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [BASE_DIR / "templates"],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
            ],
        },
    },
]

# --- Database -------------------------------------------------------------
DATABASES = {
    "default": env.db("DATABASE_URL", default=f"sqlite:///{VAR_DIR / 'cascadeflow.sqlite3'}")
}
if DATABASES["default"]["ENGINE"] == "django.db.backends.sqlite3":
    # WAL lets the web server and the Celery worker read while one writes;
    # IMMEDIATE transactions take the write lock up front instead of failing
    # half-way with "database is locked".
    DATABASES["default"]["OPTIONS"] = {
        "timeout": 30,
        "transaction_mode": "IMMEDIATE",
        "init_command": "PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL;",
    }
else:
    DATABASES["default"]["CONN_MAX_AGE"] = env.int("DJANGO_CONN_MAX_AGE", default=60)
    DATABASES["default"]["CONN_HEALTH_CHECKS"] = env.bool("DJANGO_CONN_HEALTH_CHECKS", default=True)
    # No request waits on an unreachable database longer than this (seconds): it gets a 503.
    DATABASES["default"].setdefault("OPTIONS", {})["connect_timeout"] = env.int(
        "DJANGO_DB_CONNECT_TIMEOUT", default=3
    )


def database_behind_pooler(database: dict) -> None:
    """Settings for PostgreSQL reached through PgBouncer in transaction mode.

    Each transaction may run on another server connection, so nothing may outlive
    one: no server-side cursor outside a transaction (``QuerySet.iterator()``
    declares one WITH HOLD in autocommit and fetches from it in later
    transactions; without it the iterator reads its whole result at once) and no
    prepared statement (psycopg 3 prepares a statement run often on one
    connection; PgBouncer before 1.21 cannot route them; Django's default, kept
    here so no OPTIONS in DATABASE_URL turns it back on).
    """
    if database["ENGINE"] != "django.db.backends.postgresql":
        raise ImproperlyConfigured("DATABASE_POOLER needs a PostgreSQL DATABASE_URL.")
    database["DISABLE_SERVER_SIDE_CURSORS"] = True
    database.setdefault("OPTIONS", {})["prepare_threshold"] = None


# "transaction" behind PgBouncer in transaction mode (docs/deployment.md); unset otherwise.
DATABASE_POOLER = env.str("DATABASE_POOLER", default="")
if DATABASE_POOLER not in ("", "transaction"):
    raise ImproperlyConfigured(
        f"DATABASE_POOLER={DATABASE_POOLER!r}: set it to 'transaction' behind PgBouncer in "
        "transaction mode, or leave it unset."
    )
if DATABASE_POOLER:
    database_behind_pooler(DATABASES["default"])
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

# --- Redis, cache, channels, Celery ---------------------------------------
REDIS_URL = env.str("REDIS_URL", default="")

if REDIS_URL:
    CACHES = {
        "default": {
            "BACKEND": "django.core.cache.backends.redis.RedisCache",
            "LOCATION": REDIS_URL,
            "KEY_PREFIX": "cf",
            # A Redis outage must cost a cache miss, not a hung request.
            "OPTIONS": {"socket_connect_timeout": 0.5, "socket_timeout": 1.0},
        }
    }
    CHANNEL_LAYERS = {
        "default": {
            "BACKEND": "channels_redis.core.RedisChannelLayer",
            "CONFIG": {"hosts": [REDIS_URL], "prefix": "cf:channels"},
        }
    }
else:
    CACHES = {"default": {"BACKEND": "django.core.cache.backends.locmem.LocMemCache"}}
    CHANNEL_LAYERS = {"default": {"BACKEND": "channels.layers.InMemoryChannelLayer"}}

_CELERY_DIR = VAR_DIR / "celery"
# Beat keeps its schedule state here whatever the broker (Redis or files): its
# directory is made here, not by the broker set-up below, which only runs without Redis.
CELERY_BEAT_SCHEDULE_FILENAME = env.str(
    "CELERY_BEAT_SCHEDULE_FILENAME", default=str(_CELERY_DIR / "beat-schedule")
)
Path(CELERY_BEAT_SCHEDULE_FILENAME).parent.mkdir(parents=True, exist_ok=True)
# The files broker ignores the host; naming one keeps kombu from warning it is missing.
CELERY_BROKER_URL = env.str("CELERY_BROKER_URL", default=REDIS_URL or "filesystem://localhost/")
if CELERY_BROKER_URL.startswith("filesystem://"):
    # A broker that needs no server: messages are files under var/celery.
    for _sub in ("queue", "processed", "control"):
        (_CELERY_DIR / _sub).mkdir(parents=True, exist_ok=True)
    CELERY_BROKER_TRANSPORT_OPTIONS = {
        "data_folder_in": str(_CELERY_DIR / "queue"),
        "data_folder_out": str(_CELERY_DIR / "queue"),
        "processed_folder": str(_CELERY_DIR / "processed"),
        "control_folder": str(_CELERY_DIR / "control"),
        "store_processed": False,
    }
elif CELERY_BROKER_URL.startswith(("redis://", "rediss://")):
    # A broker that stops answering fails a publish within seconds instead of holding
    # its caller; the worker's own polling (1 s BRPOP) stays well inside the timeout.
    CELERY_BROKER_TRANSPORT_OPTIONS = {"socket_timeout": 5.0, "socket_connect_timeout": 2.0}
CELERY_RESULT_BACKEND = env.str("CELERY_RESULT_BACKEND", default=None)
CELERY_TASK_ALWAYS_EAGER = False
CELERY_TASK_ACKS_LATE = True
CELERY_TASK_REJECT_ON_WORKER_LOST = True
CELERY_WORKER_PREFETCH_MULTIPLIER = 1
CELERY_TASK_TIME_LIMIT = 300
CELERY_TASK_SOFT_TIME_LIMIT = 240
CELERY_BROKER_CONNECTION_RETRY_ON_STARTUP = True
CELERY_TIMEZONE = "UTC"
CELERY_BEAT_SCHEDULE = {
    "roll-up-usage": {"task": "dashboard.tasks.usage_rollup", "schedule": 300.0},
    "roll-up-usage-minutes": {"task": "dashboard.tasks.usage_rollup_minutes", "schedule": 60.0},
    "refresh-spend-forecasts": {"task": "dashboard.tasks.forecasts_refresh", "schedule": 900.0},
    "replay-ledger-spool": {"task": "routing.tasks.ledger_spool_replay", "schedule": 60.0},
    # The ledger's monthly partitions, created ahead; months past their plan's retention out.
    "ensure-ledger-partitions": {
        "task": "routing.tasks.ledger_partitions_ensure",
        "schedule": 6 * 3600.0,
    },
    "ledger-retention": {"task": "routing.tasks.ledger_retention", "schedule": 24 * 3600.0},
    # The outbox: work stored while the broker was down is picked up again.
    "sweep-stripe-events": {"task": "billing.tasks.stripe_events_sweep", "schedule": 60.0},
    "sweep-export-jobs": {"task": "billing.tasks.export_jobs_sweep", "schedule": 60.0},
    "sweep-budget-alerts": {"task": "tenants.tasks.budget_alerts_sweep", "schedule": 60.0},
    "sweep-audits": {"task": "routing.tasks.audits_sweep", "schedule": 60.0},
    "sweep-quality-alerts": {"task": "routing.tasks.quality_alerts_sweep", "schedule": 60.0},
    # Refits profiles with new labels and checks every learned calibration for drift.
    "sweep-profile-learning": {"task": "routing.tasks.profiles_learning_sweep", "schedule": 600.0},
    "reclaim-expired-budget-reservations": {
        "task": "tenants.tasks.reservations_reclaim",
        "schedule": 60.0,
    },
    "expire-billing-grace-periods": {
        "task": "billing.tasks.grace_expire",
        "schedule": 600.0,
    },
    "report-usage-to-stripe": {
        "task": "billing.tasks.usage_report_all",
        "schedule": 900.0,
    },
}

# --- Auth, i18n, static ----------------------------------------------------
AUTH_PASSWORD_VALIDATORS = [
    {"NAME": "django.contrib.auth.password_validation.UserAttributeSimilarityValidator"},
    {"NAME": "django.contrib.auth.password_validation.MinimumLengthValidator"},
    {"NAME": "django.contrib.auth.password_validation.CommonPasswordValidator"},
    {"NAME": "django.contrib.auth.password_validation.NumericPasswordValidator"},
]
LOGIN_URL = "/accounts/login/"
LOGIN_REDIRECT_URL = "/dashboard/"
LOGOUT_REDIRECT_URL = "/accounts/login/"

# Login throttling (django-axes), for the dashboard's and the admin's login alike.
# AXES_FAILURE_LIMIT failed logins to one account from one client address lock that
# pair out; CASCADEFLOW_LOGIN_ADDRESS_FAILURE_LIMIT failures from one address, whatever
# the accounts, lock the address out (dashboard.accounts.LoginThrottle). Both last
# the cool-off from the latest failure. Failures are kept in the database, shared by
# every worker, and each is logged in axes' access-failure log.
AUTHENTICATION_BACKENDS = [
    "axes.backends.AxesBackend",  # refuses a locked-out login; a ModelBackend for the rest
    "django.contrib.auth.backends.ModelBackend",
]
AXES_HANDLER = "dashboard.accounts.LoginThrottle"
AXES_FAILURE_LIMIT = env.int("CASCADEFLOW_LOGIN_FAILURE_LIMIT", default=5)
CASCADEFLOW_LOGIN_ADDRESS_FAILURE_LIMIT = env.int(
    "CASCADEFLOW_LOGIN_ADDRESS_FAILURE_LIMIT", default=20
)
AXES_LOCKOUT_PARAMETERS = [["username", "ip_address"]]
AXES_COOLOFF_TIME = timedelta(minutes=env.int("CASCADEFLOW_LOGIN_COOLOFF_MINUTES", default=15))
AXES_USERNAME_CALLABLE = "dashboard.accounts.login_username"
AXES_LOCKOUT_CALLABLE = "dashboard.accounts.login_locked_out"
AXES_ENABLE_ACCESS_FAILURE_LOG = True
AXES_VERBOSE = False
# The client address (dashboard.accounts.client_address; sign-up limits use it too) is
# REMOTE_ADDR: no header is trusted by default, since any client can send one. Behind
# N reverse proxies that each append to X-Forwarded-For, set the count: the address
# the outermost proxy saw is then the N-th entry from the right. (uvicorn already
# rewrites REMOTE_ADDR for a proxy on 127.0.0.1, its --forwarded-allow-ips default.)
AXES_CLIENT_IP_CALLABLE = "dashboard.accounts.client_address"
CASCADEFLOW_TRUSTED_PROXY_COUNT = env.int("CASCADEFLOW_TRUSTED_PROXY_COUNT", default=0)

# Self-serve sign-up: organisations created per client address (``limits`` notation,
# counted where rate limits are: Redis, or process memory); empty = no limit. A new
# tenant's API tokens work once the owner opened the emailed link (valid this long).
CASCADEFLOW_SIGNUP_RATE = env.str("CASCADEFLOW_SIGNUP_RATE", default="5/hour")
CASCADEFLOW_EMAIL_VERIFICATION_SECONDS = env.int(
    "CASCADEFLOW_EMAIL_VERIFICATION_SECONDS", default=3 * 24 * 3600
)


def _optional(value: str, cast):
    return cast(value) if value.strip() else None


# The free tier (the default plan of self-serve tenants) gets these limits when it is
# created (tenants.services.tier_ensure_defaults); Stripe's plan sync can change them
# like any plan's. Empty = no limit; models: an allow-list (empty = every model).
CASCADEFLOW_FREE_TIER_MONTHLY_BUDGET_NANOS = _optional(
    env.str("CASCADEFLOW_FREE_TIER_MONTHLY_BUDGET_USD", default="1"),
    lambda usd: int(Decimal(usd) * 10**9),
)
CASCADEFLOW_FREE_TIER_RPM = _optional(env.str("CASCADEFLOW_FREE_TIER_RPM", default="20"), int)
CASCADEFLOW_FREE_TIER_MODELS = env.list(
    "CASCADEFLOW_FREE_TIER_MODELS", default=["demo/small", "demo/medium", "demo/large"]
)

LANGUAGE_CODE = "en-us"
TIME_ZONE = "UTC"
USE_I18N = True
USE_TZ = True

STATIC_URL = "static/"
STATICFILES_DIRS = [BASE_DIR / "static"]
STATICFILES_FINDERS = [
    "django.contrib.staticfiles.finders.FileSystemFinder",
    "django.contrib.staticfiles.finders.AppDirectoriesFinder",
    "dashboard.staticfiles.PlotlyJsFinder",  # plotly.js from the installed plotly package
]
STATIC_ROOT = env.str("DJANGO_STATIC_ROOT", default=str(VAR_DIR / "staticfiles"))
Path(STATIC_ROOT).mkdir(parents=True, exist_ok=True)
STORAGES = {
    "default": {"BACKEND": "django.core.files.storage.FileSystemStorage"},
    "staticfiles": {
        "BACKEND": "django.contrib.staticfiles.storage.StaticFilesStorage"
        if DEBUG
        else "whitenoise.storage.CompressedManifestStaticFilesStorage"
    },
}
WHITENOISE_USE_FINDERS = DEBUG

EMAIL_BACKEND = env.str(
    "DJANGO_EMAIL_BACKEND", default="django.core.mail.backends.console.EmailBackend"
)
DEFAULT_FROM_EMAIL = env.str("DJANGO_DEFAULT_FROM_EMAIL", default="CascadeFlow <noreply@localhost>")

# --- Production hardening (on whenever DEBUG is off) ------------------------
SECURE_PROXY_SSL_HEADER = ("HTTP_X_FORWARDED_PROTO", "https")
SECURE_SSL_REDIRECT = env.bool("DJANGO_SECURE_SSL_REDIRECT", default=not DEBUG)
SESSION_COOKIE_SECURE = env.bool("DJANGO_SESSION_COOKIE_SECURE", default=not DEBUG)
CSRF_COOKIE_SECURE = env.bool("DJANGO_CSRF_COOKIE_SECURE", default=not DEBUG)
SECURE_HSTS_SECONDS = env.int("DJANGO_SECURE_HSTS_SECONDS", default=0 if DEBUG else 31536000)
SECURE_HSTS_INCLUDE_SUBDOMAINS = not DEBUG
SECURE_HSTS_PRELOAD = not DEBUG
SECURE_CONTENT_TYPE_NOSNIFF = True
X_FRAME_OPTIONS = "DENY"
SECURE_REDIRECT_EXEMPT = [r"^healthz$", r"^readyz$", r"^metrics$"]

# --- REST framework (management API) ----------------------------------------
REST_FRAMEWORK = {
    "DEFAULT_AUTHENTICATION_CLASSES": [],
    "DEFAULT_PERMISSION_CLASSES": [],
    "UNAUTHENTICATED_USER": None,
    "EXCEPTION_HANDLER": "tenants.api_base.api_exception_handler",
    # ``format`` is the CSV export's own parameter (format=focus), not a renderer switch.
    "URL_FORMAT_OVERRIDE": None,
    "DEFAULT_SCHEMA_CLASS": "drf_spectacular.openapi.AutoSchema",
}
SPECTACULAR_SETTINGS = {
    "TITLE": "CascadeFlow management API",
    "VERSION": "1",
    # Browsable docs served from our own static files: no CDN.
    "SWAGGER_UI_DIST": "SIDECAR",
    "SWAGGER_UI_FAVICON_HREF": "SIDECAR",
    "REDOC_DIST": "SIDECAR",
}

# --- CascadeFlow -------------------------------------------------------------
# Largest accepted request body on the OpenAI-compatible API (413 beyond it).
CASCADEFLOW_MAX_REQUEST_BYTES = env.int("CASCADEFLOW_MAX_REQUEST_BYTES", default=4 * 1024 * 1024)
DATA_UPLOAD_MAX_MEMORY_SIZE = CASCADEFLOW_MAX_REQUEST_BYTES
# Extra models beyond the offline demo models: a JSON file (path) or inline
# JSON mapping a public model name to LiteLLM parameters (docs/models.md).
CASCADEFLOW_MODELS = env.json("CASCADEFLOW_MODELS", default={})
CASCADEFLOW_MODELS_FILE = env.str("CASCADEFLOW_MODELS_FILE", default="")
# 1.0 = the demo models' realistic latency; 0 = instant (tests).
CASCADEFLOW_DEMO_LATENCY_SCALE = env.float("CASCADEFLOW_DEMO_LATENCY_SCALE", default=1.0)
# Seconds allowed for one upstream call before it counts as a timeout.
CASCADEFLOW_UPSTREAM_TIMEOUT = env.float("CASCADEFLOW_UPSTREAM_TIMEOUT", default=120.0)
# The chain of the built-in cascade/<preset> profiles, cheapest first.
CASCADEFLOW_DEFAULT_CHAIN = env.list(
    "CASCADEFLOW_DEFAULT_CHAIN", default=["demo/small", "demo/medium", "demo/large"]
)
# Retries per deployment for provider errors, before falling back to the next.
CASCADEFLOW_UPSTREAM_RETRIES = env.int("CASCADEFLOW_UPSTREAM_RETRIES", default=1)
CASCADEFLOW_UPSTREAM_BACKOFF = env.float("CASCADEFLOW_UPSTREAM_BACKOFF", default=0.2)
# Circuit breaker per deployment (state in Redis when REDIS_URL is set).
CASCADEFLOW_BREAKER_FAILURES = env.int("CASCADEFLOW_BREAKER_FAILURES", default=5)
CASCADEFLOW_BREAKER_WINDOW = env.float("CASCADEFLOW_BREAKER_WINDOW", default=60.0)
CASCADEFLOW_BREAKER_COOLDOWN = env.float("CASCADEFLOW_BREAKER_COOLDOWN", default=30.0)
CASCADEFLOW_BREAKER_PREFIX = env.str("CASCADEFLOW_BREAKER_PREFIX", default="cf:cb:")
CASCADEFLOW_RATELIMIT_PREFIX = env.str("CASCADEFLOW_RATELIMIT_PREFIX", default="cf:rl")
# Stripe (billing/). STRIPE_API_BASE points the client at a local Stripe test server.
STRIPE_API_KEY = env.str("STRIPE_API_KEY", default="")
STRIPE_WEBHOOK_SECRET = env.str("STRIPE_WEBHOOK_SECRET", default="")
STRIPE_API_BASE = env.str("STRIPE_API_BASE", default="")
STRIPE_WEBHOOK_TOLERANCE = env.int("STRIPE_WEBHOOK_TOLERANCE", default=300)
# Days a past_due subscription keeps its plan before the tenant drops to the free tier.
CASCADEFLOW_BILLING_GRACE_DAYS = env.int("CASCADEFLOW_BILLING_GRACE_DAYS", default=3)
# CSV exports above this many rows run as a Celery job; their download links expire.
CASCADEFLOW_EXPORT_SYNC_MAX_ROWS = env.int("CASCADEFLOW_EXPORT_SYNC_MAX_ROWS", default=2_000_000)
CASCADEFLOW_EXPORT_LINK_SECONDS = env.int("CASCADEFLOW_EXPORT_LINK_SECONDS", default=3600)
# Fernet keys (newest first) for secrets tenants give us; default: derived from SECRET_KEY.
CASCADEFLOW_ENCRYPTION_KEYS = env.list("CASCADEFLOW_ENCRYPTION_KEYS", default=[])
# Budget callbacks and alert webhooks must be HTTPS unless this is on (local development, tests).
CASCADEFLOW_ALLOW_HTTP_CALLBACKS = env.bool("CASCADEFLOW_ALLOW_HTTP_CALLBACKS", default=DEBUG)
# ... and must reach public addresses (core.netguard), when saved and when
# called. On only for local fake servers (the test suite): never in production.
CASCADEFLOW_ALLOW_PRIVATE_CALLBACKS = env.bool("CASCADEFLOW_ALLOW_PRIVATE_CALLBACKS", default=False)
# A budget callback gets one total deadline (its tenant's timeout, at most this),
# and at most this many calls per tenant in flight per process; then its fallback.
CASCADEFLOW_CALLBACK_MAX_TIMEOUT_MS = env.int("CASCADEFLOW_CALLBACK_MAX_TIMEOUT_MS", default=2000)
CASCADEFLOW_CALLBACK_MAX_IN_FLIGHT = env.int("CASCADEFLOW_CALLBACK_MAX_IN_FLIGHT", default=8)
# A budget reservation not settled within this many seconds (its worker died)
# is reclaimed by the tenants.reservations_reclaim task.
CASCADEFLOW_RESERVATION_TTL = env.int("CASCADEFLOW_RESERVATION_TTL", default=900)
# How long (seconds, at most 1) a process reuses a token lookup (the token, its tenant, plan
# tier limits, whether it has budgets and end-user tiers) before reading it again: a token
# revoked or expired, a tenant deactivated, a plan changed, is refused or applied by every
# worker within this delay. 0 reads the database on every request.
CASCADEFLOW_ADMISSION_CACHE_SECONDS = min(
    env.float("CASCADEFLOW_ADMISSION_CACHE_SECONDS", default=1.0), 1.0
)
# How stale ApiToken.last_used_at may get before a request rewrites it.
CASCADEFLOW_TOKEN_TOUCH_SECONDS = env.int("CASCADEFLOW_TOKEN_TOUCH_SECONDS", default=60)
# Ledger rows the database could not take when a request ended are appended here
# (fsync'd) and replayed when it is back; keep it on a persistent volume.
CASCADEFLOW_SPOOL_DIR = env.str("CASCADEFLOW_SPOOL_DIR", default=str(VAR_DIR / "spool"))
# Ledger months a plan no longer keeps (Tier.ledger_retention_months) are written here as
# gzip CSV, one file per tenant and month, before they leave the database; keep it on a
# persistent volume (or one synced to object storage).
CASCADEFLOW_LEDGER_ARCHIVE_DIR = env.str(
    "CASCADEFLOW_LEDGER_ARCHIVE_DIR", default=str(VAR_DIR / "ledger-archive")
)
# Retry-After (seconds) of the 503 answered while the database is unreachable.
CASCADEFLOW_RETRY_AFTER_SECONDS = env.int("CASCADEFLOW_RETRY_AFTER_SECONDS", default=5)
# Prometheus: /metrics answers this bearer token (unset: loopback clients only). Every
# worker writes its samples under PROMETHEUS_MULTIPROC_DIR (read by prometheus-client,
# so it is set here, before anything imports it); empty it when the fleet starts.
CASCADEFLOW_METRICS_TOKEN = env.str("CASCADEFLOW_METRICS_TOKEN", default="")
os.environ.setdefault("PROMETHEUS_MULTIPROC_DIR", str(VAR_DIR / "prometheus"))
Path(os.environ["PROMETHEUS_MULTIPROC_DIR"]).mkdir(parents=True, exist_ok=True)
# Audits (routing.audits): what a new tenant may spend on them a month, at most (the
# tenant's own ``audit_monthly_cap_nanos`` is set from this when it is created).
CASCADEFLOW_AUDIT_MONTHLY_CAP_NANOS = int(
    Decimal(env.str("CASCADEFLOW_AUDIT_MONTHLY_CAP_USD", default="5")) * 10**9
)

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {"plain": {"format": "%(asctime)s %(levelname)s %(name)s %(message)s"}},
    "handlers": {"console": {"class": "logging.StreamHandler", "formatter": "plain"}},
    "root": {"handlers": ["console"], "level": env.str("DJANGO_LOG_LEVEL", default="INFO")},
    "loggers": {
        # Django's own handler would print each record a second time (DEBUG), beside root's.
        "django": {"handlers": ["console"], "level": "INFO", "propagate": False},
        "LiteLLM": {"level": "WARNING", "propagate": False},
        "httpx": {"level": "WARNING"},
    },
}

# Dashboard: a "forecast" budget alert fires when the forecast puts the chance of
# ending the period over the limit at this probability or more.
CASCADEFLOW_FORECAST_ALERT_PROBABILITY = env.float(
    "CASCADEFLOW_FORECAST_ALERT_PROBABILITY", default=0.8
)
