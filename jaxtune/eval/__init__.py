"""Evaluations of a loaded checkpoint: perplexity, MMLU, GSM8K, BBH and generation statistics."""
