"""The ``cascadeflow`` 1.2.0 package's own draft-acceptance decision, for comparison.

Runs the package's default cascade configuration (``QualityConfig.for_cascade()``,
what its ``CascadeAgent`` uses when given none) on a recorded draft:
confidence from ``ProductionConfidenceEstimator`` (token logprobs passed only
when the replay row records an answer ``logprob``), then
``WholeResponseCascade._should_accept_draft``. Network access is refused while
it runs; its optional semantic checker is not installed, as in a default install.
"""

from __future__ import annotations

import logging
import os
import socket
from contextlib import contextmanager


def provider_of(model: str) -> str:
    if model.startswith(("gpt-", "o1", "o3", "openai/")):
        return "openai"
    if "claude" in model or model.startswith("anthropic/"):
        return "anthropic"
    return "together"


@contextmanager
def no_network():
    def refuse(*args, **kwargs):
        raise RuntimeError("network disabled while evaluating the cascadeflow peer")

    saved = (socket.socket.connect, socket.socket.connect_ex, socket.create_connection)
    socket.socket.connect = refuse
    socket.socket.connect_ex = refuse
    socket.create_connection = refuse
    try:
        yield
    finally:
        socket.socket.connect, socket.socket.connect_ex, socket.create_connection = saved


class PeerCascadeflow:
    def __init__(self, cheap: str, expensive: str):
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        logging.getLogger("cascadeflow").setLevel(logging.ERROR)
        from cascadeflow.core.cascade import WholeResponseCascade
        from cascadeflow.quality import QualityConfig
        from cascadeflow.quality.confidence import ProductionConfidenceEstimator
        from cascadeflow.schema.config import ModelConfig

        self.cascade = WholeResponseCascade(
            drafter=ModelConfig(name=cheap, provider=provider_of(cheap)),
            verifier=ModelConfig(name=expensive, provider=provider_of(expensive)),
            providers={},
            quality_config=QualityConfig.for_cascade(),
            verbose=False,
        )
        self.estimator = ProductionConfidenceEstimator(provider_of(cheap))

    def accepts(self, query: str, draft: str, logprob: float | None) -> bool:
        logprobs = [float(logprob)] if logprob is not None else None
        with no_network():
            confidence = self.estimator.estimate(
                response=draft,
                query=query,
                logprobs=logprobs,
                tokens=None,
                temperature=0.7,
                finish_reason="stop",
            ).final_confidence
            accepted, _, _ = self.cascade._should_accept_draft(
                {"content": draft, "confidence": confidence}, query
            )
        return bool(accepted)


def available() -> bool:
    try:
        import cascadeflow  # noqa: F401
    except ImportError:
        return False
    return True
