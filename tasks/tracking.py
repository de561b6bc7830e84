"""MLflow plumbing for the flows: where the store is, one experiment per pipeline, runs by id.

The tracking URI comes from MLFLOW_TRACKING_URI and defaults to a SQLite store in `mlruns/` with
artifacts beside it (MLflow 3 refuses the old file store). Tracking is configured before any MLflow
client exists (a client built earlier falls back to a stray `./mlflow.db`). Runs are created and ended
through the client by id, never through MLflow's thread-local active run, because Prefect tasks may run
in worker threads. Metric logging from inside llmcore goes through `llmcore.tracking.MlflowTracker`.

What a run carries besides its stage's own records: who made it (host, pid, git commit, Prefect flow
run and deployment), which datasets it read and wrote (`log_input`), and, when it reused a folder made
earlier, the run that produced it (recorded in `mlflow_run.json` beside the folder's manifest) with that
run's metric histories copied in. Runs left RUNNING by a killed process on this host are marked KILLED
when the next top-level run starts. This module does not decide what a stage logs.
"""

import contextlib
import functools
import json
import logging
import os
import socket
import subprocess
import warnings
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import mlflow
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from llmcore.artifacts import atomic_write_json, file_digest, folder_lock, json_digest, read_json
from llmcore.tracking import close_trackers, scrub, secret_values

MLRUNS = Path("mlruns")
PRODUCER = "mlflow_run.json"  # beside a stage folder's manifest: the MLflow run that produced the folder
MODEL_DIGEST_TAG = "llm.model_digest"
log = logging.getLogger("llmcore.tracking")


def _local_store_uri() -> str:
    return f"sqlite:///{MLRUNS.resolve() / 'mlflow.db'}"


# The local store this process chose last (MLflow copies it into the environment). Task threads may set it
# at once: each sets the same value, the store of the process's one working folder.
_local_choice: str | None = None


def configure_tracking() -> str:
    """Point MLflow at MLFLOW_TRACKING_URI, or at sqlite in ./mlruns; return the URI.

    `mlflow.set_tracking_uri` also sets MLFLOW_TRACKING_URI, so a variable holding the local store chosen
    earlier in this process is not the user's choice: a run from another working folder gets its own store.
    """
    global _local_choice
    uri = os.environ.get("MLFLOW_TRACKING_URI")
    if not uri or uri == _local_choice:
        uri = _local_choice = _local_store_uri()
    if uri == _local_store_uri():
        MLRUNS.mkdir(exist_ok=True)
    mlflow.set_tracking_uri(uri)
    if uri.startswith("sqlite:///"):
        _open_sqlite_store(uri)
    return uri


@functools.cache
def _open_sqlite_store(uri: str) -> None:
    """Open (and on first use create) a SQLite store while holding the lock of its folder.

    MLflow creates a new store's tables when it opens it; two pipelines opening the same new store at once
    both created them, and one failed with `table secrets already exists`. MLflow keeps the opened store
    for the process, so this runs once per URI.
    """
    with folder_lock(Path(uri.removeprefix("sqlite:///")).parent, "MLflow store"):
        MlflowClient(uri).search_experiments(max_results=1)


def experiment_id(name: str) -> str:
    """The experiment's id, creating it (artifacts under mlruns/artifacts for the local store; a server's
    own artifact root, e.g. its proxy, otherwise) if new. Tagged so the UI opens in model-training view."""
    uri = configure_tracking()
    client = MlflowClient()
    found = client.get_experiment_by_name(name)
    if found is None:
        location = (MLRUNS.resolve() / "artifacts").as_uri() if uri == _local_store_uri() else None
        try:
            found = client.get_experiment(client.create_experiment(name, artifact_location=location))
        except MlflowException as error:  # another pipeline created it a moment ago
            if error.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
            found = client.get_experiment_by_name(name)
    if found.tags.get("mlflow.experimentKind") != "custom_model_development":
        client.set_experiment_tag(found.experiment_id, "mlflow.experimentKind", "custom_model_development")
    return found.experiment_id


def _process_tags() -> dict[str, str]:
    import psutil

    return {
        "host": socket.gethostname(),
        "pid": str(os.getpid()),
        "pid_started": f"{psutil.Process().create_time():.2f}",
    }


def git_tags(folder: Path) -> dict[str, str]:
    """Commit and dirty flag of the git checkout holding `folder`; nothing when it is not in one."""

    def git(*args: str) -> str:
        return subprocess.run(
            ["git", "-C", str(folder), *args], capture_output=True, text=True, check=True, timeout=10
        ).stdout.strip()

    try:
        commit = git("rev-parse", "HEAD")
        dirty = bool(git("status", "--porcelain", "--untracked-files=no"))
    except (OSError, subprocess.SubprocessError):
        return {}
    return {"mlflow.source.git.commit": commit, "git.dirty": str(dirty).lower()}


