"""Prefect tasks for classification fine-tuning, thin wrappers around `llmcore.classify`.

`train_classifier` trains (or resumes, or reuses) a classifier in a folder keyed on the content of its
inputs. Two functions fill MLflow runs from that folder's manifest (so a reused folder still fills its
runs): `log_classifier` the training record (parameters, step and parameter-count metrics, the adapter),
`log_classifier_evaluation` the held-out report (accuracy and macro-F1 beside the majority class and
TF-IDF, class imbalance, the confusion matrix, the per-class table), on the classification run and, in the
pipeline, on the evaluate run too. `log_classifier_model` logs the MLflow pyfunc classifier (DataFrame
`text` in, `label` and `prob_<label>` columns out).
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
from tasks.stages import TRAINING_TIMEOUT_S, _key, _manifest, gpu_slot, tracker_for
from tasks.tracking import MODEL_DIGEST_TAG, _pinned, model_digest, record_or_link, reuse_logged_model

HEADLINE = (
    "classifier_accuracy",
    "classifier_macro_f1",
    "majority_accuracy",
    "majority_macro_f1",
    "tfidf_accuracy",
    "tfidf_macro_f1",
)
# The held-out report: the headline figures and the class imbalance they are read against.
IMBALANCE = {
    "classify/imbalance_ratio": "classify_imbalance_ratio",
    "classify/validation_majority_share": "classify_validation_majority_share",
}


@task(name="train-classifier", retries=0, timeout_seconds=TRAINING_TIMEOUT_S)
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
    with gpu_slot():
        classify.train_classifier(
            Path(base_model), Path(tokenizer_dir), texts, config, adapter, train, out, tracker_for(run_id)
        )
    record_or_link(out, run_id, "classify")
    return str(out)


def log_classifier(out_dir: str, run_id: str | None) -> None:
    """Log the training record of a finished classifier folder to the run."""
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
    report = {*HEADLINE, *IMBALANCE}
    tracker.log_metrics({k: v for k, v in manifest["metrics"].items() if k not in report})
    tracker.log_artifact(Path(out_dir) / MANIFEST, "classify")
    if manifest["adapter"]:
        tracker.log_artifact(Path(out_dir) / manifest["adapter"], "classify/adapter")


def log_classifier_evaluation(out_dir: str, run_id: str | None, prefix: str = "") -> dict[str, float]:
    """Log the held-out report of a finished classifier folder to the run, metric keys prefixed with
    `prefix`; return it unprefixed: HEADLINE and `classify_imbalance_ratio` (largest over smallest training
    class), `classify_validation_majority_share`."""
    manifest, tracker = _manifest(out_dir, "classify"), tracker_for(run_id)
    metrics = manifest["metrics"]
    report = {k: metrics[k] for k in HEADLINE} | {new: metrics[old] for old, new in IMBALANCE.items()}
    tracker.log_metrics({prefix + k: v for k, v in report.items()})
    tracker.log_artifact(Path(out_dir) / "confusion.png", "classify")
    per_class = pd.DataFrame(manifest["per_class"])
    if run_id:
        from mlflow import MlflowClient

        MlflowClient().log_table(run_id, per_class, artifact_file="classify/per_class.json")
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
    return report


@task(name="log-classifier-model", retries=2, retry_delay_seconds=2)
def log_classifier_model(run_id: str, model_file: str, tokenizer_dir: str, name: str = "classifier") -> str:
    """Log the classifier as an MLflow pyfunc model; return its models:/ URI. A classifier logged before
    in the experiment (same weights and tokenizer) is not stored again: the run is linked to it."""
    import warnings

    import mlflow
    from mlflow.models import infer_signature

    import llmcore

    digest = model_digest(Path(model_file), Path(tokenizer_dir), "classifier", name)
    reused = reuse_logged_model(run_id, digest, name)
    if reused:
        return reused
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
            tags={MODEL_DIGEST_TAG: digest},
        )
    return info.model_uri
