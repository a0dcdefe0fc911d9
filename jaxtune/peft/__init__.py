"""Parameter-efficient fine-tuning and embedding transforms (NEFTune)."""
