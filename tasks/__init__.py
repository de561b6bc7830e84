"""Prefect tasks: thin typed wrappers around llmcore functions that add caching, retries, MLflow logging
and Prefect artifacts. Tasks exchange paths and MLflow run ids, never tensors or models."""