def _prefect_tags() -> dict[str, str]:
    from prefect.runtime import deployment, flow_run

    tags = {
        "prefect.flow_run_id": str(flow_run.id or ""),
        "prefect.flow_name": str(flow_run.flow_name or ""),
        "prefect.flow_run_name": str(flow_run.name or ""),
    }
    if (
        os.environ.get("PREFECT_API_URL") and flow_run.ui_url
    ):  # a temporary server's URL dies with the process
        parts = urlsplit(flow_run.ui_url)  # without any user:password@ part
        tags["prefect.flow_run_url"] = urlunsplit(parts._replace(netloc=parts.netloc.rpartition("@")[2]))
    if deployment.name:
        tags["prefect.deployment"] = str(deployment.name)
    return {k: v for k, v in tags.items() if v}


def run_tags() -> dict[str, str]:
    """Tags every run gets: the process (for ghost detection), the code's git state, the Prefect run."""
    return _process_tags() | git_tags(Path(__file__).resolve().parent) | _prefect_tags()


def close_ghost_runs(experiment: str) -> list[str]:
    """Mark KILLED the runs left RUNNING by processes of this host that are gone; return their ids."""
    import psutil

    client = MlflowClient()
    host = socket.gethostname().replace("'", "")
    runs = client.search_runs(
        [experiment], f"attributes.status = 'RUNNING' and tags.host = '{host}'", max_results=1000
    )
    ghosts = []
    for run in runs:
        pid, started = run.data.tags.get("pid"), run.data.tags.get("pid_started")
        try:
            alive = f"{psutil.Process(int(pid)).create_time():.2f}" == started
        except (psutil.Error, TypeError, ValueError):
            alive = False
        if not alive:
            client.set_terminated(run.info.run_id, "KILLED")
            ghosts.append(run.info.run_id)
    if ghosts:
        log.info("marked %d runs of killed processes KILLED", len(ghosts))
    return ghosts


@contextlib.contextmanager
def mlflow_run(
    experiment: str, name: str, parent_run_id: str | None = None, tags: dict[str, str] | None = None
) -> Iterator[str]:
    """Create a run (a child when parent_run_id is given), yield its id, end it FINISHED or FAILED.

    Queued tracking records of the run are delivered (or filed locally) before it is ended. A top-level
    run first closes ghost runs of the experiment.
    """
    exp = experiment_id(experiment)  # configures tracking before the first client exists
    client = MlflowClient()
    if parent_run_id is None:
        close_ghost_runs(exp)
    secrets = secret_values()
    all_tags = {k: scrub(str(v), secrets) for k, v in (run_tags() | dict(tags or {})).items()}
    if parent_run_id:
        all_tags["mlflow.parentRunId"] = parent_run_id
    run = client.create_run(exp, run_name=name, tags=all_tags)
    run_id = run.info.run_id
    try:
        yield run_id
    except BaseException:
        _end(client, run_id, "FAILED")
        raise
    _end(client, run_id, "FINISHED")


def _end(client: MlflowClient, run_id: str, status: str) -> None:
    close_trackers(run_id)
    try:
        mlflow.flush_async_logging()
        client.set_terminated(run_id, status)
    except MlflowException as error:  # the work is done; a ghost-run sweep ends the run later
        log.warning("could not mark MLflow run %s %s: %s", run_id, status, str(error).splitlines()[0][:200])


@contextlib.contextmanager
def system_metrics(run_id: str | None) -> Iterator[None]:
    """CPU, memory, disk, network (and GPU with nvidia-ml-py) metrics on a run while the block runs."""
    if not run_id:
        yield
        return
    from mlflow.environment_variables import MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL
    from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

    monitor = SystemMetricsMonitor(
        run_id,
        sampling_interval=MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL.get() or 10,
        tracking_uri=mlflow.get_tracking_uri(),
    )
    monitor.start()
    try:
        yield
    finally:
        monitor.finish()


def log_dataset(
    run_id: str | None, folder: str | Path, context: str, name: str, digest: str, profile: Mapping[str, Any]
) -> None:
    """Record a stage folder (`<runs_dir>/<kind>/<key>`, logged as `<kind>/<key>`) as a dataset the run
    read (`context` training, evaluation) or produced (`context` output), with its digest and counts."""
    if not run_id:
        return
    from mlflow.entities import Dataset, DatasetInput, InputTag

    source = "/".join(Path(folder).resolve().parts[-2:])
    dataset = Dataset(
        name=name,
        digest=digest[:36],
        source_type="local",
        source=json.dumps({"uri": source}),
        profile=json.dumps(dict(profile)),
    )
    MlflowClient().log_inputs(
        run_id, datasets=[DatasetInput(dataset, [InputTag("mlflow.data.context", context)])]
    )


