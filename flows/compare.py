"""Compare the runs of an experiment, as a Prefect flow: one table of key params and metrics, one figure.

    python -m flows.compare --experiment llm-pipeline
    python -m flows.compare --experiment llm-pipeline --filter "params.preset = 'smoke'"

The runs come from `mlflow.search_runs` (the filter is MLflow's search syntax), top-level runs only unless
`--children` (pipelines, re-scored models, champion evaluations; not their stage runs). The table holds
each run's name, stage, status and start, the key params, and every metric that some run has (system
metrics left out), one row per run, newest first. It is logged as an MLflow table (`compare.json`) on a
run of its own (tag `stage` = `compare`, which later comparisons leave out) and as a Prefect table
artifact (`compare-runs`). The figure plots validation bits per byte against tokens seen during
pretraining, one line per run: the `pretrain/val_bpb` history of the run or of its pretraining stage
run, each step times the tokens of an optimizer step (batch size x accumulation x block size, from the
params). It does not re-score anything (`python -m flows.evaluate_model` does).
"""

import argparse
import math
import sys
from typing import Any

import pandas as pd
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException
from prefect import flow
from prefect.artifacts import create_table_artifact

from flows.stages import EXPERIMENT
from llmcore.errors import ConfigError
from tasks.tracking import configure_tracking, mlflow_run

KEY_PARAMS = (
    "preset",
    "corpus.source",
    "model.vocab_size",
    "model.block_size",
    "model.n_layer",
    "model.n_embd",
    "pretrain.max_steps",
    "pretrain.batch_size",
    "pretrain.learning_rate",
    "evaluation.max_tokens",
)
CURVE = "pretrain/val_bpb"  # logged at every validation pass of pretraining (llmcore/train.py, fit)


def find_runs(experiment: str, filter_string: str = "", children: bool = False) -> pd.DataFrame:
    """The experiment's runs matching the filter, newest first; a missing experiment or a filter MLflow
    refuses is a one-line ConfigError."""
    client = MlflowClient()
    found = client.get_experiment_by_name(experiment)
    if found is None:
        known = [e.name for e in client.search_experiments(max_results=50)]
        raise ConfigError(
            f"no MLflow experiment {experiment!r}: pass --experiment one of "
            f"{', '.join(known) or '(none yet)'}"
        )
    try:
        runs = client.search_runs(
            [found.experiment_id],
            filter_string,
            max_results=1000,
            order_by=["attributes.start_time DESC"],
        )
    except MlflowException as error:
        raise ConfigError(
            f"MLflow refused the filter {filter_string!r} ({str(error).splitlines()[0][:120]}): pass "
            "--filter in MLflow's search syntax, e.g. \"params.preset = 'smoke'\""
        ) from None
    return pd.DataFrame(
        [
            {
                "run_id": r.info.run_id,
                "run_name": r.info.run_name,
                "stage": r.data.tags.get("stage", ""),
                "status": r.info.status,
                "start": pd.Timestamp(r.info.start_time, unit="ms").strftime("%Y-%m-%d %H:%M"),
                **{k: r.data.params[k] for k in KEY_PARAMS if k in r.data.params},
                **{k: v for k, v in sorted(r.data.metrics.items()) if not k.startswith("system/")},
            }
            for r in runs
            if r.data.tags.get("stage") != "compare" and (children or "mlflow.parentRunId" not in r.data.tags)
        ]
    )


def _curve_run(client: MlflowClient, run) -> Any:
    """The run itself if it logged the pretraining curve, else its pretraining stage run, else None."""
    if CURVE in run.data.metrics:
        return run
    stages = client.search_runs(
        [run.info.experiment_id],
        f"tags.mlflow.parentRunId = '{run.info.run_id}' and tags.stage = 'pretrain'",
        max_results=1,
    )
    return stages[0] if stages and CURVE in stages[0].data.metrics else None


