"""Checkpoint import and export: llama2.c, Hugging Face (safetensors), GQA/MQA uptraining."""
