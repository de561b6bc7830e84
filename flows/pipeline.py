"""The whole pipeline as one Prefect flow: the six stage flows in order, as subflows.

Fine-tuning has two kinds, instruction tuning and classification (`--finetune-kind`, both by default),
each its own stage flow and child run, both full or LoRA (`--finetune-method`).
It opens a parent MLflow run (tagged with the Prefect flow run id) in one experiment per pipeline
name; each stage flow opens a child run. The Prefect flow runs and MLflow runs are named alike:
`pipeline-<label>` and `<stage>-<label>`, the label being preset, corpus and a digest of every config.
Stages exchange paths and run ids. At the end it prints a summary (stage, wall time, key metric) and
how to open the MLflow UI.

    python -m flows.pipeline --preset smoke
    python -m flows.pipeline --preset cpu --corpus 'docs/**/*.md' --vocab-size 8192 --device cpu
"""

import argparse
import inspect
import logging
import os
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any, Literal

import torch
from prefect import flow
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.runtime import flow_run
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from flows.classify import classify_flow
from flows.cli import add_debug_flag, require_tracking_server, run_command
from flows.runners import RunnerName, task_runner_for
from flows.stages import (
    EXPERIMENT,
    RUNS_DIR,
    corpus_flow,
    evaluate_flow,
    finetune_flow,
    pretrain_flow,
    sample_flow,
    tokenizer_flow,
)
from llmcore.adapters import require_targets
from llmcore.artifacts import MANIFEST, json_digest, read_json
from llmcore.classify import CORPUS, check_default_task, load_texts, require_one_choice_of_weights
from llmcore.cli import add_flag
from llmcore.completions import held_out_prompts
from llmcore.corpus import CorpusConfig, describe_source, source_bytes
from llmcore.device import resolve_device
from llmcore.distributed import Context, LaunchConfig, local_rows
from llmcore.errors import ConfigError
from llmcore.evaluate import cloze_set
from llmcore.memory import require_fits
from llmcore.model import GPT
from llmcore.multiple_choice import read_items
from llmcore.presets import PRESETS, Preset, get_preset, with_vocab_size
from llmcore.tracking import MlflowTracker
from tasks.registry import PROMOTION_METRICS, Candidate, PromotionMetric, register_and_promote
from tasks.stages import build_sft_data
from tasks.tracking import configure_tracking, experiment_id, mlflow_run

log = logging.getLogger("llmcore.pipeline")


PresetName = Literal[tuple(PRESETS)]  # a choice in the Prefect UI and the deployment schema
FinetuneKind = Literal["instruct", "classify", "both"]


def finetune_kinds(kind: str) -> tuple[str, ...]:
    """The fine-tuning stages a --finetune-kind runs."""
    return ("instruct", "classify") if kind == "both" else (kind,)