def producer_of(folder: str | Path) -> str | None:
    """The id of the MLflow run that produced a stage folder, if recorded."""
    record = Path(folder) / PRODUCER
    return read_json(record).get("run_id") if record.is_file() else None


def record_or_link(folder: str | Path, run_id: str | None, stage: str) -> str | None:
    """Claim an unclaimed folder for this run, or link this run to the run that produced it: tag
    `reused.<stage>` and copy the producer's metric histories this run lacks. Returns the producer id."""
    if not run_id:
        return None
    close_trackers(run_id)  # this run's queued metrics first, so that only missing histories are copied
    producer = producer_of(folder)
    if producer is None:
        atomic_write_json(
            Path(folder) / PRODUCER, {"run_id": run_id, "tracking_uri": mlflow.get_tracking_uri()}
        )
        return None
    if producer == run_id:
        return None
    client = MlflowClient()
    client.set_tag(run_id, f"reused.{stage}", producer)
    try:
        source = client.get_run(producer)
    except MlflowException:  # produced under another tracking store: the tag still names it
        return producer
    have = set(client.get_run(run_id).data.metrics)
    for key in sorted(set(source.data.metrics) - have):
        if key.startswith("system/"):
            continue
        history = client.get_metric_history(producer, key)
        for start in range(0, len(history), 1000):
            client.log_batch(run_id, metrics=history[start : start + 1000])
    return producer


def _pinned(*packages: str) -> list[str]:
    """Requirements pinned to the versions running now (local tags such as +cpu dropped)."""
    from importlib.metadata import version

    return [f"{name}=={version(name).split('+')[0]}" for name in packages]


def model_digest(model_file: Path, tokenizer_dir: Path, *kind: Any) -> str:
    """What identifies a logged model: its weights, its tokenizer and its kind."""
    return json_digest(
        [file_digest(Path(model_file)), file_digest(Path(tokenizer_dir) / "tokenizer.model"), *kind]
    )[:32]


def reuse_logged_model(run_id: str, digest: str, name: str) -> str | None:
    """The URI of a model with this digest already logged in the run's experiment, with the run linked to
    it (an output of the run, tag `reused.model.<name>`); None when there is none."""
    from mlflow.entities import LoggedModelOutput

    client = MlflowClient()
    experiment = client.get_run(run_id).info.experiment_id
    same = mlflow.search_logged_models(
        experiment_ids=[experiment],
        output_format="list",
        filter_string=f"tags.`{MODEL_DIGEST_TAG}` = '{digest}'",
    )
    ready = [m for m in same if str(m.status).endswith("READY")]
    if not ready:
        return None
    client.log_outputs(run_id, [LoggedModelOutput(ready[0].model_id, step=0)])
    client.set_tag(run_id, f"reused.model.{name}", ready[0].model_id)
    return ready[0].model_uri


def log_generator_model(run_id: str, model_file: Path, tokenizer_dir: Path, chat: bool, name: str) -> str:
    """Log a pyfunc model bundling weights, tokenizer and config; return its models:/ URI.

    `mlflow.pyfunc.load_model(uri).predict(["def f(x):", ...])` then generates text in a fresh process
    with nothing else installed from this project. A model whose weights, tokenizer and kind were logged
    before in the experiment is not stored again: the run is linked to that one.
    """
    import tempfile

    from mlflow.models import infer_signature

    import llmcore

    digest = model_digest(model_file, tokenizer_dir, chat, name)
    reused = reuse_logged_model(run_id, digest, name)
    if reused:
        return reused

    # An unnamed string column: predict takes a list of prompts, or a DataFrame (its "prompt" column).
    signature = infer_signature(
        ["def add(a, b):"],
        ["    return a + b"],
        params={"max_new_tokens": 128, "temperature": 0.8, "top_k": 0, "top_p": 1.0, "seed": 0},
    )
    with tempfile.TemporaryDirectory() as tmp:
        config = Path(tmp) / "generator.json"
        config.write_text(json.dumps({"chat": chat}))
        # The model is logged inside the run by id; start_run here is local to this thread and call.
        with mlflow.start_run(run_id=run_id), warnings.catch_warnings():
            # An input example would run a generation at logging time; the signature describes the input.
            warnings.filterwarnings("ignore", message=".*input example", category=UserWarning)
            info = mlflow.pyfunc.log_model(
                name=name,
                python_model=str(Path(__file__).with_name("pyfunc_model.py")),
                artifacts={
                    "model": str(model_file),
                    "tokenizer": str(Path(tokenizer_dir) / "tokenizer.model"),
                    "config": str(config),
                },
                code_paths=[str(Path(llmcore.__file__).parent)],
                signature=signature,
                pip_requirements=_pinned("torch", "sentencepiece", "numpy", "pandas"),
                tags={MODEL_DIGEST_TAG: digest},
            )
    return info.model_uri
