"""One Prefect task per pipeline step, each a thin wrapper around one llmcore function.

What the wrappers add: caching on content digests (ingestion, tokenizer training and encoding are
skipped when their inputs have not changed), retries where a retry can help (file I/O) and never for
bad input or a diverged run, MLflow logging of parameters, metrics and artifacts into the stage's run,
and Prefect artifacts (tables) for people watching the UI. Every task takes and returns paths.
Output folders are content-addressed under `runs_dir`, so an unchanged rerun lands in the same place
and a killed training run resumes there.
"""

from dataclasses import asdict
from pathlib import Path
from typing import Any

from prefect import task
from prefect.artifacts import create_table_artifact

from llmcore import completions, corpus, evaluate, finetune, sft_data, tokenizer, train
from llmcore.artifacts import MANIFEST, json_digest, read_json
from llmcore.errors import ConfigError
from llmcore.evaluate import EvalConfig
from llmcore.model import GPTConfig
from llmcore.sampling import SamplingConfig
from llmcore.tracking import MlflowTracker, NullTracker
from llmcore.train import TrainConfig, TrainingDiverged
from tasks.tracking import log_generator_model


def retry_unless_bad_input(task, task_run, state) -> bool:
    """Retry transient failures (I/O), never a bad config or a diverged loss: those fail the same again."""
    try:
        state.result()
    except (ConfigError, TrainingDiverged):
        return False
    except Exception:
        return True
    return False


def _tracker(run_id: str | None):
    return MlflowTracker(run_id) if run_id else NullTracker()


def _key(*parts: Any) -> str:
    return json_digest(parts)[:16]


def corpus_dir_for(config: corpus.CorpusConfig, runs_dir: str) -> Path:
    return Path(runs_dir) / "corpus" / _key(corpus.source_digest(config), asdict(config))


@task(name="ingest-corpus", persist_result=True, retries=2, retry_delay_seconds=2,
      retry_condition_fn=retry_unless_bad_input,
      cache_key_fn=lambda ctx, p: "ingest-" + _key(corpus.source_digest(p["config"]), asdict(p["config"]), p["runs_dir"]))
def ingest_corpus(config: corpus.CorpusConfig, runs_dir: str, run_id: str | None = None) -> str:
    out = corpus_dir_for(config, runs_dir)
    manifest = read_json(out / MANIFEST) if (out / MANIFEST).is_file() else corpus.ingest(config, out)
    tracker = _tracker(run_id)
    tracker.log_params({"corpus": asdict(config), "source_description": manifest.get("source", "")})
    tracker.log_metrics({f"corpus/{k}": v for k, v in manifest["counts"].items()} |
                        {f"corpus/bytes_{k}": v for k, v in manifest["bytes"].items()})
    tracker.log_artifact(out / MANIFEST, "corpus")
    return str(out)


def _corpus_digest(corpus_dir: str) -> str:
    return read_json(Path(corpus_dir) / MANIFEST)["content_digest"]


@task(name="train-tokenizer", persist_result=True, retries=2, retry_delay_seconds=2,
      retry_condition_fn=retry_unless_bad_input,
      cache_key_fn=lambda ctx, p: "tokenizer-" + _key(_corpus_digest(p["corpus_dir"]), asdict(p["config"]), p["runs_dir"]))
def train_tokenizer(corpus_dir: str, config: tokenizer.TokenizerConfig, runs_dir: str, run_id: str | None = None) -> str:
    out = Path(runs_dir) / "tokenizer" / _key(_corpus_digest(corpus_dir), asdict(config))
    manifest = read_json(out / MANIFEST) if (out / MANIFEST).is_file() else tokenizer.train_tokenizer(Path(corpus_dir), out, config)
    tracker = _tracker(run_id)
    tracker.log_params({"tokenizer": asdict(config)})
    tracker.log_metrics({"tokenizer/vocab_size": manifest["vocab_size"], "tokenizer/train_seconds": manifest["train_seconds"],
                         "tokenizer/bytes_per_token": manifest["bytes_per_token"]})
    tracker.log_artifact(out, "tokenizer")
    return str(out)


@task(name="encode-corpus", persist_result=True, retries=2, retry_delay_seconds=2,
      retry_condition_fn=retry_unless_bad_input,
      cache_key_fn=lambda ctx, p: "tokens-" + _key(_corpus_digest(p["corpus_dir"]), p["tokenizer_dir"], p["runs_dir"]))
def encode_corpus(corpus_dir: str, tokenizer_dir: str, runs_dir: str, run_id: str | None = None) -> str:
    out = Path(runs_dir) / "tokens" / _key(_corpus_digest(corpus_dir), tokenizer_dir)
    manifest = read_json(out / MANIFEST) if (out / MANIFEST).is_file() else tokenizer.encode_corpus(Path(corpus_dir), Path(tokenizer_dir), out)
    splits = manifest["splits"]
    _tracker(run_id).log_metrics({f"tokens/{split}_{k}": v for split, info in splits.items()
                                  for k, v in info.items() if isinstance(v, (int, float))})
    _tracker(run_id).log_artifact(out / MANIFEST, "tokens")
    return str(out)


