"""One Prefect flow per pipeline stage, each runnable ad hoc on the outputs of the stage before it.

Every stage flow opens an MLflow run (a child of the pipeline's run when `parent_run_id` is given),
calls its tasks, and returns paths (or, for evaluation and sampling, a few metrics). Parameters are
llmcore config dataclasses, so Prefect validates them and its UI renders a form. The Prefect flow run
and the MLflow run share one name, `<stage>-<run_label>` (the pipeline passes its own label; ad hoc, a
digest of the parameters).

    python -m flows.stages corpus --source stdlib
    python -m flows.stages tokenizer --corpus-dir runs/corpus/<id> --vocab-size 4096
    python -m flows.stages --help
"""

import sys
from pathlib import Path
from typing import Any

from prefect import flow, unmapped
from prefect.runtime import flow_run

from flows.runners import RunnerName, parts_in_children, task_runner_for
from llmcore.adapters import AdapterConfig
from llmcore.artifacts import is_finished, json_digest
from llmcore.completions import PromptConfig
from llmcore.corpus import CorpusConfig, IngestPart, source_bytes, source_digest
from llmcore.distributed import LaunchConfig
from llmcore.evaluate import EvalConfig
from llmcore.model import GPTConfig
from llmcore.sampling import SamplingConfig
from llmcore.sft_data import SFTDataConfig
from llmcore.tokenizer import EncodePart, TokenizerConfig
from llmcore.train import TrainConfig
from tasks import classify, stages
from tasks.tracking import mlflow_run

RUNS_DIR = "runs"
EXPERIMENT = "llm-pipeline"


def _fresh(cached_task, *args) -> str:
    """Run a cached task; if its cached result names a folder deleted since, run it again uncached."""
    folder = cached_task(*args)
    return folder if is_finished(folder) else cached_task.with_options(refresh_cache=True)(*args)


FLOW_STAGES = {
    "corpus-ingestion": "corpus",
    "corpus-reading": "read",
    "tokenizer-training": "tokenizer",
    "pretraining": "pretrain",
    "fine-tuning": "finetune",
    "classification": "classify",
    "evaluation": "evaluate",
    "generation-sampling": "sample",
    "token-encoding": "encode",
}


def stage_run_name() -> str:
    """`<stage>-<run_label>`, or `<stage>-<digest of the parameters>` ad hoc: for Prefect and MLflow alike."""
    params = dict(flow_run.parameters or {})
    label = (
        params.get("run_label") or json_digest({k: v for k, v in params.items() if k != "parent_run_id"})[:6]
    )
    return f"{FLOW_STAGES.get(flow_run.flow_name, flow_run.flow_name)}-{label}"


def _tags() -> dict[str, str]:
    return {"stage": FLOW_STAGES.get(flow_run.flow_name, "")}


@flow(name="corpus-ingestion", flow_run_name=stage_run_name)
def corpus_flow(
    config: CorpusConfig = CorpusConfig(),
    runs_dir: str = RUNS_DIR,
    experiment: str = EXPERIMENT,
    parent_run_id: str | None = None,
    run_label: str | None = None,
    task_runner: RunnerName = "local",
    ray_address: str | None = None,
) -> str:
    """Stage 1: read, decode, deduplicate and split a corpus (in parts, on a thread per local core or, with
    task_runner "ray", on the Ray cluster at ray_address: a new local one if None); returns the corpus
    folder."""
    runner = task_runner_for(task_runner, ray_address)  # a bad choice fails before any work
    with mlflow_run(experiment, stage_run_name(), parent_run_id, _tags()) as run_id:
        digest, in_children = source_digest(config), parts_in_children(task_runner, source_bytes(config))
        corpus_dir = reading_flow.with_options(task_runner=runner)(config, digest, runs_dir, in_children)
        stages.log_corpus(corpus_dir, config, run_id)
        return corpus_dir


