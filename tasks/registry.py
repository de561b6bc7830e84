"""The MLflow model registry: register each pipeline run's models and gate the `champion` alias.

Every pipeline run registers its logged pyfunc models (`<prefix>-pretrained`, and `<prefix>-instruct`
when fine-tuning ran) as new versions linked to their run, tags them with their evaluation metrics and
points the alias `challenger` at them. The promotion gate then scores the challenger and the current
champion on the same held-out bytes of this run's corpus (`llmcore.evaluate.score_text`: bits per byte
compares models across tokenizers) and moves `champion` only when the challenger is better; the first
version is promoted. The decision and both figures are written as version tags and returned. Each
registered version also gets its Hugging Face export (`llmcore.export`) as `hf_export/` artifacts of its
run, named in the version tag `hf_export`, so `transformers` can load what the registry holds.

The classifier (`<prefix>-classifier`, when classification ran) is gated more simply, and differently: on
the held-out macro-F1 recorded when each version was registered (its `eval.macro_f1` tag), higher is
better. Each figure comes from its own run's held-out texts, so the comparison is fair only while the
classification data (and its split) stays the same; it has no Hugging Face export.

What this module does not do: train, log models (tasks/tracking.py), or load a pyfunc model: a
champion's weights and tokenizer are downloaded as files and loaded by llmcore (weights only).
"""

import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import mlflow
from mlflow import MlflowClient
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException
from prefect import task
from prefect.artifacts import create_markdown_artifact

from llmcore.errors import ConfigError
from llmcore.evaluate import EvalConfig, held_out_text, score_text
from tasks.export import export_hf, log_hf_export

log = logging.getLogger("llmcore.registry")

CHAMPION, CHALLENGER = "champion", "challenger"
# The gated metrics, each with the direction that is better. Only bits per byte compares models whose
# tokenizers differ; loss and perplexity are per token, so they gate fairly only under one tokenizer.
PROMOTION_METRICS: dict[str, Literal["lower", "higher"]] = {
    "bpb": "lower",
    "loss": "lower",
    "perplexity": "lower",
}
PromotionMetric = Literal["bpb", "loss", "perplexity"]
CLASSIFIER, CLASSIFIER_METRIC = "classifier", "macro_f1"  # the classifier's kind and its gated metric
BETTER = PROMOTION_METRICS | {CLASSIFIER_METRIC: "higher"}
HELD_OUT_BYTES_PER_TOKEN = 4  # the gate scores about EvalConfig.max_tokens tokens' worth of held-out bytes


@dataclass(frozen=True)
class Candidate:
    """One model of this run: what it is called in the registry and where its files are."""

    kind: str  # "pretrained", "instruct" or "classifier"
    logged_name: str  # the name it was logged under by its stage flow (tasks/stages.py log_model)
    model_file: str
    tokenizer_dir: str
    metrics: dict[str, float]  # its evaluation figures, written as version tags


def registered_name(prefix: str, kind: str) -> str:
    return f"{prefix}-{kind}"


def beats(metric: str, challenger: float, champion: float) -> bool:
    return challenger < champion if BETTER[metric] == "lower" else challenger > champion


# MLflow's error codes for a registered model, version, alias or logged model that does not exist
MISSING = ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE", "NOT_FOUND")


def require_registered(name: str, requested: str) -> None:
    """A one-line ConfigError naming the registered models, unless `name` is one of them."""
    known = [m.name for m in MlflowClient().search_registered_models(max_results=50)]
    if name not in known:
        raise ConfigError(
            f"no registered model {name!r} at {mlflow.get_tracking_uri()} ({requested}): run the pipeline "
            f"first or pass one of: {', '.join(known) or '(none registered yet)'}"
        )


