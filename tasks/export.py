"""Prefect tasks for the Hugging Face export: write the folder (`llmcore.export`), log it to MLflow.

The export is cheap next to training and fully determined by its two sources, so it is not cached: a
rerun rewrites the folder atomically. Retries are for I/O only, never for bad input.
"""

from pathlib import Path

from mlflow import MlflowClient
from mlflow.exceptions import MlflowException
from prefect import task

from llmcore import export
from llmcore.errors import ConfigError
from tasks.stages import retry_unless_bad_input
from tasks.tracking import configure_tracking

ARTIFACT_PATH = "hf_export"  # the folder's place among a run's artifacts


def require_run(run_id: str) -> None:
    """Raise ConfigError unless the tracking store has this run (checked before exporting)."""
    uri = configure_tracking()  # before the client exists, or it talks to a stray ./mlflow.db
    try:
        MlflowClient().get_run(run_id)
    except MlflowException:
        raise ConfigError(
            f"no MLflow run {run_id!r} in {uri}: pass --run-id of an existing run "
            "(or none, for a run of its own)"
        ) from None


@task(name="export-hf", retries=2, retry_delay_seconds=2, retry_condition_fn=retry_unless_bad_input)
def export_hf(model_file: str, tokenizer_dir: str, out_dir: str) -> str:
    """Write the Hugging Face Llama folder for `model_file` and `tokenizer_dir` to `out_dir`; return it."""
    export.export_hf(Path(model_file), Path(tokenizer_dir), Path(out_dir))
    return out_dir


@task(name="log-hf-export", retries=2, retry_delay_seconds=2)
def log_hf_export(hf_dir: str, run_id: str) -> str:
    """Upload the folder as the run's `hf_export/` artifacts; return their URI."""
    configure_tracking()
    client = MlflowClient()
    client.log_artifacts(run_id, hf_dir, ARTIFACT_PATH)
    return f"runs:/{run_id}/{ARTIFACT_PATH}"