class PipelineParams(BaseModel):
    """What a user turns: a preset, the data, and overrides of the preset's most used knobs.

    The single place the pipeline's parameters are declared: the command line has one flag per field and
    the flow one top-level parameter per field (so a deployment run's overrides merge key by key with
    the deployment's defaults). Unknown names and ill-typed values are one-line ConfigErrors.
    """

    model_config = ConfigDict(extra="forbid")

    preset: PresetName = Field("smoke", description=f"one of {', '.join(PRESETS)}")
    corpus: str | None = Field(None, description="stdlib, a file, folder or glob, or hf:NAME")
    text_column: str | None = Field(None, description="text column of jsonl/csv/parquet/HF data")
    max_corpus_bytes: int | None = Field(None, description="keep at most this many bytes of the corpus")
    hf_config: str | None = Field(None, description="configuration of an hf: corpus")
    hf_split: str | None = Field(None, description="split of an hf: corpus (default: train)")
    hf_revision: str | None = Field(
        None, description="pinned revision (commit sha, tag, branch) of an hf: corpus"
    )
    sft_data: str | None = Field(
        None, description="fine-tuning pairs: docstrings, a jsonl/csv/parquet file, or hf:NAME"
    )
    sft_hf_config: str | None = Field(None, description="configuration of hf: fine-tuning pairs")
    sft_hf_split: str | None = Field(None, description="split of hf: fine-tuning pairs (default: train)")
    sft_hf_revision: str | None = Field(
        None, description="pinned revision (commit sha, tag, branch) of hf: fine-tuning pairs"
    )
    experiment: str = Field(EXPERIMENT, description="MLflow experiment name")
    runs_dir: str = Field(RUNS_DIR, description="output folder for every stage's artifacts")
    vocab_size: int | None = Field(None, description="tokenizer and model vocabulary")
    block_size: int | None = Field(None, description="model context length in tokens")
    n_layer: int | None = Field(None, description="transformer blocks")
    n_head: int | None = Field(None, description="attention heads")
    n_embd: int | None = Field(None, description="model width")
    max_steps: int | None = Field(None, description="pretraining optimizer steps")
    max_tokens: int | None = Field(None, description="pretraining token budget (overrides --max-steps)")
    batch_size: int | None = Field(
        None, description="sequences per micro-batch (pretraining and fine-tuning)"
    )
    learning_rate: float | None = Field(None, description="peak pretraining learning rate")
    warmup_steps: int | None = Field(None, description="pretraining steps of linear learning-rate warmup")
    optimizer: Literal["adamw", "muon"] | None = Field(
        None, description="pretraining optimizer: adamw, or muon for the blocks' matrices"
    )
    lr_schedule: Literal["cosine", "wsd"] | None = Field(
        None, description="pretraining learning-rate schedule: cosine, or wsd (warmup-stable-decay)"
    )
    finetune_steps: int | None = Field(None, description="fine-tuning optimizer steps (each kind)")
    group_by_length: bool | None = Field(
        None,
        description="instruction tuning batches pairs of like length: less padding (on in the cpu preset)",
    )
    max_length: int | None = Field(
        None, description="longest fine-tuning sequence or classified text, in tokens (<= block size)"
    )
    finetune_kind: FinetuneKind = Field(
        "both", description="fine-tuning to run: instruct (prompt/response pairs), classify (labels), both"
    )
    finetune_method: Literal["full", "lora"] | None = Field(
        None, description="train all weights or LoRA adapters, for both kinds (default: full)"
    )
    lora_rank: int | None = Field(None, description="LoRA rank r (default 8)")
    lora_alpha: float | None = Field(None, description="LoRA scale numerator: updates are scaled by alpha/r")
    lora_dropout: float | None = Field(None, description="dropout on the LoRA input in training")
    lora_targets: str | None = Field(
        None, description="comma-separated linear layers that get adapters (default c_attn,c_proj,c_fc)"
    )
    classify_data: str | None = Field(
        None,
        description="classification texts and labels: a jsonl/csv/parquet file or hf:NAME (default: "
        "corpus, which source group of the corpus a passage comes from)",
    )
    classify_text_column: str | None = Field(None, description="text column of --classify-data")
    label_column: str | None = Field(None, description="label column of --classify-data (default: label)")
    classify_hf_config: str | None = Field(None, description="configuration of an hf: --classify-data")
    classify_hf_split: str | None = Field(None, description="split of an hf: --classify-data")
    class_weights: bool | None = Field(
        None, description="weight the classification loss inversely to class frequency"
    )
    freeze_trunk: bool | None = Field(
        None, description="classification trains its head only (a linear probe on the pretrained model)"
    )
    max_classes: int | None = Field(
        None, description="default classification task: the most frequent source groups kept (rest: other)"
    )
    passage_chars: int | None = Field(
        None, description="default classification task: passages of whole lines up to this many characters"
    )
    device: str | None = Field(None, description="auto, cpu, cuda or cuda:N")
    precision: Literal["auto", "fp32", "bf16", "fp16"] | None = Field(
        None,
        description="training arithmetic: auto (bf16 on CUDA, fp16 with gradient scaling on GPUs without "
        "bf16, fp32 on CPU), fp32, bf16 or fp16",
    )
    compile: bool | None = Field(None, description="torch.compile the training step (default: on CUDA only)")
    activation_checkpointing: bool | None = Field(
        None, description="recompute activations in the backward pass: less memory, more compute"
    )
    seed: int | None = Field(None, description="seed for model init, data order and sampling")
    registry_prefix: str | None = Field(
        None,
        description="registered models are PREFIX-pretrained, "
        "PREFIX-instruct and PREFIX-classifier (default: the experiment name)",
    )
    cloze_data: str | None = Field(
        None,
        description="jsonl of {context, choices, answer} for the cloze evaluation (default: held-out lines)",
    )
    nproc_per_node: int = Field(
        1, description="training processes per machine; more than 1 trains under torchrun (DDP)"
    )
    nnodes: int = Field(
        1, description="machines training together (start the logged torchrun line on the others)"
    )
    rdzv_endpoint: str | None = Field(None, description="torchrun rendezvous HOST:PORT, for --nnodes > 1")
    fsdp: bool | None = Field(None, description="under torchrun: shard the model with FSDP2 instead of DDP")
    task_runner: RunnerName = Field(
        "local", description="where per-part data tasks run: local (all cores) or ray (prefect-ray)"
    )
    ray_address: str | None = Field(
        None, description="Ray cluster for --task-runner ray (ray://HOST:10001, auto); none: start one"
    )
    promotion_metric: PromotionMetric = Field(
        "bpb",
        description="held-out metric that gates the champion alias: "
        + ", ".join(f"{k} ({v} is better)" for k, v in PROMOTION_METRICS.items()),
    )

    def __init__(self, **values: Any):
        try:
            super().__init__(**values)
        except ValidationError as error:
            raise ConfigError(_one_line(error)) from None

    def build(self) -> Preset:
        """The preset with this run's overrides applied; every config validated on the way."""
        preset = get_preset(self.preset)
        corpus = replace(
            preset.corpus,
            **_set(
                source=self.corpus,
                text_column=self.text_column,
                max_bytes=self.max_corpus_bytes,
                hf_config=self.hf_config,
                hf_split=self.hf_split,
                hf_revision=self.hf_revision,
            ),
        )
        sft_data = replace(
            preset.sft_data,
            **_set(
                source=self.sft_data,
                hf_config=self.sft_hf_config,
                hf_split=self.sft_hf_split,
                hf_revision=self.sft_hf_revision,
            ),
        )
        if self.vocab_size is not None:
            preset = with_vocab_size(preset, self.vocab_size)
        model = replace(
            preset.model,
            **_set(block_size=self.block_size, n_layer=self.n_layer, n_head=self.n_head, n_embd=self.n_embd),
        )
        shared = _set(
            batch_size=self.batch_size,
            device=self.device,
            seed=self.seed,
            precision=self.precision,
            compile=self.compile,
            activation_checkpointing=self.activation_checkpointing,
            fsdp=self.fsdp,
        )
        pretrain = replace(
            preset.pretrain,
            **shared,
            **_set(
                max_steps=self.max_steps,
                max_tokens=self.max_tokens,
                learning_rate=self.learning_rate,
                warmup_steps=self.warmup_steps,
                optimizer=self.optimizer,
                lr_schedule=self.lr_schedule,
            ),
        )
        finetune = replace(
            preset.finetune,
            **shared,
            **_set(max_steps=self.finetune_steps, group_by_length=self.group_by_length),
        )
        classify_train = replace(preset.classify_train, **shared, **_set(max_steps=self.finetune_steps))
        adapter = replace(
            preset.adapter,
            **_set(
                finetune_method=self.finetune_method,
                lora_rank=self.lora_rank,
                lora_alpha=self.lora_alpha,
                lora_dropout=self.lora_dropout,
                lora_targets=self.lora_targets,
            ),
        )
        classify_data = replace(
            preset.classify_data,
            **_set(
                classify_data=self.classify_data,
                classify_text_column=self.classify_text_column,
                label_column=self.label_column,
                classify_hf_config=self.classify_hf_config,
                classify_hf_split=self.classify_hf_split,
                max_classes=self.max_classes,
                passage_chars=self.passage_chars,
            ),
        )
        if self.max_length is not None and not 0 < self.max_length <= model.block_size:
            raise ConfigError(
                f"context length {self.max_length} does not fit the model, which supports "
                f"1..{model.block_size}: pass --max-length <= {model.block_size} or a larger --block-size"
            )
        for config in (pretrain, finetune):  # each process trains an equal share of every batch
            local_rows(Context(world_size=self.launch().world_size), config.batch_size)
        classify = replace(
            preset.classify,
            **_set(
                class_weights=self.class_weights, max_length=self.max_length, freeze_trunk=self.freeze_trunk
            ),
        )
        return replace(
            preset,
            corpus=corpus,
            sft_data=sft_data,
            model=model,
            pretrain=pretrain,
            finetune=finetune,
            classify_train=classify_train,
            adapter=adapter,
            classify_data=classify_data,
            classify=classify,
            evaluation=replace(preset.evaluation, **_set(device=self.device, cloze_data=self.cloze_data)),
            sampling=replace(preset.sampling, **_set(seed=self.seed)),
        )

    def launch(self) -> LaunchConfig:
        """How pretraining and fine-tuning run: in this process, or under torchrun."""
        return LaunchConfig(self.nnodes, self.nproc_per_node, self.rdzv_endpoint)