def version_by_alias(name: str, alias: str) -> ModelVersion:
    """The version behind `name@alias`, or a one-line ConfigError naming what exists."""
    client = MlflowClient()
    try:
        return client.get_model_version_by_alias(name, alias)
    except MlflowException as error:
        if error.error_code not in MISSING:
            raise
    require_registered(name, f"models:/{name}@{alias}")
    aliases = sorted(client.get_registered_model(name).aliases)
    raise ConfigError(
        f"registered model {name!r} has no alias {alias!r}: pass one of "
        f"{', '.join(aliases) or '(no aliases yet)'} or a version number"
    ) from None


def download_version(version: ModelVersion, into: Path) -> tuple[Path, Path, bool]:
    """The (model.pt, tokenizer.model, chat) files of a registered pyfunc version, downloaded into `into`."""
    import json

    local = Path(
        mlflow.artifacts.download_artifacts(f"models:/{version.name}/{version.version}", dst_path=str(into))
    )
    files = local / "artifacts"
    chat = json.loads((files / "generator.json").read_text())["chat"]
    return files / "model.pt", files / "tokenizer.model", chat


def logged_model(experiment_id: str, parent_run_id: str, name: str):
    """The model logged under `name` by one of the stage runs of a pipeline run, or None (stage skipped)."""
    children = {
        r.info.run_id
        for r in MlflowClient().search_runs(
            [experiment_id], filter_string=f"tags.mlflow.parentRunId = '{parent_run_id}'"
        )
    }
    found = [
        m
        for m in mlflow.search_logged_models(
            experiment_ids=[experiment_id], filter_string=f"name = '{name}'", output_format="list"
        )
        if m.source_run_id in children
    ]
    return max(found, key=lambda m: m.creation_timestamp) if found else None


def register(candidate: Candidate, model_uri: str, name: str, tags: dict[str, str]) -> ModelVersion:
    """A new version of `name` for a logged model (linked to its run), tagged, aliased `challenger`."""
    client = MlflowClient()
    version = mlflow.register_model(
        model_uri, name, tags=tags | {f"eval.{k}": f"{v:.6g}" for k, v in candidate.metrics.items()}
    )
    client.set_registered_model_alias(name, CHALLENGER, version.version)
    return version


def export_version(candidate: Candidate, run_id: str, version: ModelVersion) -> str | None:
    """Log the Hugging Face folder of a registered version to its run (`hf_export/`) and tag the version
    with its URI. A model the export cannot express (e.g. a unigram tokenizer) gets a notice, not a failure:
    the pipeline never fails after training over an optional format."""
    with tempfile.TemporaryDirectory() as tmp:
        try:
            hf_dir = export_hf.fn(candidate.model_file, candidate.tokenizer_dir, str(Path(tmp) / "hf"))
        except ConfigError as error:
            log.warning(
                "registry: %s v%s has no Hugging Face export: %s", version.name, version.version, error
            )
            return None
        uri = log_hf_export.fn(hf_dir, run_id)
    MlflowClient().set_model_version_tag(version.name, version.version, "hf_export", uri)
    return uri


def gate(
    candidate: Candidate, version: ModelVersion, held_out: list[str], metric: str, config: EvalConfig
) -> dict[str, Any]:
    """Score challenger and champion on the same held-out text; move `champion` if the challenger wins."""
    challenger = score_text(Path(candidate.model_file), Path(candidate.tokenizer_dir), held_out, config)
    current, champion = current_champion(version.name), None
    if current is not None:
        with tempfile.TemporaryDirectory() as tmp:
            model_file, tokenizer_file, _ = download_version(current, Path(tmp))
            champion = score_text(model_file, tokenizer_file, held_out, config)[metric]
    return decide(version, metric, challenger[metric], current, champion) | {
        "bytes": challenger.get("bytes", 0.0)
    }


def gate_recorded(candidate: Candidate, version: ModelVersion, metric: str) -> dict[str, Any]:
    """Compare the challenger's recorded figure with the champion's (its `eval.<metric>` tag), each from
    its own run's held-out data; move `champion` if the challenger wins."""
    current = current_champion(version.name)
    champion = None if current is None else float(current.tags[f"eval.{metric}"])
    return decide(version, metric, candidate.metrics[metric], current, champion)


