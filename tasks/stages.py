"""One Prefect task per pipeline step, each a thin wrapper around one llmcore function.

What the wrappers add: caching on content digests (ingestion, tokenizer training and encoding are
skipped when their inputs have not changed), retries where a retry can help (file I/O) and never for
bad input or a diverged run, and Prefect table artifacts for people watching the UI. Output folders are
content-addressed under `runs_dir`, keyed only on what determines their content, so an unchanged rerun
lands in the same place and a killed training run resumes there. Every task takes and returns paths.

MLflow logging of the data stages lives in the `log_*` functions, called by the flows after the task,
so that a cached (skipped) task still fills its stage's MLflow run. Every stage folder is claimed by the
first run that logs it (`tasks.tracking.record_or_link`); a later run reusing it links to that run.
Params are named `<config>.<field>` as in the presets, metrics `<stage>/<name>` (README, "Metric keys").
"""

import contextlib
import errno
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

from prefect import get_client, get_run_logger, task
from prefect.artifacts import create_table_artifact
from prefect.concurrency.sync import concurrency
from prefect.exceptions import ObjectNotFound

from llmcore import completions, corpus, evaluate, finetune, sft_data, tokenizer, train
from llmcore.adapters import AdapterConfig
from llmcore.artifacts import MANIFEST, file_digest, is_finished, json_digest, read_json
from llmcore.distributed import LaunchConfig
from llmcore.errors import ConfigError
from llmcore.evaluate import EvalConfig
from llmcore.model import GPTConfig
from llmcore.sampling import SamplingConfig
from llmcore.shards import open_split
from llmcore.tracking import MlflowTracker, NullTracker, Tracker
from llmcore.train import TrainConfig, result_fields
from tasks import distributed
from tasks.progress import ProgressTracker
from tasks.tracking import (
    log_dataset,
    log_generator_model,
    producer_of,
    record_or_link,
    system_metrics,
)

# OSErrors that fail the same way however often they are retried.
PERMANENT_ERRNOS = {
    errno.ENOENT,
    errno.EACCES,
    errno.EPERM,
    errno.EISDIR,
    errno.ENOTDIR,
    errno.ENOSPC,
    errno.EDQUOT,
    errno.EROFS,
    errno.ELOOP,
    errno.ENAMETOOLONG,
    errno.ENOMEM,
}


def retry_unless_bad_input(task, task_run, state) -> bool:
    """Retry transient I/O failures only (an OSError such as EIO, a timeout, a dropped connection). A bad
    config, a diverged loss, a vocabulary sentencepiece refuses, out of memory, a missing, unreadable or
    corrupt file fail the same way again: retrying them would repeat minutes of work for nothing."""
    try:
        state.result()
    except OSError as error:
        return error.errno not in PERMANENT_ERRNOS
    except Exception:
        return False
    return False


def tracker_for(run_id: str | None, runs_dir: str | None = None) -> Tracker:
    """Paths under runs_dir are logged relative to it."""
    return (
        MlflowTracker(run_id, relative_to=Path(runs_dir) if runs_dir else None) if run_id else NullTracker()
    )


def _tokens_digest(tokens: dict) -> str:
    return json_digest([tokens["corpus_digest"], tokens["tokenizer_digest"]])


def _key(*parts: Any) -> str:
    return json_digest(parts)[:16]


def _cache_key(name: str, *parts: Callable[[], Any]):
    """A Prefect cache_key_fn over digests computed from the task's parameters. When an input is not
    there (a ConfigError), no key: the task then runs and raises that error in one clean line."""

    def key(context, parameters) -> str | None:
        try:
            return f"{name}-" + _key(*(part(parameters) for part in parts))
        except ConfigError:
            return None

    return key


