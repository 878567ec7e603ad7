"""The models CascadeFlow can call, by the public name clients use.

A catalog entry maps a public model name to one or more *deployments*
(LiteLLM parameters: provider model, ``api_base``, key, timeout). Deployments
of one model are interchangeable: when one fails, the next is tried.

Configuration (``CASCADEFLOW_MODELS`` or the file in ``CASCADEFLOW_MODELS_FILE``)::

    {"gpt-4o-mini": {"model": "openai/gpt-4o-mini",
                      "api_key_env": "OPENAI_API_KEY",
                      "input_usd_per_mtok": 0.15, "output_usd_per_mtok": 0.60,
                      "deployments": [{"api_base": "https://eu.example/v1"}]}}

Prices default to LiteLLM's bundled cost map. Keys are read from the named
environment variable (``api_key_env``) so secrets stay out of configuration;
``api_key`` is accepted for keyless local servers and tests.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator, Mapping
from types import MappingProxyType
from typing import Any

from routing.engine.pricing import ModelPrice, litellm_price
from routing.engine.types import Deployment, ModelSpec
from routing.providers import demo

_DEPLOYMENT_KEYS = (
    "api_base",
    "api_key",
    "api_version",
    "timeout",
    "organization",
    "extra_headers",
)


class CatalogError(ValueError):
    pass


class ModelCatalog:
    def __init__(self, models: Iterable[ModelSpec]):
        self._models = {m.name: m for m in models}

    def get(self, name: str) -> ModelSpec | None:
        return self._models.get(name)

    def __iter__(self) -> Iterator[ModelSpec]:
        return iter(self._models.values())

    def __contains__(self, name: object) -> bool:
        return name in self._models

    @classmethod
    def build(
        cls, config: Mapping[str, Any] | None = None, *, include_demo: bool = True
    ) -> ModelCatalog:
        models: list[ModelSpec] = []
        if include_demo:
            demo.register()
            models.extend(demo_catalog_models())
        for name, entry in (config or {}).items():
            models.append(_model_from_config(name, entry))
        return cls(models)


def demo_catalog_models() -> list[ModelSpec]:
    return [
        ModelSpec(
            name=spec.litellm_name,
            deployments=(Deployment(spec.litellm_name),),
            price=ModelPrice.per_million_usd(
                str(spec.input_usd_per_mtok), str(spec.output_usd_per_mtok)
            ),
            owned_by="cascadeflow-demo",
            max_output_tokens=spec.max_output_tokens,
            supports_logprobs=True,
            always_allowed=True,
        )
        for spec in demo.DEMO_MODELS.values()
    ]


def _model_from_config(name: str, entry: Mapping[str, Any]) -> ModelSpec:
    if not isinstance(entry, Mapping) or not entry.get("model"):
        raise CatalogError(f"Model '{name}' needs a 'model' (the LiteLLM model name).")
    base = {k: entry[k] for k in _DEPLOYMENT_KEYS if k in entry}
    if entry.get("api_key_env"):
        base["api_key"] = os.environ.get(entry["api_key_env"], "")
    raw_deployments = entry.get("deployments") or [{}]
    deployments = []
    for raw in raw_deployments:
        params = {**base, **{k: raw[k] for k in _DEPLOYMENT_KEYS if k in raw}}
        if raw.get("api_key_env"):
            params["api_key"] = os.environ.get(raw["api_key_env"], "")
        deployments.append(Deployment(raw.get("model", entry["model"]), MappingProxyType(params)))
    if "input_usd_per_mtok" in entry or "output_usd_per_mtok" in entry:
        price = ModelPrice.per_million_usd(
            str(entry.get("input_usd_per_mtok", 0)), str(entry.get("output_usd_per_mtok", 0))
        )
    else:
        found = litellm_price(entry["model"])
        if found is None:
            raise CatalogError(
                f"Model '{name}' has no price in LiteLLM's cost map; "
                "set input_usd_per_mtok and output_usd_per_mtok."
            )
        price = found
    return ModelSpec(
        name=name,
        deployments=tuple(deployments),
        price=price,
        owned_by=entry.get("owned_by", entry["model"].split("/", 1)[0]),
        supports_logprobs=entry.get("supports_logprobs", True),
        supports_tools=entry.get("supports_tools", True),
        domains=frozenset(entry.get("domains") or ()),
        max_output_tokens=entry.get("max_output_tokens"),
    )