@flow(name="corpus-reading", flow_run_name=stage_run_name)
def reading_flow(
    config: CorpusConfig, source_digest: str, runs_dir: str = RUNS_DIR, in_children: bool = False
) -> str:
    """Ingest the source: one `ingest-part` task per part of it, mapped on this flow's task runner
    (`flows.runners`) to scan the parts, then again to write them, each part in a child process of its
    own with `in_children`; returns the corpus folder."""

    def map_parts(phase: str, parts: list[IngestPart], folder: Path) -> list[dict]:
        futures = stages.ingest_part.map(
            unmapped(config), parts, unmapped(phase), unmapped(str(folder)), unmapped(in_children)
        )
        futures.wait()  # every part done before a failure removes the folder they write in
        return futures.result()

    return stages.ingest_corpus(config, source_digest, runs_dir, map_parts)


@flow(name="token-encoding", flow_run_name=stage_run_name)
def encoding_flow(corpus_dir: str, tokenizer_dir: str, runs_dir: str = RUNS_DIR) -> str:
    """Encode the corpus into token shards: one `encode-part` task per part of each split, mapped on this
    flow's task runner (`flows.runners`), then cut into shards; returns the tokens folder."""

    def map_parts(parts: list[EncodePart], files: list[Path]) -> list[dict]:
        futures = stages.encode_part.map(
            unmapped(corpus_dir), unmapped(tokenizer_dir), parts, [str(f) for f in files]
        )
        futures.wait()  # every part done before a failure removes the folder they write in
        return futures.result()

    return stages.encode_corpus(corpus_dir, tokenizer_dir, runs_dir, map_parts)


@flow(name="tokenizer-training", flow_run_name=stage_run_name)
def tokenizer_flow(
    corpus_dir: str,
    config: TokenizerConfig = TokenizerConfig(),
    runs_dir: str = RUNS_DIR,
    experiment: str = EXPERIMENT,
    parent_run_id: str | None = None,
    run_label: str | None = None,
    task_runner: RunnerName = "local",
    ray_address: str | None = None,
) -> dict[str, str]:
    """Stage 2: train a sentencepiece tokenizer and encode the corpus into token shards (in parts, on all
    local cores or, with task_runner "ray", on the Ray cluster at ray_address: a new local one if None)."""
    runner = task_runner_for(task_runner, ray_address)  # a bad choice fails before any work
    with mlflow_run(experiment, stage_run_name(), parent_run_id, _tags()) as run_id:
        tokenizer_dir = _fresh(stages.train_tokenizer, corpus_dir, config, runs_dir)
        tokens_dir = encoding_flow.with_options(task_runner=runner)(corpus_dir, tokenizer_dir, runs_dir)
        stages.log_tokenizer(tokenizer_dir, tokens_dir, config, run_id, corpus_dir)
        return {"tokenizer_dir": tokenizer_dir, "tokens_dir": tokens_dir}


@flow(name="pretraining", flow_run_name=stage_run_name)
def pretrain_flow(
    tokenizer_dir: str,
    tokens_dir: str,
    model: GPTConfig,
    config: TrainConfig = TrainConfig(),
    runs_dir: str = RUNS_DIR,
    experiment: str = EXPERIMENT,
    parent_run_id: str | None = None,
    run_label: str | None = None,
    launch: LaunchConfig = LaunchConfig(),
) -> str:
    """Stage 3: pretrain (or resume) the GPT; logs the model as an MLflow pyfunc; returns model.pt.
    `launch` with more than one process trains under torchrun."""
    with mlflow_run(experiment, stage_run_name(), parent_run_id, _tags()) as run_id:
        model_file = stages.pretrain(tokenizer_dir, tokens_dir, model, config, runs_dir, run_id, launch)
        stages.log_model(run_id, model_file, tokenizer_dir, chat=False, name="pretrained")
        return model_file


