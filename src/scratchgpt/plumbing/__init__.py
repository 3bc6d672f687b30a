"""Plumbing every other part uses: params sections, command lines, atomic files, progress bars, plots, MLflow tracking.

Imports nothing else of scratchgpt (the package layers: plumbing < data < nn < train < apps < pipeline <
the top-level modules; tests/test_layout.py checks it).
"""