def bpb_curves(run_ids: list[str]) -> dict[str, pd.DataFrame]:
    """Run name -> (tokens, val_bpb) of the pretraining behind each run that has one."""
    client = MlflowClient()
    curves = {}
    for run_id in run_ids:
        run = client.get_run(run_id)
        source = _curve_run(client, run)
        params = source.data.params if source is not None else {}
        if source is None or not {"pretrain.batch_size", "model.block_size"} <= set(params):
            continue
        tokens_per_step = (
            int(params["pretrain.batch_size"])
            * int(params.get("pretrain.grad_accum_steps", 1))
            * int(params["model.block_size"])
        )
        history = client.get_metric_history(source.info.run_id, CURVE)
        curves[f"{run.info.run_name} ({run_id[:6]})"] = pd.DataFrame(
            {"tokens": [m.step * tokens_per_step for m in history], "val_bpb": [m.value for m in history]}
        )
    return curves


def bpb_figure(curves: dict[str, pd.DataFrame]):
    """One line per run; a bare Figure (no pyplot, so no display and no global figure to close)."""
    from matplotlib.figure import Figure

    figure = Figure(figsize=(8, 5))
    axes = figure.subplots()
    for label, curve in curves.items():
        axes.plot(curve["tokens"], curve["val_bpb"], marker="o", markersize=3, label=label)
    axes.set_xlabel("tokens seen in pretraining")
    axes.set_ylabel("validation bits per byte (lower is better)")
    axes.set_title("Validation bits per byte against tokens seen")
    axes.grid(alpha=0.3)
    if curves:
        axes.legend(fontsize=7)
    figure.tight_layout()
    return figure


def _cells(table: pd.DataFrame) -> list[dict[str, Any]]:
    """Rows for a Prefect table artifact: numbers rounded, missing values empty."""

    def cell(value: Any) -> Any:
        if isinstance(value, float):
            return "" if math.isnan(value) else round(value, 4)
        return value

    return [{k: cell(v) for k, v in row.items()} for row in table.to_dict("records")]


@flow(name="compare-runs")
def compare(experiment: str = EXPERIMENT, filter: str = "", children: bool = False) -> dict[str, Any]:
    """A table of an experiment's runs (key params, metrics) and a figure of val bits per byte vs tokens."""
    configure_tracking()
    table = find_runs(experiment, filter, children)
    if table.empty:
        raise ConfigError(
            f"no runs in experiment {experiment!r} match {filter or 'no filter'!r}"
            + ("" if children else " among top-level runs (pass --children for stage runs)")
            + ": pass another --filter or --experiment"
        )
    curves = bpb_curves(table["run_id"].tolist())
    figure = bpb_figure(curves)
    with mlflow_run(experiment, "compare", tags={"stage": "compare", "compare.filter": filter}) as run_id:
        client = MlflowClient()
        client.log_table(run_id, table, artifact_file="compare.json")
        client.log_figure(run_id, figure, "val_bpb_vs_tokens.png")
    create_table_artifact(_cells(table), key="compare-runs", description=f"Runs of {experiment}: {filter}")
    return {"run_id": run_id, "runs": len(table), "curves": list(curves), "table": table}


def main(argv: list[str] | None = None) -> None:
    from flows.cli import (
        add_debug_flag,
        add_flow_arguments,
        flow_arguments,
        require_tracking_server,
        run_command,
    )

    parser = argparse.ArgumentParser(prog="python -m flows.compare", description=__doc__.split("\n")[0])
    add_flow_arguments(parser, compare.fn)
    add_debug_flag(parser)
    args = vars(parser.parse_args(argv))
    debug = args.pop("debug")

    def run() -> None:
        kwargs = flow_arguments(compare.fn, args)
        require_tracking_server()
        configure_tracking()
        find_runs(
            kwargs.get("experiment", EXPERIMENT), kwargs.get("filter", "")
        )  # bad input: one line, early
        result = compare(**kwargs)
        with pd.option_context("display.max_columns", 12, "display.width", 160):
            print(result["table"])
        print(f"\nlogged as compare.json and val_bpb_vs_tokens.png on MLflow run {result['run_id']}")

    run_command(run, "runs", debug)


if __name__ == "__main__":
    main(sys.argv[1:])
