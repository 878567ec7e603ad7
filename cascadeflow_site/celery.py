import os

from celery import Celery

os.environ["LITELLM_LOCAL_MODEL_COST_MAP"] = "True"
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "cascadeflow_site.settings")

app = Celery("cascadeflow")
app.config_from_object("django.conf:settings", namespace="CELERY")
app.autodiscover_tasks()