def _one_line(error: ValidationError) -> str:
    """The first problem of a validation error as one line naming the parameter, its flag and the fix."""
    first = error.errors()[0]
    name = ".".join(map(str, first["loc"])) or "parameters"
    if first["type"] == "extra_forbidden":
        return f"unknown pipeline parameter {name!r}: pass one of {', '.join(PipelineParams.model_fields)}"
    if name == "preset":
        return (
            f"unknown preset {first['input']!r}: pass --preset (parameter preset) one of {', '.join(PRESETS)}"
        )
    return (
        f"pipeline parameter {name} = {first['input']!r}: {first['msg']}: pass --{name.replace('_', '-')} "
        f"(parameter {name}) with a valid value"
    )


def _set(**values: Any) -> dict[str, Any]:
    """Only the overrides the user actually gave."""
    return {k: v for k, v in values.items() if v is not None}


def run_label(preset: Preset) -> str:
    """`<preset>-<corpus short name>-<digest of all configs>`: tells runs apart in both UIs."""
    source = preset.corpus.source.rstrip("/")
    corpus = (
        source
        if preset.corpus.kind == "stdlib"
        else Path(source.removeprefix("hf:").split("*")[0].rstrip("/")).name
    )
    corpus = "".join(c if c.isalnum() or c in "._" else "-" for c in corpus).strip("-")[:24] or "corpus"
    return f"{preset.name}-{corpus}-{json_digest(asdict(preset))[:6]}"


