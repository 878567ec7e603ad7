"""Environment the benchmarks give CascadeFlow.

Benchmark tenants start on the free plan, like every new tenant; its default
limits (a small budget, 20 requests a minute, the demo models only) would
measure the free plan, not the gateway. Empty values lift them.
"""

FREE_TIER_UNLIMITED = {
    "CASCADEFLOW_FREE_TIER_MONTHLY_BUDGET_USD": "",
    "CASCADEFLOW_FREE_TIER_RPM": "",
    "CASCADEFLOW_FREE_TIER_MODELS": "",
}
