"""Model providers for the engine: the catalog format, the offline demo models and the
replay of recorded answers. Like the engine, no Django, and LiteLLM's cost map is the
local copy (see ``routing.engine``)."""

import os

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
