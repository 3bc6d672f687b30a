"""scratchgpt: a GPT-2-style language model built from scratch, as a reproducible pipeline."""

__version__ = "0.1.0"
