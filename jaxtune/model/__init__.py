"""The decoder model: layers, attention, the scanned transformer, and architecture presets."""
