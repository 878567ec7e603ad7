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

An embedding model (served by ``POST /v1/embeddings``, never by chat or a cascade)
says ``"mode": "embedding"`` (the default is LiteLLM's cost map's mode for the model,
else ``"chat"``), with the size of its vectors (``"dimensions"``, by default the cost
map's ``output_vector_size``) and whether a request may ask for fewer
(``"supports_dimensions": true``, as OpenAI's ``text-embedding-3-*`` do)::

    {"embed-small": {"model": "openai/text-embedding-3-small", "api_key_env": "OPENAI_API_KEY",
                     "mode": "embedding", "dimensions": 1536, "supports_dimensions": true}}
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator, Mapping
from types import MappingProxyType
from typing import Any

from routing.engine.pricing import ModelPrice, litellm_info, litellm_price
from routing.engine.types import CHAT, EMBEDDING, MODES, Deployment, ModelSpec
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
            models.extend(demo_embedding_models())
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


def demo_embedding_models() -> list[ModelSpec]:
    return [
        ModelSpec(
            name=spec.litellm_name,
            deployments=(Deployment(spec.litellm_name),),
            price=ModelPrice.per_million_usd(str(spec.input_usd_per_mtok), "0"),
            owned_by="cascadeflow-demo",
            always_allowed=True,
            mode=EMBEDDING,
            dimensions=spec.dimensions,
            supports_dimensions=True,
        )
        for spec in demo.DEMO_EMBEDDING_MODELS.values()
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
    info = litellm_info(entry["model"])
    mode = entry.get("mode") or (EMBEDDING if info.get("mode") == EMBEDDING else CHAT)
    if mode not in MODES:
        raise CatalogError(f"Model '{name}': 'mode' is one of {', '.join(MODES)}.")
    dimensions = entry.get("dimensions", info.get("output_vector_size"))
    if dimensions is not None and (
        isinstance(dimensions, bool) or not isinstance(dimensions, int) or dimensions < 1
    ):
        raise CatalogError(f"Model '{name}': 'dimensions' is a positive integer.")
    return ModelSpec(
        name=name,
        deployments=tuple(deployments),
        price=price,
        owned_by=entry.get("owned_by", entry["model"].split("/", 1)[0]),
        supports_logprobs=entry.get("supports_logprobs", mode == CHAT),
        supports_tools=entry.get("supports_tools", mode == CHAT),
        domains=frozenset(entry.get("domains") or ()),
        max_output_tokens=entry.get("max_output_tokens"),
        mode=mode,
        dimensions=dimensions if mode == EMBEDDING else None,
        supports_dimensions=bool(entry.get("supports_dimensions", False)) and mode == EMBEDDING,
    )
