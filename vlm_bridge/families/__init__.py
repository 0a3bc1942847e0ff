"""Model families, one folder each (discovered by ``vlm_bridge.registry``)."""

# The family ``vlm-bridge demo`` runs when none is named.
DEMO_FAMILY = "qwen2_5_vl"