def _reuse_or_build(
    out: Path, build: Callable[[], dict], verify: Callable[[Path], Any] | None = None
) -> dict:
    """The finished folder's manifest, or build it (llmcore writes the folder atomically).

    A finished folder whose files no longer match the digests in its manifest (`verify` raises
    ConfigError) is rebuilt, with one warning line: it holds derived data that its inputs rebuild exactly.
    """
    if is_finished(out):
        try:
            if verify is not None:
                verify(out)
            return read_json(out / MANIFEST)
        except ConfigError as error:
            get_run_logger().warning("%s; rebuilding %s", error, out)
    return build()


def _verify_tokenizer(out: Path) -> None:
    tokenizer.Tokenizer.load(out)  # checks tokenizer.model against the manifest's digest, and parses it


def _verify_tokens(out: Path) -> None:
    for split in read_json(out / MANIFEST)["splits"]:
        open_split(out, split)  # checks every shard against the manifest's size and digest


def _intact(out: Path, verify: Callable[[Path], Any]) -> str:
    """A cache-key part that raises ConfigError (so: no cache hit, the task runs and rebuilds) when the
    finished folder a cached result names was changed since it was written."""
    if is_finished(out):
        verify(out)
    return ""


def _tokenizer_out(corpus_dir: str, config: tokenizer.TokenizerConfig, runs_dir: str) -> Path:
    return Path(runs_dir) / "tokenizer" / _key(corpus.corpus_digest(corpus_dir), asdict(config))


def _tokens_out(corpus_dir: str, tokenizer_dir: str, runs_dir: str) -> Path:
    return (
        Path(runs_dir)
        / "tokens"
        / _key(corpus.corpus_digest(corpus_dir), _manifest(tokenizer_dir, "tokenizer")["tokenizer_digest"])
    )


def _manifest(folder: str | Path, stage: str) -> dict:
    if not is_finished(Path(folder)):
        raise ConfigError(f"{folder} is not a finished {stage} folder: run the {stage} stage first")
    return read_json(Path(folder) / MANIFEST)


# Training holds the "gpu" global concurrency limit (created by deployments/serve.py with limit 1), so two
# trainings never share one accelerator; without that limit (ad-hoc runs) it does not wait. A hung
# training fails after TRAINING_TIMEOUT_S instead of holding the slot forever.
GPU_SLOT = "gpu"
TRAINING_TIMEOUT_S = 24 * 3600


def gpu_slot() -> contextlib.AbstractContextManager:
    """A slot of the "gpu" limit where the server has one; nothing otherwise (Prefect's own call would
    log a warning on every training of an ad-hoc run, whose temporary server has no limits)."""
    with get_client(sync_client=True) as client:
        try:
            limit = client.read_global_concurrency_limit_by_name(GPU_SLOT)
        except ObjectNotFound:
            return contextlib.nullcontext()
    if limit.active_slots >= limit.limit:  # a wait that never ends must be explainable from the log
        get_run_logger().warning(
            "waiting for a slot of the Prefect concurrency limit %r (%d of %d in use): another training "
            "holds it; if none is running, free it with `prefect gcl update %s --active-slots 0`",
            GPU_SLOT,
            limit.active_slots,
            limit.limit,
            GPU_SLOT,
        )
    return concurrency(GPU_SLOT, occupy=1)


DATA_TASK = dict(
    persist_result=True, retries=2, retry_delay_seconds=2, retry_condition_fn=retry_unless_bad_input
)


@task(name="ingest-part", **DATA_TASK)
def ingest_part(
    config: corpus.CorpusConfig, part: corpus.IngestPart, phase: str, folder: str, in_child: bool = False
) -> dict:
    """One phase (scan or write) of ingestion over one part of the source; the flow's task runner spreads
    the parts over threads or a Ray cluster. With `in_child`, the part runs in a child interpreter, so
    that parts on threads use all cores."""
    run = corpus.ingest_part_in_child if in_child else corpus.ingest_part
    return run(config, part, phase, Path(folder))


def ingest_corpus(
    config: corpus.CorpusConfig, source_digest: str, runs_dir: str, map_parts: corpus.MapParts | None = None
) -> str:
    """The source's corpus in runs/corpus/<key of its content digest and config>: reused when finished, else
    ingested in parts by `map_parts` (the flow's `ingest-part` tasks; local processes when None)."""
    out = Path(runs_dir) / "corpus" / _key(source_digest, asdict(config))
    _reuse_or_build(out, lambda: corpus.ingest(config, out, workers=0, map_parts=map_parts))
    return str(out)


