"""The platform's models: the catalog built from settings (``CASCADEFLOW_MODELS``), once per
process and rebuilt when they change, and which of them a tenant may call. Its format
is ``routing.providers.catalog``'s; a tenant's own models are ``routing.tenant_models``."""

import json
from functools import lru_cache
from pathlib import Path

from django.conf import settings

from routing.engine.types import ModelSpec
from routing.providers import demo
from routing.providers.catalog import ModelCatalog


@lru_cache(maxsize=1)
def model_catalog() -> ModelCatalog:
    config = dict(settings.CASCADEFLOW_MODELS or {})
    if settings.CASCADEFLOW_MODELS_FILE:
        config.update(json.loads(Path(settings.CASCADEFLOW_MODELS_FILE).read_text()))
    return ModelCatalog.build(config)


def models_allowed(
    *, tenant_allowed: tuple[str, ...], tier_allowed: tuple[str, ...]
) -> list[ModelSpec]:
    """Demo models always; others when neither the tenant nor its plan restricts them."""
    allowed = []
    for model in model_catalog():
        if model.always_allowed or (
            (not tenant_allowed or model.name in tenant_allowed)
            and (not tier_allowed or model.name in tier_allowed)
        ):
            allowed.append(model)
    return allowed


def reset_on_setting_change(*, setting: str, **kwargs) -> None:
    if setting.startswith("CASCADEFLOW_MODELS"):
        model_catalog.cache_clear()
    if (
        setting.startswith(("CASCADEFLOW_UPSTREAM", "CASCADEFLOW_BREAKER"))
        or setting == "REDIS_URL"
    ):
        from routing.gateway import caller  # noqa: PLC0415 - routing.gateway imports this module

        caller.cache_clear()
    if setting == "CASCADEFLOW_DEMO_LATENCY_SCALE":
        value = kwargs.get("value")
        demo.latency_scale = 1.0 if value is None else value
