import os

# LiteLLM fetches its model price map from the network at import unless told
# otherwise. CascadeFlow always uses the map bundled with the pinned release.
os.environ["LITELLM_LOCAL_MODEL_COST_MAP"] = "True"

from .celery import app as celery_app

__all__ = ("celery_app",)
