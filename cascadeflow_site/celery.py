import os

from celery import Celery
from celery.signals import worker_process_init

os.environ["LITELLM_LOCAL_MODEL_COST_MAP"] = "True"
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "cascadeflow_site.settings")

app = Celery("cascadeflow")
app.config_from_object("django.conf:settings", namespace="CELERY")
app.autodiscover_tasks()


@worker_process_init.connect
def _traces(**_: object) -> None:
    """Audits and other tasks are traced like requests when OTEL_* asks for it."""
    from routing import telemetry  # noqa: PLC0415 - the tracer starts in each worker process, after the fork

    telemetry.configure()
