"""Orchestration overhead: the smoke pipeline under Prefect + MLflow against the same llmcore stage
functions called directly in one script.

Each repetition runs, in a fresh temporary folder and a fresh process, either
`python -m flows.pipeline --preset smoke` (its own temporary Prefect server, MLflow store, pyfunc models)
or `python -m benchmarks.orchestration` (this module's `direct`: ingest, tokenizer, encode, pretrain,
SFT data, fine-tune, classify, evaluate both models with cloze and contamination, sample both models),
with the same reduced step counts; the two alternate. Wall time includes interpreter start and imports:
a user pays those too.

    python -m benchmarks.orchestration --runs-dir DIR --max-steps 50 --finetune-steps 10   # the direct side
"""

import argparse
import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path

from benchmarks import Result, interleaved
from llmcore.environment import environ_copy

ROOT = Path(__file__).parents[1]


@dataclass(frozen=True)
class OrchestrationBench:
    max_steps: int = 1000  # pretraining steps (the smoke preset's own)
    finetune_steps: int = 120  # fine-tuning steps (the smoke preset's own)
    repetitions: int = 2


def direct(runs: Path, max_steps: int, finetune_steps: int) -> None:
    """The smoke pipeline's llmcore calls, in order, without Prefect or MLflow."""
    from llmcore import (
        classify,
        completions,
        corpus,
        evaluate,
        finetune,
        sft_data,
        tokenizer,
        train,
    )
    from llmcore.presets import get_preset

    preset = get_preset("smoke")
    corpus.ingest(preset.corpus, runs / "corpus")
    tokenizer.train_tokenizer(runs / "corpus", runs / "tokenizer", preset.tokenizer)
    tokenizer.encode_corpus(runs / "corpus", runs / "tokenizer", runs / "tokens")
    train.pretrain(
        runs / "tokenizer",
        runs / "tokens",
        preset.model,
        replace(preset.pretrain, max_steps=max_steps),
        runs / "pretrain",
    )
    sft_data.build_sft_data(preset.sft_data, runs / "corpus", runs / "sft_data")
    finetune.finetune(
        runs / "pretrain" / "model.pt",
        runs / "tokenizer",
        runs / "sft_data",
        replace(preset.finetune, max_steps=finetune_steps),
        runs / "finetune",
    )
    classify.train_classifier(  # the pipeline's second kind of fine-tuning, scored with its baselines
        runs / "pretrain" / "model.pt",
        runs / "tokenizer",
        classify.load_texts(preset.classify_data, runs / "corpus"),
        preset.classify,
        preset.adapter,
        replace(preset.classify_train, max_steps=finetune_steps),
        runs / "classify",
    )
    models = {"pretrained": runs / "pretrain" / "model.pt", "finetuned": runs / "finetune" / "model.pt"}
    evaluate.evaluate_stage(
        models, runs / "tokenizer", runs / "tokens", preset.evaluation, runs / "sft_data", runs / "corpus"
    )
    device = preset.pretrain.device
    completions.complete(
        models["pretrained"],
        runs / "tokenizer",
        completions.held_out_prompts(runs / "corpus", preset.prompts),
        preset.sampling,
        device,
    )
    completions.complete(
        models["finetuned"],
        runs / "tokenizer",
        completions.held_out_instructions(runs / "sft_data", preset.prompts.num_prompts),
        preset.sampling,
        device,
        chat=True,
    )


def _run(command: list[str], scratch: Path) -> None:
    with tempfile.TemporaryDirectory(dir=scratch) as tmp:
        env = {
            **environ_copy(),
            "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
            "PREFECT_HOME": f"{tmp}/prefect",
            "PREFECT_RESULTS_LOCAL_STORAGE_PATH": f"{tmp}/prefect-results",
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            # its default 20 s is too short on a loaded machine; the wait is counted as overhead anyway
            "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "180",
        }
        env.pop("MLFLOW_TRACKING_URI", None)  # the pipeline's own local store, inside tmp
        done = subprocess.run(
            command + ["--runs-dir", f"{tmp}/runs"], cwd=tmp, env=env, capture_output=True, text=True
        )
        if done.returncode:
            raise RuntimeError(f"{' '.join(command)} failed:\n{done.stdout[-2000:]}{done.stderr[-2000:]}")


def run(bench: OrchestrationBench) -> list[Result]:
    steps = ["--max-steps", str(bench.max_steps), "--finetune-steps", str(bench.finetune_steps)]
    with tempfile.TemporaryDirectory() as tmp:
        seconds = interleaved(
            {
                "pipeline": lambda: _run(
                    [sys.executable, "-m", "flows.pipeline", "--preset", "smoke", *steps], Path(tmp)
                ),
                "direct": lambda: _run([sys.executable, "-m", "benchmarks.orchestration", *steps], Path(tmp)),
            },
            bench.repetitions,
            warmup=0,
        )
    overhead = seconds["pipeline"] / seconds["direct"] - 1
    return [
        Result(
            "smoke pipeline vs llmcore direct",
            "runs/hour",
            3600 / seconds["pipeline"],
            3600 / seconds["direct"],
            1 / 1.15,
            f"{seconds['pipeline']:.1f} s vs {seconds['direct']:.1f} s wall: Prefect + MLflow add "
            f"{overhead:+.0%} (goal <= +15%); {bench.max_steps} pretraining + {bench.finetune_steps} "
            f"fine-tuning steps, fresh folder and process per run; median of {bench.repetitions}",
        )
    ]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.orchestration", description=direct.__doc__)
    parser.add_argument("--runs-dir", type=Path, required=True)
    parser.add_argument("--max-steps", type=int, default=OrchestrationBench.max_steps)
    parser.add_argument("--finetune-steps", type=int, default=OrchestrationBench.finetune_steps)
    args = parser.parse_args(argv)
    direct(args.runs_dir, args.max_steps, args.finetune_steps)


if __name__ == "__main__":
    main()