def log_corpus(corpus_dir: str, config: corpus.CorpusConfig, run_id: str | None) -> None:
    manifest, tracker = _manifest(corpus_dir, "corpus"), tracker_for(run_id)
    tracker.log_params({"corpus": asdict(config)})
    tracker.log_metrics(
        {f"corpus/{k}": v for k, v in manifest["counts"].items()}
        | {f"corpus/bytes_{k}": v for k, v in manifest["bytes"].items()}
    )
    tracker.log_artifact(Path(corpus_dir) / MANIFEST, "corpus")
    if run_id:
        from mlflow import MlflowClient

        MlflowClient().set_tag(run_id, "corpus", manifest.get("source", ""))
    log_corpus_dataset(run_id, corpus_dir, "output")
    record_or_link(corpus_dir, run_id, "corpus")


def log_corpus_dataset(run_id: str | None, corpus_dir: str, context: str) -> None:
    manifest = _manifest(corpus_dir, "corpus")
    log_dataset(
        run_id,
        corpus_dir,
        context,
        "corpus",
        manifest["content_digest"],
        {
            "source": manifest.get("source", ""),
            **manifest["counts"],
            **{f"bytes_{k}": v for k, v in manifest["bytes"].items()},
        },
    )


@task(
    name="train-tokenizer",
    **DATA_TASK,
    cache_key_fn=_cache_key(
        "tokenizer",
        lambda p: corpus.corpus_digest(p["corpus_dir"]),
        lambda p: asdict(p["config"]),
        lambda p: p["runs_dir"],
        lambda p: _intact(_tokenizer_out(**p), _verify_tokenizer),
    ),
)
def train_tokenizer(corpus_dir: str, config: tokenizer.TokenizerConfig, runs_dir: str) -> str:
    out = _tokenizer_out(corpus_dir, config, runs_dir)
    _reuse_or_build(out, lambda: tokenizer.train_tokenizer(Path(corpus_dir), out, config), _verify_tokenizer)
    return str(out)


@task(name="encode-part", **DATA_TASK)
def encode_part(corpus_dir: str, tokenizer_dir: str, part: tokenizer.EncodePart, out_file: str) -> dict:
    """Encode one part of a corpus split into a file of ids (sentencepiece on all cores of the machine it
    runs on); the flow's task runner spreads the parts over threads or a Ray cluster."""
    return tokenizer.encode_part(Path(corpus_dir), Path(tokenizer_dir), part, Path(out_file))


def encode_corpus(
    corpus_dir: str, tokenizer_dir: str, runs_dir: str, map_parts: tokenizer.MapParts | None = None
) -> str:
    """The corpus's token shards in runs/tokens/<key>: reused when finished and intact, else encoded in
    parts by `map_parts` (the flow's `encode-part` tasks; local processes when None), one part per core."""
    out = _tokens_out(corpus_dir, tokenizer_dir, runs_dir)
    _reuse_or_build(
        out,
        lambda: tokenizer.encode_corpus(
            Path(corpus_dir), Path(tokenizer_dir), out, workers=0, map_parts=map_parts
        ),
        _verify_tokens,
    )
    return str(out)


