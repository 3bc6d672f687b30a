"""The network: the GPT model, text generation, LoRA adapters and weight files (checkpoints, GPT-2 imports).

Imports only `scratchgpt.plumbing` and `scratchgpt.data`.
"""
