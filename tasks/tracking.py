"""MLflow plumbing for the flows: where the store is, one experiment per pipeline, runs by id.

The tracking URI comes from MLFLOW_TRACKING_URI and defaults to a SQLite store in `mlruns/` with
artifacts beside it (MLflow 3 refuses the old file store). Runs are created and ended through the
client by id, never through MLflow's thread-local active run, because Prefect tasks may run in worker
threads. Metric logging from inside llmcore goes through `llmcore.tracking.MlflowTracker`.
"""

import contextlib
import os
import warnings
from collections.abc import Iterator
from pathlib import Path

import mlflow
from mlflow import MlflowClient

MLRUNS = Path("mlruns")


def _local_store_uri() -> str:
    return f"sqlite:///{MLRUNS.resolve() / 'mlflow.db'}"


def configure_tracking() -> str:
    """Point MLflow at MLFLOW_TRACKING_URI, or at sqlite in ./mlruns; return the URI."""
    uri = os.environ.get("MLFLOW_TRACKING_URI") or _local_store_uri()
    if uri == _local_store_uri():
        MLRUNS.mkdir(exist_ok=True)
    mlflow.set_tracking_uri(uri)
    return uri


def experiment_id(name: str) -> str:
    """The experiment's id, creating it (artifacts under mlruns/artifacts for the local store) if new."""
    uri = configure_tracking()
    client = MlflowClient()
    found = client.get_experiment_by_name(name)
    if found is not None:
        return found.experiment_id
    location = (MLRUNS.resolve() / "artifacts").as_uri() if uri == _local_store_uri() else None
    return client.create_experiment(name, artifact_location=location)


@contextlib.contextmanager
def mlflow_run(experiment: str, name: str, parent_run_id: str | None = None, tags: dict[str, str] | None = None) -> Iterator[str]:
    """Create a run (a child when parent_run_id is given), yield its id, end it FINISHED or FAILED."""
    client = MlflowClient()
    all_tags = dict(tags or {})
    if parent_run_id:
        all_tags["mlflow.parentRunId"] = parent_run_id
    run = client.create_run(experiment_id(experiment), run_name=name, tags=all_tags)
    try:
        yield run.info.run_id
    except BaseException:
        client.set_terminated(run.info.run_id, "FAILED")
        raise
    mlflow.flush_async_logging()
    client.set_terminated(run.info.run_id, "FINISHED")


def _pinned(*packages: str) -> list[str]:
    """Requirements pinned to the versions running now (local tags such as +cpu dropped)."""
    from importlib.metadata import version

    return [f"{name}=={version(name).split('+')[0]}" for name in packages]


def log_generator_model(run_id: str, model_file: Path, tokenizer_dir: Path, chat: bool, name: str) -> str:
    """Log a pyfunc model bundling weights, tokenizer and config; return its models:/ URI.

    `mlflow.pyfunc.load_model(uri).predict(["def f(x):", ...])` then generates text in a
    fresh process with nothing else installed from this project.
    """
    import json
    import tempfile

    import llmcore
    from mlflow.models import infer_signature

    # An unnamed string column: predict takes a list of prompts, or a DataFrame (its "prompt" column).
    signature = infer_signature(["def add(a, b):"], ["    return a + b"],
                                params={"max_new_tokens": 128, "temperature": 0.8, "top_k": 0, "top_p": 1.0, "seed": 0})
    with tempfile.TemporaryDirectory() as tmp:
        config = Path(tmp) / "generator.json"
        config.write_text(json.dumps({"chat": chat}))
        # The model is logged inside the run by id; start_run here is local to this thread and call.
        with mlflow.start_run(run_id=run_id), warnings.catch_warnings():
            # An input example would run a generation at logging time; the signature describes the input.
            warnings.filterwarnings("ignore", message=".*input example", category=UserWarning)
            info = mlflow.pyfunc.log_model(
                name=name,
                python_model=str(Path(__file__).with_name("pyfunc_model.py")),
                artifacts={"model": str(model_file), "tokenizer": str(Path(tokenizer_dir) / "tokenizer.model"),
                           "config": str(config)},
                code_paths=[str(Path(llmcore.__file__).parent)],
                signature=signature,
                pip_requirements=_pinned("torch", "sentencepiece", "numpy", "pandas"),
            )
    return info.model_uri
