"""Flows over a registered model: the weekly check of the champion, and ad-hoc sampling.

    python -m flows.champion evaluate --model-name llm-pipeline-pretrained
    python -m flows.champion sample --model-name llm-pipeline-instruct --prompts 'Open a file.'

`champion_evaluation` scores `NAME@ALIAS` on today's held-out text of a corpus (ingested again, so
new data shows; the ingestion is cached while the source is unchanged) and records the figures on an
MLflow run and as version tags. `sample_registered` completes prompts with a registered version.
Neither trains or promotes; the pipeline's promote step owns the champion alias.
"""

import sys
import tempfile
from datetime import date
from pathlib import Path
from typing import Any

from mlflow import MlflowClient
from prefect import flow
from prefect.artifacts import create_markdown_artifact, create_table_artifact

from flows.stages import EXPERIMENT, RUNS_DIR, _tags, corpus_flow
from llmcore.completions import complete
from llmcore.corpus import CorpusConfig
from llmcore.evaluate import EvalConfig, held_out_text, score_text
from llmcore.sampling import SamplingConfig
from llmcore.tracking import MlflowTracker
from tasks.registry import (
    CHAMPION,
    HELD_OUT_BYTES_PER_TOKEN,
    download_version,
    version_by_alias,
)
from tasks.tracking import configure_tracking, mlflow_run


@flow(name="champion-evaluation")
def champion_evaluation(
    model_name: str = f"{EXPERIMENT}-pretrained",
    alias: str = CHAMPION,
    corpus: CorpusConfig = CorpusConfig(),
    evaluation: EvalConfig = EvalConfig(),
    runs_dir: str = RUNS_DIR,
    experiment: str = EXPERIMENT,
) -> dict[str, float]:
    """Score a registered model (by alias) on today's held-out text of a corpus: loss, perplexity, bits per byte."""  # noqa: E501 (its first line is the CLI's subcommand help)
    configure_tracking()
    version = version_by_alias(model_name, alias)
    with mlflow_run(
        experiment,
        f"evaluate-{model_name}@{alias}",
        tags=_tags() | {"registered_model": model_name, "registered_version": str(version.version)},
    ) as run_id:
        corpus_dir = corpus_flow(corpus, runs_dir, experiment, run_id)
        with tempfile.TemporaryDirectory() as tmp:
            model_file, tokenizer_file, _ = download_version(version, Path(tmp))
            scores = score_text(
                model_file,
                tokenizer_file,
                held_out_text(Path(corpus_dir), evaluation.max_tokens * HELD_OUT_BYTES_PER_TOKEN),
                evaluation,
            )
        MlflowTracker(run_id).log_metrics({f"champion/{k}": v for k, v in scores.items()})
    today = date.today().isoformat()
    client = MlflowClient()
    for key in ("bpb", "loss"):
        client.set_model_version_tag(
            model_name, version.version, f"weekly.{today}.{key}", f"{scores[key]:.6g}"
        )
    create_markdown_artifact(
        f"# {model_name}@{alias} (v{version.version}) on held-out text, {today}\n\n"
        f"| metric | value |\n|---|---|\n" + "\n".join(f"| {k} | {v:.4f} |" for k, v in scores.items()),
        key="champion-evaluation",
        description=f"{model_name}@{alias} on today's held-out data",
    )
    return scores


@flow(name="sample-registered-model")
def sample_registered(
    model_name: str = f"{EXPERIMENT}-instruct",
    alias: str = CHAMPION,
    prompts: str | list[str] = "Return the sum of a and b.",
    sampling: SamplingConfig = SamplingConfig(max_new_tokens=64),
    device: str = "auto",
) -> list[dict[str, Any]]:
    """Complete prompts with a registered model (by alias), with every decoding strategy."""
    configure_tracking()
    version = version_by_alias(model_name, alias)
    with tempfile.TemporaryDirectory() as tmp:
        model_file, tokenizer_file, chat = download_version(version, Path(tmp))
        rows = complete(
            model_file,
            tokenizer_file,
            [prompts] if isinstance(prompts, str) else list(prompts),
            sampling,
            device,
            chat=chat,
        )
    create_table_artifact(
        rows, key="registered-samples", description=f"{model_name}@{alias} (v{version.version})"
    )
    return rows


if __name__ == "__main__":
    from flows.cli import run_stage_cli

    run_stage_cli({"evaluate": champion_evaluation, "sample": sample_registered}, sys.argv[1:])