@flow(name="fine-tuning", flow_run_name=stage_run_name)
def finetune_flow(
    base_model: str,
    tokenizer_dir: str,
    corpus_dir: str,
    data: SFTDataConfig = SFTDataConfig(),
    config: TrainConfig = TrainConfig(max_steps=100),
    max_length: int | None = None,
    adapter: AdapterConfig = AdapterConfig(),
    runs_dir: str = RUNS_DIR,
    experiment: str = EXPERIMENT,
    parent_run_id: str | None = None,
    run_label: str | None = None,
    launch: LaunchConfig = LaunchConfig(),
) -> dict[str, str]:
    """Stage 4: build prompt/response pairs and fine-tune the pretrained model on them (all weights, or
    LoRA adapters merged into the saved model; under torchrun when `launch` names more than one process)."""
    with mlflow_run(experiment, stage_run_name(), parent_run_id, _tags()) as run_id:
        sft_dir = _fresh(stages.build_sft_data, data, corpus_dir, runs_dir)
        model_file = stages.finetune_model(
            base_model, tokenizer_dir, sft_dir, config, runs_dir, max_length, run_id, launch, adapter
        )
        stages.log_model(run_id, model_file, tokenizer_dir, chat=True, name="finetuned")
        return {"model": model_file, "sft_dir": sft_dir}


@flow(name="evaluation", flow_run_name=stage_run_name)
def evaluate_flow(
    pretrained: str,
    finetuned: str | None,
    tokenizer_dir: str,
    tokens_dir: str,
    sft_dir: str | None,
    config: EvalConfig = EvalConfig(),
    classifier_dir: str | None = None,
    experiment: str = EXPERIMENT,
    parent_run_id: str | None = None,
    run_label: str | None = None,
    corpus_dir: str | None = None,
) -> dict[str, float]:
    """Stage 5: held-out loss, perplexity, bits per byte (vs gzip/bz2/xz; non-overlapping and strided)
    and response-only loss (the fine-tuned model and the response loss only where instruction tuning
    ran); with the corpus folder, cloze accuracy and the contamination of every evaluation set; with a
    classifier folder (runs/classify/<id>), its held-out accuracy and macro-F1 beside the majority class and
    TF-IDF."""
    models = {"pretrained": pretrained} | ({"finetuned": finetuned} if finetuned else {})
    with mlflow_run(experiment, stage_run_name(), parent_run_id, _tags()) as run_id:
        metrics = stages.evaluate_models(
            models, tokenizer_dir, tokens_dir, sft_dir, config, run_id, corpus_dir=corpus_dir
        )
        if classifier_dir:
            metrics |= classify.log_classifier_evaluation(classifier_dir, run_id, prefix="evaluate/")
        return metrics


@flow(name="generation-sampling", flow_run_name=stage_run_name)
def sample_flow(
    pretrained: str,
    tokenizer_dir: str,
    corpus_dir: str,
    finetuned: str | None = None,
    sft_dir: str | None = None,
    prompts: PromptConfig = PromptConfig(),
    sampling: SamplingConfig = SamplingConfig(),
    device: str = "auto",
    experiment: str = EXPERIMENT,
    parent_run_id: str | None = None,
    run_label: str | None = None,
) -> dict[str, Any]:
    """Stage 6: complete held-out prompts greedily and with temperature, top-k and top-p sampling."""
    with mlflow_run(experiment, stage_run_name(), parent_run_id, _tags()) as run_id:
        return stages.sample(
            pretrained, finetuned, tokenizer_dir, corpus_dir, sft_dir, prompts, sampling, device, run_id
        )


STAGE_FLOWS = {
    "corpus": corpus_flow,
    "tokenizer": tokenizer_flow,
    "pretrain": pretrain_flow,
    "finetune": finetune_flow,
    "evaluate": evaluate_flow,
    "sample": sample_flow,
}

if __name__ == "__main__":
    from flows.cli import run_stage_cli

    run_stage_cli(STAGE_FLOWS, sys.argv[1:])