def _pipeline_run_name() -> str:
    return "pipeline-" + run_label(PipelineParams(**flow_run.parameters).build())


def _pipeline(**values: Any) -> list[dict[str, Any]]:
    """Corpus -> tokenizer -> pretraining -> fine-tuning -> evaluation -> sampling, tracked in MLflow;
    then the models are registered and the champion alias is gated."""
    params = PipelineParams(**values)
    preset = params.build()
    configure_tracking()
    experiment_id(params.experiment)  # create the experiment once, before any stage races for it
    runs, experiment = params.runs_dir, params.experiment
    summary: list[dict[str, Any]] = []

    def timed(stage: str, call, metric):
        started = time.perf_counter()
        result = call()
        seconds = time.perf_counter() - started
        name, value = metric(result)
        summary.append({"stage": stage, "seconds": round(seconds, 1), "metric": name, "value": value})
        tracker.log_metrics({f"pipeline/seconds_{stage}": seconds})
        log.info("pipeline: %s done in %.1f s (%s = %s)", stage, seconds, name, value)
        return result

    label = run_label(preset)
    with mlflow_run(
        experiment,
        f"pipeline-{label}",
        tags={"preset": preset.name, "stage": "pipeline", "corpus": describe_source(preset.corpus)},
    ) as parent:
        tracker = MlflowTracker(parent, relative_to=Path(runs))
        tracker.log_params(
            {
                "preset": preset.name,
                **{k: asdict(v) for k, v in vars(preset).items() if hasattr(v, "__dataclass_fields__")},
            }
        )
        common = {"runs_dir": runs, "experiment": experiment, "parent_run_id": parent, "run_label": label}
        corpus_dir = timed(
            "corpus",
            lambda: corpus_flow(
                preset.corpus, **common, task_runner=params.task_runner, ray_address=params.ray_address
            ),
            lambda d: ("documents", read_json(Path(d) / MANIFEST)["counts"]["documents"]),
        )
        skipped = check_derived_inputs(
            preset,
            corpus_dir,
            runs,
            sft_data_given=params.sft_data is not None,
            kinds=finetune_kinds(params.finetune_kind),
        )
        tok = timed(
            "tokenizer",
            lambda: tokenizer_flow(
                corpus_dir,
                preset.tokenizer,
                **common,
                task_runner=params.task_runner,
                ray_address=params.ray_address,
            ),
            lambda r: (
                "bytes_per_token",
                round(read_json(Path(r["tokenizer_dir"]) / MANIFEST)["bytes_per_token"], 3),
            ),
        )
        vocab = read_json(Path(tok["tokenizer_dir"]) / MANIFEST)["vocab_size"]
        if vocab != preset.model.vocab_size:  # a tokenizer that fitted its vocabulary to the corpus
            log.info(
                "pipeline: the corpus fills a vocabulary of %d, not %d: the model uses %d too",
                vocab,
                preset.model.vocab_size,
                vocab,
            )
            preset = with_vocab_size(preset, vocab)
        pretrained = timed(
            "pretrain",
            lambda: pretrain_flow(
                tok["tokenizer_dir"],
                tok["tokens_dir"],
                preset.model,
                preset.pretrain,
                **common,
                launch=params.launch(),
            ),
            lambda m: ("val_bpb", round(read_json(Path(m).parent / MANIFEST)["metrics"]["val_bpb"], 4)),
        )
        if "instruct" in skipped:
            tuned = {"model": None, "sft_dir": None}
            summary.append(
                {"stage": "finetune", "seconds": 0.0, "metric": "skipped", "value": skipped["instruct"]}
            )
        else:
            tuned = timed(
                "finetune",
                lambda: finetune_flow(
                    pretrained,
                    tok["tokenizer_dir"],
                    corpus_dir,
                    preset.sft_data,
                    preset.finetune,
                    params.max_length,
                    preset.adapter,
                    **common,
                    launch=params.launch(),
                ),
                lambda r: (
                    "val_loss",
                    round(read_json(Path(r["model"]).parent / MANIFEST)["metrics"]["val_loss"], 4),
                ),
            )
        if "classify" in skipped:
            classified = {"classifier_dir": None}
            summary.append(
                {"stage": "classify", "seconds": 0.0, "metric": "skipped", "value": skipped["classify"]}
            )
        else:
            classified = timed(
                "classify",
                lambda: classify_flow(
                    pretrained,
                    tok["tokenizer_dir"],
                    corpus_dir,
                    preset.classify_data,
                    preset.classify,
                    preset.adapter,
                    preset.classify_train,
                    **common,
                ),
                lambda r: (
                    "accuracy (tfidf / majority)",
                    "{classifier_accuracy:.3f} ({tfidf_accuracy:.3f} / {majority_accuracy:.3f})".format(
                        **r["metrics"]
                    ),
                ),
            )
        common.pop("runs_dir")
        scores = timed(
            "evaluate",
            lambda: evaluate_flow(
                pretrained,
                tuned["model"],
                tok["tokenizer_dir"],
                tok["tokens_dir"],
                tuned["sft_dir"],
                preset.evaluation,
                classifier_dir=classified["classifier_dir"],
                **common,
                corpus_dir=corpus_dir,
            ),
            lambda m: ("pretrained_bpb / xz_bpb", f"{m['pretrained_bpb']:.3f} / {m['xz_bpb']:.3f}"),
        )
        timed(
            "sample",
            lambda: sample_flow(
                pretrained,
                tok["tokenizer_dir"],
                corpus_dir,
                tuned["model"],
                tuned["sft_dir"],
                preset.prompts,
                preset.sampling,
                preset.pretrain.device,
                **common,
            ),
            _sample_metric,
        )
        tracker.log_metrics(
            {f"evaluate/{k}": v for k, v in scores.items()}
        )  # headline figures, on the parent too
        candidates = [
            Candidate(
                "pretrained", "pretrained", pretrained, tok["tokenizer_dir"], _prefixed(scores, "pretrained")
            )
        ]
        if tuned and tuned.get("model"):  # fine-tuning may have been skipped
            candidates.append(
                Candidate(
                    "instruct",
                    "finetuned",
                    tuned["model"],
                    tok["tokenizer_dir"],
                    _prefixed(scores, "finetuned"),
                )
            )
        if classified["classifier_dir"]:
            candidates.append(
                Candidate(
                    "classifier",
                    "classifier",
                    str(Path(classified["classifier_dir"]) / "model.pt"),
                    tok["tokenizer_dir"],
                    _prefixed(scores, "classifier"),
                )
            )
        decisions = timed(
            "promote",
            lambda: register_and_promote(
                candidates,
                experiment_id(experiment),
                parent,
                corpus_dir,
                params.registry_prefix or experiment,
                params.promotion_metric,
                preset.evaluation,
                {"preset": preset.name, "pipeline_run_id": parent},
            ),
            lambda ds: (
                "champion",
                "; ".join(f"{d['model']}: {d['decision']}" for d in ds)
                or "unchanged (no new model: training reused)",
            ),
        )
        tracker.log_params({"promotion": {d["model"]: d["decision"] for d in decisions}})
    create_table_artifact(
        summary, key="pipeline-summary", description=f"Pipeline ({preset.name}) stage timings"
    )
    create_markdown_artifact(
        run_report(preset.name, summary, scores, decisions, parent),
        key="pipeline-report",
        description=f"Pipeline ({preset.name}): stages, metrics, promotion, MLflow links",
    )
    return summary