def log_tokenizer(
    tokenizer_dir: str,
    tokens_dir: str,
    config: tokenizer.TokenizerConfig,
    run_id: str | None,
    corpus_dir: str | None = None,
) -> None:
    manifest, tokens, tracker = (
        _manifest(tokenizer_dir, "tokenizer"),
        _manifest(tokens_dir, "tokens"),
        tracker_for(run_id),
    )
    tracker.log_params({"tokenizer": asdict(config)})
    tracker.log_metrics(
        {
            "tokenizer/vocab_size": manifest["vocab_size"],
            "tokenizer/train_seconds": manifest["train_seconds"],
            "tokenizer/bytes_per_token": manifest["bytes_per_token"],
        }
        | {
            f"tokens/{split}_{k}": v
            for split, info in tokens["splits"].items()
            for k, v in info.items()
            if isinstance(v, (int, float))
        }
    )
    if producer_of(tokenizer_dir) in (None, run_id):  # a reused tokenizer stays with the run that made it
        tracker.log_artifact(Path(tokenizer_dir), "tokenizer")
    tracker.log_artifact(Path(tokens_dir) / MANIFEST, "tokens")
    if corpus_dir:
        log_corpus_dataset(run_id, corpus_dir, "training")
    log_tokens_dataset(run_id, tokens_dir, "output")
    record_or_link(tokenizer_dir, run_id, "tokenizer")
    record_or_link(tokens_dir, run_id, "tokens")


def log_tokens_dataset(run_id: str | None, tokens_dir: str, context: str) -> None:
    tokens = _manifest(tokens_dir, "tokens")
    log_dataset(
        run_id,
        tokens_dir,
        context,
        "tokens",
        _tokens_digest(tokens),
        {
            f"{split}_{k}": v
            for split, info in tokens["splits"].items()
            for k, v in info.items()
            if isinstance(v, (int, float))
        },
    )


def log_sft_dataset(run_id: str | None, sft_dir: str | None, context: str) -> None:
    if sft_dir is None:  # instruction tuning skipped
        return
    pairs = _manifest(sft_dir, "sft data")
    log_dataset(
        run_id,
        sft_dir,
        context,
        "sft_data",
        pairs["content_digest"],
        {k: v for k, v in pairs["counts"].items() if isinstance(v, (int, float))},
    )


@task(name="pretrain", retries=0, timeout_seconds=TRAINING_TIMEOUT_S)
def pretrain(
    tokenizer_dir: str,
    tokens_dir: str,
    model: GPTConfig,
    config: TrainConfig,
    runs_dir: str,
    run_id: str | None = None,
    launch: LaunchConfig = LaunchConfig(),
) -> str:
    """Train (or resume, or reuse) the model for exactly this data, model and recipe; return model.pt.
    With `launch` naming more than one process, training runs under torchrun (tasks/distributed.py)."""
    tokens = _manifest(tokens_dir, "tokens")
    out = (
        Path(runs_dir)
        / "pretrain"
        / _key(tokens["corpus_digest"], tokens["tokenizer_digest"], asdict(model), result_fields(config))
    )
    tracker = ProgressTracker(
        tracker_for(run_id, runs_dir),
        config.total_steps(model.block_size),
        "pretrain-progress",
        "Pretraining: optimizer steps done",
    )
    log_tokens_dataset(run_id, tokens_dir, "training")
    with gpu_slot(), system_metrics(run_id):
        if launch.world_size > 1:
            tracker.log_params({"launch": asdict(launch)})
            manifest = distributed.pretrain(
                launch,
                tokenizer_dir,
                tokens_dir,
                model,
                config,
                out,
                run_id,
                get_run_logger(),
                tracker.advance,
            )
        else:
            manifest = train.pretrain(Path(tokenizer_dir), Path(tokens_dir), model, config, out, tracker)
    tracker.log_metrics({f"pretrain/final_{k}": v for k, v in manifest["metrics"].items()})
    tracker.log_artifact(out / MANIFEST, "pretrain")  # the weights are logged once, in the pyfunc model
    record_or_link(out, run_id, "pretrain")
    return str(out / "model.pt")


def _sft_source_digest(config: sft_data.SFTDataConfig) -> str | None:
    """A user file's content digest, or the files of a local hf: folder, so edited pairs are never mistaken
    for the old ones (a hub dataset is keyed on its name, configuration, split and revision)."""
    if config.kind == "hf":  # hashed as the corpus stage hashes an hf: source
        fields = {
            "hf_config": config.hf_config,
            "hf_split": config.hf_split,
            "hf_revision": config.hf_revision,
        }
        return corpus.source_digest(corpus.CorpusConfig(source=config.source, **fields))
    path = Path(config.source)
    return file_digest(path) if config.kind == "file" and path.is_file() else None


