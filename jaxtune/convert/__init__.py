"""Checkpoint import and export: llama2.c (and, later, Hugging Face)."""
