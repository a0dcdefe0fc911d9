"""Parameter-efficient fine-tuning as operations on a parameter tree: the methods (what trains),
split and combine, LoRA merging, prefix and prompt conversions, banks. The layers the methods add
are the model's (`model/adapters.py`, `lora.py`, `prefix.py`)."""
