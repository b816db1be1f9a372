"""Helpers for the test bed: a trained BPE tokenizer, tiny real checkpoints and a local Hugging Face hub."""
