"""Prefect tasks for classification fine-tuning, thin wrappers around `llmcore.classify`.

`train_classifier` trains (or resumes, or reuses) a classifier in a folder keyed on the content of its
inputs; `log_classifier` fills an MLflow run from that folder's manifest (so a reused folder still fills
its run): parameters, metrics, the confusion matrix, the per-class table and the adapter; and
`log_classifier_model` logs the MLflow pyfunc classifier (DataFrame `text` in, `label` and `prob_<label>`
columns out).
"""

from dataclasses import asdict
from pathlib import Path

import pandas as pd
from prefect import task
from prefect.artifacts import create_table_artifact

from llmcore import classify
from llmcore.adapters import AdapterConfig
from llmcore.artifacts import MANIFEST, file_digest
from llmcore.train import TrainConfig, result_fields
from tasks.stages import _key, _manifest, tracker_for
from tasks.tracking import _pinned

HEADLINE = (
    "classifier_accuracy",
    "classifier_macro_f1",
    "majority_accuracy",
    "majority_macro_f1",
    "tfidf_accuracy",
    "tfidf_macro_f1",
)


@task(name="train-classifier", retries=0)
def train_classifier(
    base_model: str,
    tokenizer_dir: str,
    corpus_dir: str | None,
    data: classify.ClassifyDataConfig,
    config: classify.ClassifyConfig,
    adapter: AdapterConfig,
    train: TrainConfig,
    runs_dir: str,
    run_id: str | None = None,
) -> str:
    """Fine-tune and score a classifier in runs/classify/<key>; returns that folder."""
    texts = classify.load_texts(data, Path(corpus_dir) if corpus_dir else None)
    out = (
        Path(runs_dir)
        / "classify"
        / _key(
            file_digest(Path(base_model)),
            texts.digest(),
            asdict(config),
            asdict(adapter),
            result_fields(train),
        )
    )
    classify.train_classifier(
        Path(base_model), Path(tokenizer_dir), texts, config, adapter, train, out, tracker_for(run_id)
    )
    return str(out)


def log_classifier(out_dir: str, run_id: str | None) -> dict[str, float]:
    """Log a finished classifier folder to the run; return the headline metrics (see HEADLINE)."""
    manifest, tracker = _manifest(out_dir, "classify"), tracker_for(run_id)
    tracker.log_params(
        {
            "classify": manifest["classify_config"],
            "adapter": manifest["adapter_config"],
            "classify_train": manifest["train_config"],
            "classify_data": manifest["data"],
            "classify_labels": ",".join(manifest["labels"]),
        }
    )
    tracker.log_metrics(manifest["metrics"])
    for name in ("confusion.png", MANIFEST):
        tracker.log_artifact(Path(out_dir) / name, "classify")
    if manifest["adapter"]:
        tracker.log_artifact(Path(out_dir) / manifest["adapter"], "classify/adapter")
    per_class = pd.DataFrame(manifest["per_class"])
    if run_id:
        from mlflow import MlflowClient

        MlflowClient().log_table(run_id, per_class, artifact_file="classify/per_class.json")
    metrics = manifest["metrics"]
    rows = [
        {
            "method": name,
            "accuracy": round(metrics[f"{name}_accuracy"], 4),
            "macro_f1": round(metrics[f"{name}_macro_f1"], 4),
        }
        for name in ("classifier", "tfidf", "majority")
    ]
    create_table_artifact(
        rows, key="classification", description=f"Held-out classification: {manifest['data']}"
    )
    create_table_artifact(
        per_class.round(4).to_dict("records"),
        key="classification-per-class",
        description="Classifier precision/recall/F1 per class, with train and held-out counts",
    )
    return {key: metrics[key] for key in HEADLINE}


@task(name="log-classifier-model", retries=2, retry_delay_seconds=2)
def log_classifier_model(run_id: str, model_file: str, tokenizer_dir: str, name: str = "classifier") -> str:
    """Log the classifier as an MLflow pyfunc model; return its models:/ URI."""
    import warnings

    import mlflow
    from mlflow.models import infer_signature

    import llmcore

    _, labels, _ = classify.load_classifier(Path(model_file))
    output = pd.DataFrame(
        {"label": [labels[0]], **{f"prob_{label}": [1.0 / len(labels)] for label in labels}}
    )
    signature = infer_signature(pd.DataFrame({"text": ["def add(a, b):"]}), output)
    with mlflow.start_run(run_id=run_id), warnings.catch_warnings():  # this thread's run, by id
        warnings.filterwarnings("ignore", message=".*input example", category=UserWarning)
        info = mlflow.pyfunc.log_model(
            name=name,
            python_model=str(Path(__file__).with_name("pyfunc_classifier.py")),
            artifacts={"model": str(model_file), "tokenizer": str(Path(tokenizer_dir) / "tokenizer.model")},
            code_paths=[str(Path(llmcore.__file__).parent)],
            signature=signature,
            pip_requirements=_pinned("torch", "sentencepiece", "numpy", "pandas"),
        )
    return info.model_uri