def check_derived_inputs(
    preset: Preset,
    corpus_dir: str,
    runs_dir: str,
    sft_data_given: bool,
    kinds: tuple[str, ...] = ("instruct", "classify"),
) -> dict[str, str]:
    """Build (or check) what the later stages derive from the corpus (instruction pairs, the default
    classification task, the cloze items, sampling prompts) before any training, so that no default can
    fail the run after pretraining. Returns the fine-tuning kinds skipped ("instruct", "classify"), each with
    why: not in `kinds`, or nothing to train on by default (one notice each). Pairs from --sft-data that
    fail raise ConfigError; labelled --classify-data was checked before Prefect started (check_inputs)."""
    held_out_prompts(Path(corpus_dir), preset.prompts)
    cloze_set(preset.evaluation, Path(corpus_dir), preset.model.block_size)  # one notice if there is none
    skipped = {kind: "not chosen (--finetune-kind)" for kind in ("instruct", "classify") if kind not in kinds}
    if "instruct" in kinds:
        try:
            build_sft_data.fn(preset.sft_data, corpus_dir, runs_dir)  # the fine-tuning stage reuses it
        except ConfigError as error:
            if sft_data_given:
                raise
            log.warning(
                "pipeline: no instruction pairs derived by default (%s); instruction tuning skipped: pass "
                "--sft-data FILE with prompt/response columns to run it",
                error,
            )
            skipped["instruct"] = f"no {preset.sft_data.source} pairs (pass --sft-data FILE)"
    if "classify" in kinds and preset.classify_data.classify_data == CORPUS:
        try:
            check_default_task(Path(corpus_dir), preset.classify_data.max_classes)
        except ConfigError as error:
            log.warning("pipeline: %s; classification skipped", error)
            skipped["classify"] = "no default task on this corpus (pass --classify-data FILE)"
    return skipped


