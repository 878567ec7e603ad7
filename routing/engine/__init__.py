"""The cascade engine: pure Python, no Django (``.importlinter``), usable alone.

LiteLLM fetches its model cost map from the network when it is imported unless told
not to; the engine says so itself, so importing it never reaches for the network
(an explicit ``LITELLM_LOCAL_MODEL_COST_MAP`` in the environment still wins).
"""

import os

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