@task(name="pretrain", retries=0)
def pretrain(tokenizer_dir: str, tokens_dir: str, model: GPTConfig, config: TrainConfig, runs_dir: str,
             run_id: str | None = None) -> str:
    """Train (or resume, or reuse) the model for this exact data and config; return the model file."""
    out = Path(runs_dir) / "pretrain" / _key(read_json(Path(tokens_dir) / MANIFEST), asdict(model), asdict(config))
    tracker = _tracker(run_id)
    manifest = train.pretrain(Path(tokenizer_dir), Path(tokens_dir), model, config, out, tracker)
    tracker.log_metrics({f"pretrain/final_{k}": v for k, v in manifest["metrics"].items()})
    tracker.log_artifact(out / "model.pt", "pretrain")
    tracker.log_artifact(out / MANIFEST, "pretrain")
    return str(out / "model.pt")


@task(name="build-sft-data", persist_result=True, retries=2, retry_delay_seconds=2,
      retry_condition_fn=retry_unless_bad_input)
def build_sft_data(config: sft_data.SFTDataConfig, corpus_dir: str, runs_dir: str, run_id: str | None = None) -> str:
    out = Path(runs_dir) / "sft_data" / _key(_corpus_digest(corpus_dir), asdict(config))
    manifest = read_json(out / MANIFEST) if (out / MANIFEST).is_file() else sft_data.build_sft_data(config, Path(corpus_dir), out)
    tracker = _tracker(run_id)
    tracker.log_params({"sft_data": asdict(config)})
    tracker.log_metrics({f"sft_data/{k}": v for k, v in manifest["counts"].items() if isinstance(v, (int, float))})
    tracker.log_artifact(out / MANIFEST, "sft_data")
    return str(out)


@task(name="finetune", retries=0)
def finetune_model(base_model: str, tokenizer_dir: str, sft_dir: str, config: TrainConfig, runs_dir: str,
                   max_length: int | None = None, run_id: str | None = None) -> str:
    out = Path(runs_dir) / "finetune" / _key(read_json(Path(base_model).parent / MANIFEST)["metrics"],
                                             read_json(Path(sft_dir) / MANIFEST), asdict(config), max_length)
    tracker = _tracker(run_id)
    manifest = finetune.finetune(Path(base_model), Path(tokenizer_dir), Path(sft_dir), config, out, max_length, tracker)
    tracker.log_metrics({f"finetune/final_{k}": v for k, v in manifest["metrics"].items()})
    tracker.log_artifact(out / "model.pt", "finetune")
    tracker.log_artifact(out / MANIFEST, "finetune")
    return str(out / "model.pt")


@task(name="log-model", retries=2, retry_delay_seconds=2)
def log_model(run_id: str, model_file: str, tokenizer_dir: str, chat: bool, name: str) -> str:
    """Log a trained model as an MLflow pyfunc model; return its URI."""
    return log_generator_model(run_id, Path(model_file), Path(tokenizer_dir), chat, name)


@task(name="evaluate")
def evaluate_models(models: dict[str, str], tokenizer_dir: str, tokens_dir: str, sft_dir: str, config: EvalConfig,
                    run_id: str | None = None) -> dict[str, float]:
    """Held-out loss, perplexity and bits per byte of every model, the compressors on the same text, and
    the response-only loss of every model on held-out instruction pairs (the pretrained one is the baseline)."""
    metrics: dict[str, float] = {}
    for name, model_file in models.items():
        result = evaluate.evaluate_model(Path(model_file), Path(tokenizer_dir), Path(tokens_dir), config)
        for key in ("gzip_bpb", "bz2_bpb", "xz_bpb"):
            metrics[key] = result.pop(key)
        metrics |= {f"{name}_{k}": v for k, v in result.items()}
        response = evaluate.response_loss(Path(model_file), Path(tokenizer_dir), Path(sft_dir), config)
        metrics[f"{name}_response_loss"] = response["loss"]
    tracker = _tracker(run_id)
    tracker.log_params({"evaluation": asdict(config)})
    tracker.log_metrics(metrics)
    rows = [{"model": name, **{k: round(metrics[f"{name}_{k}"], 4) for k in ("loss", "perplexity", "bpb", "response_loss")}}
            for name in models]
    rows += [{"model": key.removesuffix("_bpb") + " -9", "bpb": round(metrics[key], 4)} for key in ("gzip_bpb", "bz2_bpb", "xz_bpb")]
    create_table_artifact(rows, key="held-out-evaluation", description="Held-out bits per byte, models vs compressors")
    return metrics


@task(name="sample")
def sample(model_file: str, tokenizer_dir: str, corpus_dir: str, prompts: completions.PromptConfig,
           sampling: SamplingConfig, device: str = "auto", chat: bool = False, run_id: str | None = None) -> dict[str, Any]:
    """Complete held-out prompts with each decoding strategy; log the table and the Python parse rate."""
    prompt_texts = completions.held_out_prompts(Path(corpus_dir), prompts)
    rows = completions.complete(Path(model_file), Path(tokenizer_dir), prompt_texts, sampling, device, chat)
    parse_rate = completions.python_parse_rate(rows)
    create_table_artifact(rows, key="samples", description="Held-out prompt -> completion, per decoding strategy")
    if run_id:
        import pandas as pd
        from mlflow import MlflowClient

        MlflowClient().log_table(run_id, pd.DataFrame(rows), artifact_file="samples.json")
        tracker = MlflowTracker(run_id)
        tracker.log_params({"prompts": asdict(prompts), "sampling": asdict(sampling)})
        tracker.log_metrics({"sample/python_parse_rate": parse_rate, "sample/num_completions": len(rows)})
    return {"rows": len(rows), "python_parse_rate": parse_rate}
