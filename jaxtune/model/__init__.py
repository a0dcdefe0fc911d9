"""The decoder model: layers, projections, attention, adapters, heads, the scanned transformer,
and architecture presets."""
