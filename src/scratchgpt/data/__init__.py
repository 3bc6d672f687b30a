"""The data: sources and their verifying downloader, the mirror, the corpus, the tokenizer and the datasets.

Imports only `scratchgpt.plumbing`.
"""
