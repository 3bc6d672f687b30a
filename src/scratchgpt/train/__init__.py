"""Training: the `Trainer` loop, its config, its state (seeding, RNG, data order, checkpoint files), callbacks,
the optimizer, losses, evaluation, memory settings and data parallelism.

Imports `scratchgpt.plumbing`, `.data` and `.nn`.
"""
