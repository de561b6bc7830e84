"""llmcore: the library behind llm-pipeline.

Data ingestion, tokenizer training, the GPT model, the training loop, fine-tuning, evaluation and
sampling, as plain functions over paths and small config dataclasses. It imports neither Prefect nor
MLflow (except `llmcore.tracking`, which imports MLflow only when asked for it), so every module runs by
itself: `python -m llmcore.<module> --help`.
"""