def _sample_metric(metrics: dict[str, Any]) -> tuple[str, Any]:
    if "sample/pretrained_python_parse_rate" in metrics:
        return "python_parse_rate (pretrained)", round(metrics["sample/pretrained_python_parse_rate"], 3)
    return "completions", int(metrics["sample/num_completions"])


def _prefixed(scores: dict[str, float], model: str) -> dict[str, float]:
    return {k.removeprefix(f"{model}_"): v for k, v in scores.items() if k.startswith(f"{model}_")}


def run_report(
    preset: str,
    summary: list[dict[str, Any]],
    scores: dict[str, float],
    decisions: list[dict[str, Any]],
    parent_run_id: str,
) -> str:
    """The markdown artifact of one pipeline run: what ran, how long, what it scored, what was promoted."""
    import mlflow
    from mlflow import MlflowClient

    uri = mlflow.get_tracking_uri()
    web = uri.startswith("http")
    run = MlflowClient().get_run(parent_run_id)
    link = (
        f"[{run.info.run_name}]({uri}/#/experiments/{run.info.experiment_id}/runs/{parent_run_id})"
        if web
        else f"run `{parent_run_id}` in `{uri}`"
    )
    lines = [
        f"# Pipeline run ({preset})",
        "",
        f"MLflow: {link}",
        "",
        "| stage | seconds | key metric |",
        "|---|---|---|",
    ]
    lines += [f"| {r['stage']} | {r['seconds']} | {r['metric']} = {r['value']} |" for r in summary]
    lines += ["", "| held-out metric | value |", "|---|---|"]
    lines += [
        f"| {k} | {v:.4f} |"
        for k, v in sorted(scores.items())
        if k.endswith(("bpb", "loss", "bpb_strided", "accuracy", "cloze_chance", "macro_f1"))
    ]
    lines += ["", "## Promotion", ""]
    for d in decisions:
        model = f"[{d['model']}]({uri}/#/models/{d['model']})" if web else d["model"]
        champion = "none" if d["champion"] is None else f"v{d['champion_version']} {d['champion']:.4f}"
        lines.append(
            f"- {model}: {d['metric']} challenger v{d['version']} {d['challenger']:.4f}, "
            f"champion {champion} -> **{d['decision']}**"
        )
    return "\n".join(lines)


