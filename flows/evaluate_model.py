"""Re-score any logged model with today's evaluation, as a Prefect flow: old and new models alike.

    python -m flows.evaluate_model --model-uri models:/llm-pipeline-pretrained@champion
    python -m flows.evaluate_model --model-uri models:/llm-pipeline-instruct/3 --max-bytes 2000000
    python -m flows.evaluate_model --model-uri runs:/<run id>/pretrained
    python -m flows.evaluate_model --run-id <id of the run that logged the model>

The model's weights and tokenizer come from its logged pyfunc artifacts (loaded as tensors and data, never
as code). It is scored on the held-out text of a corpus ingested today (cached while the source is
unchanged): loss, perplexity, bits per byte and strided bits per byte (`llmcore.evaluate.score_text`),
gzip/bz2/xz on the same bytes, and the cloze accuracy of the evaluate stage (`--cloze-data`, else next
lines of held-out documents); with `--lm-eval-tasks`, also lm-evaluation-harness tasks
(`llmcore.lm_eval_adapter`). The figures go to a new MLflow run (`rescore/...`), linked to the model (its
metrics) and tagged with its source (`source.model_id`, `source.run_id`, `source.registered`), so
`python -m flows.compare` sets it beside the others. The instruction response loss is not re-scored (it
needs the fine-tuning pairs the model was trained against). A URI or run that does not exist is one line
naming what does, before Prefect starts. It does not train, register or promote.
"""

import argparse
import sys
import tempfile
from dataclasses import asdict
from pathlib import Path

import mlflow
from prefect import flow
from prefect.artifacts import create_markdown_artifact

from flows.stages import EXPERIMENT, RUNS_DIR, corpus_flow
from llmcore.baselines import compressor_bits_per_byte
from llmcore.checkpoint import load_model
from llmcore.corpus import CorpusConfig
from llmcore.device import resolve_device
from llmcore.errors import ConfigError
from llmcore.evaluate import EvalConfig, cloze_accuracy, cloze_set, held_out_text, score_text
from llmcore.tokenizer import Tokenizer
from llmcore.tracking import MlflowTracker
from tasks.logged_models import download, resolve
from tasks.registry import HELD_OUT_BYTES_PER_TOKEN
from tasks.tracking import configure_tracking, mlflow_run


def lm_eval_scores(
    model_file: Path, tokenizer_file: Path, tasks: str, include_path: str | None, config: EvalConfig
) -> dict[str, float]:
    """`lm_eval/<task>/<metric>` of the harness tasks (comma-separated names)."""
    from llmcore.lm_eval_adapter import LlmcoreLM, evaluate_tasks

    lm = LlmcoreLM.load(model_file, tokenizer_file, config.device, config.batch_size)
    names = [t.strip() for t in tasks.split(",") if t.strip()]
    scores = evaluate_tasks(lm, names, [Path(include_path)] if include_path else [])
    return {f"lm_eval/{task}/{k}": v for task, metrics in scores.items() for k, v in metrics.items()}


@flow(name="evaluate-model")
def evaluate_model(
    model_uri: str | None = None,
    run_id: str | None = None,
    corpus: CorpusConfig = CorpusConfig(),
    evaluation: EvalConfig = EvalConfig(),
    lm_eval_tasks: str | None = None,
    lm_eval_include_path: str | None = None,
    runs_dir: str = RUNS_DIR,
    experiment: str = EXPERIMENT,
) -> dict[str, float]:
    """Re-score a logged model (--model-uri or --run-id) on today's held-out text; log a linked run."""
    configure_tracking()
    source = resolve(model_uri, run_id)
    tags = {
        "stage": "rescore",
        "source.model_uri": source.requested,
        "source.model_id": source.model_id,
        "source.model_name": source.name,
        "source.run_id": source.source_run_id,
    } | ({"source.registered": source.registered} if source.registered else {})
    with mlflow_run(experiment, f"rescore-{source.name}-{source.model_id[-8:]}", tags=tags) as new_run:
        corpus_dir = corpus_flow(corpus, runs_dir, experiment, new_run)
        texts = held_out_text(Path(corpus_dir), evaluation.max_tokens * HELD_OUT_BYTES_PER_TOKEN)
        with tempfile.TemporaryDirectory() as tmp:
            model_file, tokenizer_file, chat = download(source, Path(tmp))
            scores = score_text(model_file, tokenizer_file, texts, evaluation, strided=True)
            scores |= compressor_bits_per_byte("".join(texts).encode("utf-8"))
            device = resolve_device(evaluation.device)
            model = load_model(model_file, device)
            cloze = cloze_set(evaluation, Path(corpus_dir), model.config.block_size)
            if cloze:
                tokenizer = Tokenizer.load(tokenizer_file)
                scores |= cloze_accuracy(model, tokenizer, cloze, device, evaluation.batch_size)
            if lm_eval_tasks:
                scores |= lm_eval_scores(
                    model_file, tokenizer_file, lm_eval_tasks, lm_eval_include_path, evaluation
                )
        metrics = {f"rescore/{k}": v for k, v in scores.items()}
        MlflowTracker(new_run).log_params(
            {"evaluation": asdict(evaluation), "chat": chat, "lm_eval_tasks": lm_eval_tasks}
        )
        # on the run, and on the logged model's page (MLflow 3 links metrics to a model id)
        mlflow.log_metrics(metrics, run_id=new_run, model_id=source.model_id)
    create_markdown_artifact(
        f"# {source.requested} ({source.name}, {source.uri}) on today's held-out text\n\n"
        "| metric | value |\n|---|---|\n" + "\n".join(f"| {k} | {v:.4f} |" for k, v in metrics.items()),
        key="rescore",
        description=f"{source.requested} re-scored",
    )
    return metrics


def main(argv: list[str] | None = None) -> None:
    from flows.cli import (
        add_debug_flag,
        add_flow_arguments,
        flow_arguments,
        require_tracking_server,
        run_command,
    )

    parser = argparse.ArgumentParser(
        prog="python -m flows.evaluate_model", description=__doc__.split("\n")[0]
    )
    add_flow_arguments(parser, evaluate_model.fn)
    add_debug_flag(parser)
    args = vars(parser.parse_args(argv))
    debug = args.pop("debug")

    def run() -> None:
        kwargs = flow_arguments(evaluate_model.fn, args)
        require_tracking_server()
        configure_tracking()  # before any MlflowClient exists
        resolve(kwargs.get("model_uri"), kwargs.get("run_id"))  # a bad URI is one line, before Prefect
        if kwargs.get("lm_eval_tasks"):
            try:
                import llmcore.lm_eval_adapter  # noqa: F401  (an optional extra)
            except ModuleNotFoundError as error:
                raise ConfigError(str(error)) from None
        for key, value in evaluate_model(**kwargs).items():
            print(f"{key:<40} {value:.4f}")

    run_command(run, args.get("runs_dir") or RUNS_DIR, debug)


if __name__ == "__main__":
    main(sys.argv[1:])
