"""Which logged text-generation model a user means, and its files: `models:/` and `runs:/` URIs, run ids.

A model is named by `models:/NAME/VERSION` or `models:/NAME@ALIAS` (the registry), `models:/<model id>`
(an MLflow 3 logged model), `runs:/RUN_ID/NAME` (the model a run logged, or reused, under NAME), or a run
id (the one model that run logged or reused). Each resolves to one `LoggedGenerator`, or a one-line
ConfigError naming what does exist. `download` fetches the pyfunc model's own artifacts, the weights and
the sentencepiece model, which llmcore loads as tensors and data only: no code from the artifact runs.
This module does not score or log anything.
"""

import json
import re
from dataclasses import dataclass
from pathlib import Path

import mlflow
from mlflow import MlflowClient
from mlflow.entities import LoggedModel
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException

from llmcore.errors import ConfigError
from tasks.registry import MISSING, require_registered, version_by_alias

FORMS = "models:/NAME/VERSION, models:/NAME@ALIAS, models:/<model id>, runs:/RUN_ID/NAME or --run-id RUN_ID"


@dataclass(frozen=True)
class LoggedGenerator:
    """One logged text-generation model: where it came from, for the tags of the run that re-scores it."""

    model_id: str
    name: str  # the name it was logged under: pretrained, finetuned
    source_run_id: str  # the run that logged it
    requested: str  # what the user passed: a URI or a run id
    registered: str | None = None  # NAME/VERSION when reached through the registry

    @property
    def uri(self) -> str:
        return f"models:/{self.model_id}"


def _missing(error: MlflowException) -> bool:
    return error.error_code in MISSING


def _registered(name: str, version: str, requested: str) -> LoggedGenerator:
    client = MlflowClient()
    try:
        found = client.get_model_version(name, version)
    except MlflowException as error:
        if not _missing(error):
            raise
        require_registered(name, requested)
        versions = sorted(int(v.version) for v in client.search_model_versions(f"name = '{name}'"))
        raise ConfigError(
            f"registered model {name!r} has no version {version} ({requested}): pass one of versions "
            f"{', '.join(map(str, versions))} or an alias"
        ) from None
    return _by_id(_version_model_id(found), requested, f"{name}/{found.version}")


def _version_model_id(version: ModelVersion) -> str | None:
    """The logged model a registered version was made from (its `model_id`, or its `models:/` source)."""
    source = re.fullmatch(r"models:/(m-[0-9a-f]+)", version.source or "")
    return version.model_id or (source[1] if source else None)


def _by_id(model_id: str | None, requested: str, registered: str | None = None) -> LoggedGenerator:
    if not model_id:
        raise ConfigError(
            f"{requested} was registered from something other than an MLflow 3 logged model: pass the "
            f"runs:/RUN_ID/NAME of the model it was registered from"
        )
    try:
        model: LoggedModel = mlflow.get_logged_model(model_id)
    except MlflowException as error:
        if not _missing(error):
            raise
        raise ConfigError(
            f"no logged model {model_id!r} at {mlflow.get_tracking_uri()}: pass one of {FORMS}"
        ) from None
    return LoggedGenerator(model.model_id, model.name, model.source_run_id, requested, registered)


def _run(run_id: str, requested: str):
    try:
        return MlflowClient().get_run(run_id)
    except MlflowException as error:
        if not _missing(error):
            raise
        raise ConfigError(
            f"no MLflow run {run_id!r} at {mlflow.get_tracking_uri()} ({requested}): pass the id of an "
            "existing run (the MLflow UI lists them) or another of " + FORMS
        ) from None


def run_models(run_id: str, requested: str | None = None) -> dict[str, str]:
    """The models a run logged or reused (`reused.model.NAME` tags): name -> model id."""
    run = _run(run_id, requested or run_id)
    found = mlflow.search_logged_models(
        experiment_ids=[run.info.experiment_id],
        filter_string=f"source_run_id = '{run_id}'",
        output_format="list",
    )
    models = {m.name: m.model_id for m in sorted(found, key=lambda m: m.creation_timestamp)}
    for key, value in run.data.tags.items():
        if key.startswith("reused.model."):
            models.setdefault(key.removeprefix("reused.model."), value)
    return models


def _children_uris(run_id: str) -> list[str]:
    """runs:/CHILD/NAME of every model the run's child runs logged or reused (a pipeline run's stages)."""
    run = _run(run_id, run_id)
    children = MlflowClient().search_runs(
        [run.info.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{run_id}'"
    )
    return [f"runs:/{c.info.run_id}/{name}" for c in children for name in run_models(c.info.run_id)]


def resolve(model_uri: str | None = None, run_id: str | None = None) -> LoggedGenerator:
    """The logged model meant by a URI or a run id (exactly one of them), or a one-line ConfigError."""
    if (model_uri is None) == (run_id is None):
        raise ConfigError(f"pass either --model-uri or --run-id: {FORMS}")
    if run_id is not None:
        models = run_models(run_id)
        if len(models) == 1:
            ((name, model_id),) = models.items()
            return _by_id(model_id, run_id)
        options = [f"runs:/{run_id}/{name}" for name in models] or _children_uris(run_id)
        raise ConfigError(
            f"run {run_id} logged {len(models) or 'no'} models: pass --model-uri one of "
            f"{', '.join(options) or '(none: pass a run that logged a model)'}"
        )
    if m := re.fullmatch(r"models:/([^/@]+)@([^/]+)", model_uri):
        version = version_by_alias(m[1], m[2])
        return _by_id(_version_model_id(version), model_uri, f"{version.name}/{version.version}")
    if m := re.fullmatch(r"models:/(m-[0-9a-f]+)", model_uri):
        return _by_id(m[1], model_uri)
    if m := re.fullmatch(r"models:/([^/@]+)/(\d+)", model_uri):
        return _registered(m[1], m[2], model_uri)
    if m := re.fullmatch(r"runs:/([^/]+)/([^/]+)", model_uri):
        models = run_models(m[1], model_uri)
        if m[2] not in models:
            raise ConfigError(
                f"run {m[1]} logged no model named {m[2]!r} ({model_uri}): pass one of "
                + (", ".join(f"runs:/{m[1]}/{name}" for name in models) or "the URI of a run that logged one")
            )
        return _by_id(models[m[2]], model_uri)
    raise ConfigError(f"model URI {model_uri!r} is not one of the forms {FORMS}")


def download(model: LoggedGenerator, into: Path) -> tuple[Path, Path, bool]:
    """(model.pt, tokenizer.model, chat) of a logged generator, downloaded into `into`."""
    local = Path(mlflow.artifacts.download_artifacts(model.uri, dst_path=str(into))) / "artifacts"
    if not (local / "generator.json").is_file():
        raise ConfigError(
            f"{model.requested} ({model.uri}) is not a text-generation model of this project (no "
            "generator.json: a classifier?): pass a pretrained or finetuned model"
        )
    chat = json.loads((local / "generator.json").read_text())["chat"]
    return local / "model.pt", local / "tokenizer.model", chat