# The flow takes one top-level keyword parameter per PipelineParams field, with its type, default and
# description, so Prefect's schema, UI form and deployment overrides see each field on its own.
_pipeline.__signature__ = inspect.Signature(
    [
        inspect.Parameter(
            name, inspect.Parameter.KEYWORD_ONLY, default=field.default, annotation=field.annotation
        )
        for name, field in PipelineParams.model_fields.items()
    ],
    return_annotation=list[dict[str, Any]],
)
_pipeline.__doc__ += "\n\n    Args:\n" + "".join(
    f"        {name}: {field.description}\n" for name, field in PipelineParams.model_fields.items()
)
pipeline = flow(name="pipeline", flow_run_name=_pipeline_run_name)(_pipeline)


def print_summary(summary: list[dict[str, Any]], experiment: str, tracking_uri: str | None) -> None:
    print("\nstage       seconds  key metric")
    for row in summary:
        print(f"{row['stage']:<11} {row['seconds']:>7.1f}  {row['metric']} = {row['value']}")
    print(f"total       {sum(r['seconds'] for r in summary):>7.1f}")
    if tracking_uri:
        print(f"\nMLflow experiment {experiment!r} at {tracking_uri}")
        return
    print(
        f"\nMLflow experiment {experiment!r}. Open the UI with:\n"
        "  .venv/bin/mlflow server --backend-store-uri sqlite:///mlruns/mlflow.db "
        "--serve-artifacts --artifacts-destination mlruns/artifacts --host 127.0.0.1 --port 5000\n"
        "then browse http://127.0.0.1:5000"
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m flows.pipeline", description=pipeline.fn.__doc__)
    for name, field in PipelineParams.model_fields.items():
        add_flag(parser, name, field.annotation, field.default, required=False, help=field.description)
    add_debug_flag(parser)
    args = vars(parser.parse_args(argv))
    debug = args.pop("debug")
    values = {k: v for k, v in args.items() if v is not None}
    tracking_uri = os.environ.get("MLFLOW_TRACKING_URI")  # read before MLflow sets it for the local store

    def run() -> None:
        params = PipelineParams(**values)
        # every config and input, before Prefect and MLflow start
        check_inputs(params.build(), finetune_kinds(params.finetune_kind))
        task_runner_for(params.task_runner, params.ray_address)  # Ray installed when asked for
        print_summary(pipeline(**values), params.experiment, tracking_uri)

    run_command(run, values.get("runs_dir", RUNS_DIR), debug)


def check_inputs(preset: Preset, kinds: tuple[str, ...] = ("instruct", "classify")) -> None:
    """What can be checked before any work: the sources exist and can fill the vocabulary, labelled
    classification data has its columns and at least two examples of every label, LoRA targets name layers
    of the model, the devices are there, a training step fits in memory, and the MLflow server (if one is
    named) answers."""
    corpus_bytes = _corpus_bytes_at_most(preset.corpus)
    fits = preset.tokenizer.fit_vocab_to_corpus  # then the tokenizer stage sizes the vocabulary
    if corpus_bytes is not None and corpus_bytes < preset.tokenizer.vocab_size and not fits:
        raise ConfigError(
            f"corpus {preset.corpus.source} has at most {corpus_bytes} bytes, fewer than vocab_size "
            f"{preset.tokenizer.vocab_size}: pass a larger --corpus (or --max-corpus-bytes) or "
            f"--vocab-size <= {corpus_bytes}"
        )
    if preset.sft_data.kind == "file" and not Path(preset.sft_data.source).is_file():
        raise ConfigError(
            f"fine-tuning data {preset.sft_data.source} does not exist: pass --sft-data docstrings, "
            "a .jsonl/.csv/.parquet file or hf:NAME"
        )
    if preset.evaluation.cloze_data:
        read_items(Path(preset.evaluation.cloze_data))  # every item checked before any training
    if "classify" in kinds:
        require_one_choice_of_weights(preset.classify, preset.adapter)
        if preset.classify_data.classify_data != CORPUS:
            load_texts(preset.classify_data)
    if preset.adapter.finetune_method == "lora":
        with torch.device("meta"):  # layer names only: no memory, no initialisation
            require_targets(GPT(preset.model), preset.adapter.targets)
    for device in {preset.pretrain.device, preset.finetune.device, preset.evaluation.device}:
        resolve_device(device)
    for stage, config in (
        ("pretraining", preset.pretrain),
        ("fine-tuning", preset.finetune),
        ("classification", preset.classify_train),
    ):
        require_fits(
            preset.model,
            config.batch_size,
            preset.model.block_size,
            resolve_device(config.device),
            stage,
            config.activation_checkpointing,
        )
    require_tracking_server()


def _corpus_bytes_at_most(corpus: CorpusConfig) -> int | None:
    """An upper bound on the corpus's text bytes where one is cheap: --max-corpus-bytes, or the size of the
    files a local source lists; None for the stdlib and hf: sources. Checks that the source is there."""
    bounds = [b for b in (corpus.max_bytes, source_bytes(corpus)) if b is not None]
    return min(bounds, default=None)


if __name__ == "__main__":
    main(sys.argv[1:])
