"""Export a trained model as a Hugging Face folder and log it to an MLflow run, as a Prefect flow.

    python -m flows.export --model runs/finetune/<id>/model.pt --tokenizer runs/tokenizer/<id> --out hf/
    python -m flows.export --model ... --tokenizer ... --run-id <MLflow run id>   # logged as hf_export/

Without `--run-id` the flow opens a run of its own in `--experiment`. Without `--out` the folder goes to
`runs/hf_export/<digest of the model and tokenizer>`.
"""

import argparse
import sys
from pathlib import Path

from prefect import flow

from llmcore.artifacts import file_digest, json_digest
from llmcore.export import check_sources
from llmcore.tokenizer import MODEL_FILE
from tasks import export
from tasks.tracking import configure_tracking, mlflow_run

RUNS_DIR = "runs"
EXPERIMENT = "llm-pipeline"


def default_out_dir(model: str, tokenizer: str, runs_dir: str = RUNS_DIR) -> str:
    """runs/hf_export/<key>: one folder per model and tokenizer content."""
    key = json_digest([file_digest(Path(model)), file_digest(Path(tokenizer) / MODEL_FILE)])[:16]
    return str(Path(runs_dir) / "hf_export" / key)


@flow(name="hf-export")
def export_flow(
    model: str,
    tokenizer: str,
    out: str | None = None,
    run_id: str | None = None,
    experiment: str = EXPERIMENT,
) -> dict[str, str]:
    """Export model.pt and its tokenizer for transformers; log the folder to the run as hf_export/."""
    check_sources(Path(model), Path(tokenizer))
    if run_id is not None:
        export.require_run(run_id)
    out = out or default_out_dir(model, tokenizer)
    hf_dir = export.export_hf(model, tokenizer, out)
    if run_id is None:
        configure_tracking()  # before mlflow_run builds its client
        with mlflow_run(experiment, "hf-export") as own_run_id:
            return {"hf_dir": hf_dir, "artifact_uri": export.log_hf_export(hf_dir, own_run_id)}
    return {"hf_dir": hf_dir, "artifact_uri": export.log_hf_export(hf_dir, run_id)}


def main(argv: list[str] | None = None) -> None:
    from flows.cli import add_debug_flag, add_flow_arguments, flow_arguments, run_command

    parser = argparse.ArgumentParser(prog="python -m flows.export", description=export_flow.fn.__doc__)
    add_flow_arguments(parser, export_flow.fn)
    add_debug_flag(parser)
    args = vars(parser.parse_args(argv))
    debug = args.pop("debug")

    def run() -> None:
        kwargs = flow_arguments(export_flow.fn, args)
        check_sources(Path(kwargs["model"]), Path(kwargs["tokenizer"]))  # one line, before Prefect starts
        if kwargs.get("run_id"):
            export.require_run(kwargs["run_id"])
        print(export_flow(**kwargs))

    run_command(run, RUNS_DIR, debug)


if __name__ == "__main__":
    main(sys.argv[1:])
