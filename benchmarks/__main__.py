"""Run every comparison, print the table, log it as a run of the `benchmarks` MLflow experiment.

python -m benchmarks                      # all comparisons, full size (tens of minutes on 2 CPU cores)
python -m benchmarks --quick              # smaller batches, fewer repetitions, a short smoke pipeline
python -m benchmarks --only train,generation --device cuda
"""

import argparse
import os
import platform
import sys
import time

import torch

from benchmarks import Result, generation, ingestion, orchestration, train_step

COMPARISONS = ("train", "generation", "ingestion", "orchestration")


def _comparisons(quick: bool, device: str, compile_: bool) -> dict:
    """Each comparison's run, at full size or quick; the models' shapes stay those of issue 8 either way."""
    return {
        "train": lambda: train_step.run(
            train_step.TrainBench(
                device=device, compile=compile_, **(dict(batch_size=2, repetitions=3) if quick else {})
            )
        ),
        "generation": lambda: generation.run(
            generation.GenerationBench(
                device=device, **(dict(max_new_tokens=32, repetitions=3) if quick else {})
            )
        ),
        "ingestion": lambda: ingestion.run(
            ingestion.IngestionBench(**(dict(max_bytes=4_000_000, repetitions=1) if quick else {}))
        ),
        "orchestration": lambda: orchestration.run(
            orchestration.OrchestrationBench(
                **(dict(max_steps=50, finetune_steps=10, repetitions=1) if quick else {})
            )
        ),
    }


def print_table(results: list[Result]) -> None:
    rows = [r.row() for r in results]
    columns = ("comparison", "unit", "ours", "theirs", "ratio", "goal", "met")
    widths = {c: max(len(c), *(len(str(row[c])) for row in rows)) for c in columns}
    print("  ".join(c.ljust(widths[c]) for c in columns))
    for row in rows:
        print("  ".join(str(row[c]).ljust(widths[c]) for c in columns))
    print()
    for row in rows:
        print(f"- {row['comparison']}: {row['note']}")


def log_to_mlflow(results: list[Result], params: dict[str, str]) -> str:
    import pandas as pd
    from mlflow import MlflowClient

    from tasks.tracking import configure_tracking, mlflow_run

    configure_tracking()
    client = MlflowClient()
    with mlflow_run("benchmarks", f"benchmarks{'-quick' if params['quick'] == 'True' else ''}") as run_id:
        for key, value in params.items():
            client.log_param(run_id, key, value)
        for r in results:
            key = "".join(ch if ch.isalnum() else "_" for ch in r.comparison).strip("_")
            client.log_metric(run_id, f"{key}/ratio", r.ratio)
            client.log_metric(run_id, f"{key}/ours", r.ours)
            client.log_metric(run_id, f"{key}/theirs", r.theirs)
        client.log_table(run_id, pd.DataFrame([r.row() for r in results]), artifact_file="benchmarks.json")
    return run_id


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.splitlines()[0])
    parser.add_argument(
        "--quick", action="store_true", help="smaller batches, fewer repetitions, short pipeline"
    )
    parser.add_argument(
        "--only", default=",".join(COMPARISONS), help=f"comma-separated subset of {COMPARISONS}"
    )
    parser.add_argument(
        "--device",
        default="cuda" if torch.cuda.is_available() else "cpu",
        help="for the train step and generation (bf16 on cuda, fp32 on cpu)",
    )
    parser.add_argument(
        "--compile",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="torch.compile every side of the train step (default: on cuda only, as llmcore.train)",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch threads for every side, also passed to subprocesses as OMP_NUM_THREADS "
        "(default: torch's); 1 is steadier on a machine shared with other work",
    )
    parser.add_argument("--no-mlflow", action="store_true", help="print only")
    args = parser.parse_args(argv)
    chosen = [c.strip() for c in args.only.split(",") if c.strip()]
    unknown = set(chosen) - set(COMPARISONS)
    if unknown:
        sys.exit(
            f"unknown comparison(s) {sorted(unknown)}: pass --only with names from {', '.join(COMPARISONS)}"
        )
    if args.threads:
        torch.set_num_threads(args.threads)
        os.environ["OMP_NUM_THREADS"] = str(args.threads)
    compile_ = args.compile if args.compile is not None else args.device.startswith("cuda")
    runs = _comparisons(args.quick, args.device, compile_)
    results: list[Result] = []
    failed: dict[str, str] = {}
    started = time.perf_counter()
    for name in chosen:
        print(f"benchmarks: {name} ...", file=sys.stderr, flush=True)
        try:
            results += runs[name]()
        except Exception as error:  # one broken comparison must not lose the others' figures
            failed[name] = str(error).strip().splitlines()[-1] if str(error).strip() else type(error).__name__
            print(f"benchmarks: {name} failed: {error}", file=sys.stderr, flush=True)
    if results:
        print_table(results)
    for name, error in failed.items():
        print(f"- {name}: FAILED ({error})")
    params = {
        "quick": str(args.quick),
        "device": args.device,
        "compile": str(compile_),
        "threads": str(torch.get_num_threads()),
        "cores": str(len(os.sched_getaffinity(0))),
        "torch": torch.__version__,
        "machine": platform.processor() or platform.machine(),
        "seconds": f"{time.perf_counter() - started:.0f}",
    }
    if not args.no_mlflow and results:
        print(f"\nlogged as MLflow run {log_to_mlflow(results, params)} of experiment 'benchmarks'")
    if failed:
        sys.exit(f"benchmarks failed: {', '.join(failed)}")


if __name__ == "__main__":
    main()