@task(name="build-sft-data", **DATA_TASK)
def build_sft_data(config: sft_data.SFTDataConfig, corpus_dir: str, runs_dir: str) -> str:
    out = (
        Path(runs_dir)
        / "sft_data"
        / _key(corpus.corpus_digest(corpus_dir), asdict(config), _sft_source_digest(config))
    )
    _reuse_or_build(out, lambda: sft_data.build_sft_data(config, Path(corpus_dir), out))
    return str(out)


@task(name="finetune", retries=0, timeout_seconds=TRAINING_TIMEOUT_S)
def finetune_model(
    base_model: str,
    tokenizer_dir: str,
    sft_dir: str,
    config: TrainConfig,
    runs_dir: str,
    max_length: int | None = None,
    run_id: str | None = None,
    launch: LaunchConfig = LaunchConfig(),
    adapter: AdapterConfig = AdapterConfig(),
) -> str:
    pairs = _manifest(sft_dir, "sft data")
    out = (
        Path(runs_dir)
        / "finetune"
        / _key(
            file_digest(Path(base_model)),
            pairs["content_digest"],
            result_fields(config),
            max_length,
            asdict(adapter),
        )
    )
    tracker = ProgressTracker(
        tracker_for(run_id, runs_dir),
        config.max_steps,
        "finetune-progress",
        "Fine-tuning: optimizer steps done",
    )
    tracker.log_metrics(
        {f"sft_data/{k}": v for k, v in pairs["counts"].items() if isinstance(v, (int, float))}
    )
    log_sft_dataset(run_id, sft_dir, "training")
    with gpu_slot(), system_metrics(run_id):
        if launch.world_size > 1:
            tracker.log_params({"launch": asdict(launch)})
            manifest = distributed.finetune(
                launch,
                base_model,
                tokenizer_dir,
                sft_dir,
                config,
                out,
                max_length,
                run_id,
                get_run_logger(),
                tracker.advance,
                adapter,
            )
        else:
            manifest = finetune.finetune(
                Path(base_model),
                Path(tokenizer_dir),
                Path(sft_dir),
                config,
                out,
                max_length,
                tracker,
                adapter,
            )
    tracker.log_metrics({f"finetune/final_{k}": v for k, v in manifest["metrics"].items()})
    tracker.log_metrics({f"finetune/{k}": v for k, v in manifest["params"].items()})  # also when reused
    if manifest["adapter"]:
        tracker.log_artifact(out / manifest["adapter"], "finetune/adapter")
    tracker.log_artifact(out / MANIFEST, "finetune")  # the weights are logged once, in the pyfunc model
    tracker.log_artifact(Path(sft_dir) / MANIFEST, "sft_data")
    record_or_link(sft_dir, run_id, "sft_data")
    record_or_link(out, run_id, "finetune")
    return str(out / "model.pt")


@task(name="log-model", retries=2, retry_delay_seconds=2)
def log_model(run_id: str, model_file: str, tokenizer_dir: str, chat: bool, name: str) -> str:
    """Log a trained model as an MLflow pyfunc model; return its URI."""
    return log_generator_model(run_id, Path(model_file), Path(tokenizer_dir), chat, name)