def current_champion(name: str) -> ModelVersion | None:
    try:
        return MlflowClient().get_model_version_by_alias(name, CHAMPION)
    except MlflowException:
        return None


def decide(
    version: ModelVersion,
    metric: str,
    challenger: float,
    current: ModelVersion | None,
    champion: float | None,
) -> dict[str, Any]:
    """Promote the challenger if there is no champion or it beats the champion's figure; record the
    decision and both figures as version tags."""
    client = MlflowClient()
    name = version.name
    decision: dict[str, Any] = {
        "model": name,
        "version": version.version,
        "metric": metric,
        "challenger": challenger,
        "champion": champion,
        "champion_version": None if current is None else current.version,
    }
    promoted = current is None or beats(metric, decision["challenger"], decision["champion"])
    decision["promoted"] = promoted
    decision["decision"] = (
        f"promoted v{version.version} (first version)"
        if current is None
        else f"promoted v{version.version} over v{current.version}"
        if promoted
        else f"kept v{current.version}: v{version.version} is not better"
    )
    tags = {
        "promotion.metric": metric,
        "promotion.challenger_score": f"{decision['challenger']:.6g}",
        "promotion.promoted": str(promoted).lower(),
        "promotion.decision": decision["decision"],
    }
    if current is not None:
        tags |= {
            "promotion.champion_score": f"{decision['champion']:.6g}",
            "promotion.champion_version": str(current.version),
        }
    for key, value in tags.items():
        client.set_model_version_tag(name, version.version, key, value)
    if promoted:
        client.set_registered_model_alias(name, CHAMPION, version.version)
    return decision


@task(name="register-and-promote", retries=1, retry_delay_seconds=2)
def register_and_promote(
    candidates: list[Candidate],
    experiment_id: str,
    parent_run_id: str,
    corpus_dir: str,
    prefix: str,
    metric: str,
    config: EvalConfig,
    tags: dict[str, str],
) -> list[dict[str, Any]]:
    """Register every candidate that was logged, then gate each against its champion. Returns the
    decisions."""
    if metric not in PROMOTION_METRICS:
        raise ConfigError(
            f"unknown promotion metric {metric!r}: "
            f"pass --promotion-metric one of {', '.join(PROMOTION_METRICS)}"
        )
    held_out = held_out_text(Path(corpus_dir), config.max_tokens * HELD_OUT_BYTES_PER_TOKEN)
    decisions = []
    for candidate in candidates:
        logged = logged_model(experiment_id, parent_run_id, candidate.logged_name)
        if logged is None:
            continue
        version = register(candidate, logged.model_uri, registered_name(prefix, candidate.kind), tags)
        if candidate.kind == CLASSIFIER:
            decisions.append(gate_recorded(candidate, version, CLASSIFIER_METRIC))
            continue
        export_version(candidate, logged.source_run_id, version)
        decisions.append(gate(candidate, version, held_out, metric, config))
    create_markdown_artifact(
        promotion_markdown(decisions),
        key="promotion",
        description="Champion promotion: challenger vs champion on this run's held-out text",
    )
    return decisions


def promotion_markdown(decisions: list[dict[str, Any]]) -> str:
    lines = [
        "| registered model | challenger | metric | challenger score "
        "| champion | champion score | decision |",
        "|---|---|---|---|---|---|---|",
    ]
    for d in decisions:
        champion = "-" if d["champion"] is None else f"{d['champion']:.4f}"
        lines.append(
            f"| {d['model']} | v{d['version']} | {d['metric']} | {d['challenger']:.4f} | "
            f"{'v' + str(d['champion_version']) if d['champion_version'] else '-'} | "
            f"{champion} | {d['decision']} |"
        )
    return "\n".join(lines)
