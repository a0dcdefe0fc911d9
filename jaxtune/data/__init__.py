"""Instruction data: sources, tokenization, loss masks and packing."""