@task(name="evaluate")
def evaluate_models(
    models: dict[str, str],
    tokenizer_dir: str,
    tokens_dir: str,
    sft_dir: str | None,
    config: EvalConfig,
    run_id: str | None = None,
    corpus_dir: str | None = None,
) -> dict[str, float]:
    """Held-out loss, perplexity and bits per byte (non-overlapping and strided) of every model, the
    compressors on the same text, and the response-only loss of every model on held-out instruction
    pairs (the pretrained one is the baseline). With the corpus (or `config.cloze_data`), also cloze
    accuracy; with the corpus, the contamination of every evaluation set by the training split
    (`contaminated_fraction/<set>`, and the items in `contamination.json`)."""
    metrics, report, stride = evaluate.evaluate_stage(
        {name: Path(f) for name, f in models.items()},
        Path(tokenizer_dir),
        Path(tokens_dir),
        config,
        Path(sft_dir) if sft_dir else None,
        Path(corpus_dir) if corpus_dir else None,
    )
    tracker = tracker_for(run_id)
    tracker.log_params({"evaluation": asdict(config) | {"bpb_stride": stride}})
    tracker.log_metrics({f"evaluate/{k}": v for k, v in metrics.items()})
    if run_id and report is not None:
        from mlflow import MlflowClient

        MlflowClient().log_dict(run_id, report, "contamination.json")
    log_tokens_dataset(run_id, tokens_dir, "evaluation")
    log_sft_dataset(run_id, sft_dir, "evaluation")
    rows = [
        {
            "model": name,
            **{
                k: round(metrics[f"{name}_{k}"], 4)
                for k in ("loss", "perplexity", "bpb", "bpb_strided", "response_loss", "cloze_accuracy")
                if f"{name}_{k}" in metrics
            },
        }
        for name in models
    ]
    rows += [
        {"model": key.removesuffix("_bpb") + " -9", "bpb": round(metrics[key], 4)}
        for key in ("gzip_bpb", "bz2_bpb", "xz_bpb")
    ]
    create_table_artifact(
        rows, key="held-out-evaluation", description="Held-out bits per byte, models vs compressors"
    )
    return metrics


@task(name="sample")
def sample(
    pretrained: str,
    finetuned: str | None,
    tokenizer_dir: str,
    corpus_dir: str,
    sft_dir: str | None,
    prompts: completions.PromptConfig,
    sampling: SamplingConfig,
    device: str = "auto",
    run_id: str | None = None,
) -> dict[str, Any]:
    """Complete held-out prompts with each decoding strategy: document openings for the pretrained model,
    held-out instructions for the fine-tuned one. Logs the table and, for Python corpora, the parse rate."""
    rows = [
        {"model": "pretrained", **row}
        for row in completions.complete(
            Path(pretrained),
            Path(tokenizer_dir),
            completions.held_out_prompts(Path(corpus_dir), prompts),
            sampling,
            device,
        )
    ]
    if finetuned and sft_dir:
        instructions = completions.held_out_instructions(Path(sft_dir), prompts.num_prompts)
        rows += [
            {"model": "finetuned", **row}
            for row in completions.complete(
                Path(finetuned), Path(tokenizer_dir), instructions, sampling, device, chat=True
            )
        ]
    metrics: dict[str, float] = {"sample/num_completions": len(rows)}
    python = completions.is_python_corpus(Path(corpus_dir))
    for row in rows:  # per-row scores, kept in the samples table
        row |= completions.row_scores(row["completion"])
        if python:  # a fine-tuned answer must parse on its own, without the instruction
            prompt = row["prompt"] if row["model"] == "pretrained" else ""
            row["parses_as_python"] = completions.parses_as_python(prompt, row["completion"])
    for model in ("pretrained", "finetuned"):
        chosen = [r for r in rows if r["model"] == model]
        if chosen and python:
            metrics[f"sample/{model}_python_parse_rate"] = sum(r["parses_as_python"] for r in chosen) / len(
                chosen
            )
        metrics |= {f"sample/{model}_{k}": v for k, v in completions.strategy_scores(chosen).items()}
    create_table_artifact(
        rows, key="samples", description="Held-out prompt -> completion, per model and decoding strategy"
    )
    if run_id:
        import pandas as pd
        from mlflow import MlflowClient

        MlflowClient().log_table(run_id, pd.DataFrame(rows), artifact_file="samples.json")
        tracker = MlflowTracker(run_id)
        tracker.log_params({"prompts": asdict(prompts), "sampling": asdict(sampling)})
        tracker.log_metrics(metrics)
        log_corpus_dataset(run_id, corpus_dir, "evaluation")
    return metrics
