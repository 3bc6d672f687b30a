"""What users run on a trained model: the spam classifier, chat, instruction answering and the MLflow
pyfunc models that serve them.

Imports everything below it (`plumbing`, `data`, `nn`, `train`), never `pipeline`.
"""
