"""The deployments on real servers: `deployments/serve.py up` (what `make serve` runs) on free loopback
ports, a tiny nightly run triggered with overridden parameters, checked through the MLflow client; then a
worse run that must leave the champion where it was. Every process started is stopped, also on failure."""

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from llmcore.environment import environ_copy

pytestmark = pytest.mark.servers

ROOT = Path(__file__).parents[1]
EXPERIMENT = "llm-pipeline-nightly"  # from prefect.yaml: must survive the per-run overrides


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def services(tmp_path_factory):
    state = tmp_path_factory.mktemp("serve")
    prefect_port, mlflow_port = free_port(), free_port()
    env = environ_copy(PYTHONPATH=str(ROOT))
    log = open(state / "serve.log", "w")
    serve = subprocess.Popen(
        [
            sys.executable,
            str(ROOT / "deployments" / "serve.py"),
            "up",
            "--state",
            str(state),
            "--mlruns",
            str(state / "mlruns"),
            "--prefect-port",
            str(prefect_port),
            "--mlflow-port",
            str(mlflow_port),
        ],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 420
        while "ready" not in (state / "serve.log").read_text():
            assert serve.poll() is None, (state / "serve.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "serve.py up did not get ready"
            time.sleep(1)
        yield {
            "state": state,
            "api": f"http://127.0.0.1:{prefect_port}/api",
            "mlflow": f"http://127.0.0.1:{mlflow_port}",
            "env": {
                **env,
                "PREFECT_API_URL": f"http://127.0.0.1:{prefect_port}/api",
                "MLFLOW_TRACKING_URI": f"http://127.0.0.1:{mlflow_port}",
            },
        }
    finally:
        if serve.poll() is None:
            serve.send_signal(signal.SIGINT)  # what Ctrl-C does: serve.py stops everything it started
            try:
                serve.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(serve.pid, signal.SIGKILL)
        subprocess.run(
            [sys.executable, str(ROOT / "deployments" / "serve.py"), "down", "--state", str(state)], env=env
        )
        assert not list((state / "pids").glob("*.pid"))


def prefect(services, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(Path(sys.executable).parent / "prefect"), *args],
        env=services["env"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def trigger_and_wait(services, deployment_name: str = "pipeline/nightly-cpu", **params) -> tuple[str, float]:
    """Run a deployment with `params` overriding its defaults; return (final state name, seconds)."""
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    started = time.monotonic()
    with temporary_settings({PREFECT_API_URL: services["api"]}), get_client(sync_client=True) as client:
        deployment = client.read_deployment_by_name(deployment_name)
        run = client.create_flow_run_from_deployment(deployment.id, parameters=params)
        while True:
            state = client.read_flow_run(run.id).state
            if state.is_final():
                return state.name, time.monotonic() - started
            assert time.monotonic() - started < 900, "the flow run did not finish"
            time.sleep(2)


TINY = dict(preset="tiny", device="cpu", seed=3)


@pytest.fixture(scope="module")
def two_runs(services, tmp_path_factory):
    runs = str(tmp_path_factory.mktemp("runs"))
    first = trigger_and_wait(services, **TINY, runs_dir=runs)
    worse = trigger_and_wait(services, **TINY, runs_dir=runs, max_steps=2, finetune_steps=1)
    print(f"\ntrigger-to-completion: {first[1]:.1f} s (tiny), {worse[1]:.1f} s (2 steps)")
    return first, worse


def test_two_runs_register_and_gate_the_champion(services, two_runs):
    import mlflow
    from mlflow import MlflowClient

    (first, _), (worse, _) = two_runs
    assert first == worse == "Completed"
    mlflow.set_tracking_uri(services["mlflow"])
    client = MlflowClient()
    experiment = client.get_experiment_by_name(EXPERIMENT)  # the deployment's default was kept
    parents = [
        r
        for r in client.search_runs([experiment.experiment_id], order_by=["attributes.start_time ASC"])
        if "mlflow.parentRunId" not in r.data.tags
    ]
    assert len(parents) == 2 and all(p.info.status == "FINISHED" for p in parents)
    assert parents[0].data.params["preset"] == "tiny" and parents[1].data.params["pretrain.max_steps"] == "2"
    assert parents[0].data.tags["prefect.flow_run_id"]

    name = f"{EXPERIMENT}-pretrained"
    versions = sorted(client.search_model_versions(f"name = '{name}'"), key=lambda v: int(v.version))
    assert [v.version for v in versions] == ["1", "2"]
    assert [v.run_id for v in versions] != [None, None]
    assert {v.run_id for v in versions} <= {
        r.info.run_id for r in client.search_runs([experiment.experiment_id])
    }
    first_tags, worse_tags = versions[0].tags, versions[1].tags
    assert first_tags["promotion.promoted"] == "true" and "promotion.champion_score" not in first_tags
    assert worse_tags["promotion.promoted"] == "false"
    assert float(worse_tags["promotion.challenger_score"]) > float(worse_tags["promotion.champion_score"])
    assert float(worse_tags["promotion.champion_score"]) == pytest.approx(
        float(first_tags["promotion.challenger_score"])
    )
    assert "eval.bpb" in first_tags
    assert client.get_model_version_by_alias(name, "champion").version == "1"
    assert client.get_model_version_by_alias(name, "challenger").version == "2"
    instruct = client.get_model_version_by_alias(f"{EXPERIMENT}-instruct", "champion")
    print("decisions:", first_tags["promotion.decision"], "|", worse_tags["promotion.decision"])

    # the champion generates in a fresh process, through the server, from a list of strings
    script = (
        "import mlflow\n"
        f"model = mlflow.pyfunc.load_model('models:/{EXPERIMENT}-instruct@champion')\n"
        "out = model.predict(['Return the sum of a and b.', 'Open a file.'], params={'max_new_tokens': 8})\n"
        "assert len(out) == 2 and all(isinstance(t, str) for t in out), out\nprint('OK')\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], env=services["env"], capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0 and "OK" in done.stdout, done.stderr[-3000:]
    assert instruct.version == "1"


def test_weekly_champion_evaluation_and_ad_hoc_sampling_deployments(services, two_runs, tmp_path):
    import mlflow
    from mlflow import MlflowClient

    evaluated, _ = trigger_and_wait(
        services,
        "champion-evaluation/weekly-champion",
        runs_dir=str(tmp_path),
        corpus={"source": "stdlib", "max_bytes": 1_000_000},
        evaluation={"max_tokens": 2048},
    )
    sampled, _ = trigger_and_wait(
        services, "sample-registered-model/sample", prompts=["Open a file."], sampling={"max_new_tokens": 8}
    )
    assert evaluated == sampled == "Completed"
    mlflow.set_tracking_uri(services["mlflow"])
    champion = MlflowClient().get_model_version_by_alias(f"{EXPERIMENT}-pretrained", "champion")
    weekly = [k for k in champion.tags if k.startswith("weekly.") and k.endswith(".bpb")]
    assert weekly and 0 < float(champion.tags[weekly[0]]) < 10


def test_prefect_shows_artifacts_and_forwarded_training_logs(services, two_runs):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        ArtifactFilter,
        ArtifactFilterKey,
        LogFilter,
        LogFilterName,
    )
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings({PREFECT_API_URL: services["api"]}), get_client(sync_client=True) as client:
        keys = {
            a.key
            for a in client.read_artifacts(
                artifact_filter=ArtifactFilter(
                    key=ArtifactFilterKey(any_=["pipeline-report", "promotion", "pretrain-progress"])
                )
            )
        }
        assert keys == {"pipeline-report", "promotion", "pretrain-progress"}
        progress = [a for a in client.read_artifacts() if a.type == "progress"]
        assert progress and max(float(a.data) for a in progress) == 100.0
        logs = client.read_logs(
            log_filter=LogFilter(name=LogFilterName(any_=["llmcore.train", "llmcore.pipeline"]))
        )
        assert logs, "the llmcore loggers did not reach the Prefect API"
        assert (
            client.read_global_concurrency_limit_by_name("gpu").limit == 1
        )  # two trainings never share a GPU


@pytest.mark.parametrize(
    "params, message",
    [
        ({"preset": "huge"}, "Validation failed for field 'preset'"),
        ({"max_step": 5}, "specified but not found on the deployment: 'max_step'"),
        ({"max_steps": "many"}, "Validation failed for field 'max_steps'"),
    ],
)
def test_bad_deployment_parameters_are_refused_when_the_run_is_created(services, params, message):
    args = [a for k, v in params.items() for a in ("--param", f"{k}={v}")]
    done = prefect(services, "deployment", "run", "pipeline/nightly-cpu", *args)
    assert done.returncode != 0
    assert message in " ".join((done.stdout + done.stderr).split()), done.stdout[-2000:]


def test_unknown_registered_model_or_alias_is_one_line(services, two_runs):
    for argv, message in (
        (["--model-name", "nope"], "no registered model 'nope'"),
        (["--model-name", f"{EXPERIMENT}-instruct", "--alias", "gold"], "has no alias 'gold'"),
    ):
        done = subprocess.run(
            [sys.executable, "-m", "flows.champion", "sample", *argv],
            env=services["env"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=300,
        )
        lines = [line for line in done.stderr.splitlines() if line.startswith("error: ")]
        assert done.returncode == 2 and len(lines) == 1 and message in lines[0], done.stderr[-2000:]


def test_down_stops_a_serve_up_waiting_in_the_foreground(tmp_path):
    """`make serve` then `make down` from another shell: the waiting `up` (in the caller's process group,
    as make runs it) exits 0 having stopped every service once, and no service process is left."""
    serve = [sys.executable, str(ROOT / "deployments" / "serve.py")]
    state, log = tmp_path / "serve", tmp_path / "up.log"
    ports = ["--prefect-port", str(free_port()), "--mlflow-port", str(free_port())]
    env = environ_copy(PYTHONPATH=str(ROOT))
    up = subprocess.Popen(
        [*serve, "up", "--state", str(state), "--mlruns", str(tmp_path / "mlruns"), *ports],
        env=env,
        stdout=open(log, "w"),
        stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.monotonic() + 420
        while "ready" not in log.read_text():
            assert up.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(1)
        groups = [int(p.read_text()) for p in (state / "pids").glob("*.pid")]
        down = subprocess.run(
            [*serve, "down", "--state", str(state)], env=env, capture_output=True, text=True, timeout=180
        )
        assert down.returncode == 0 and down.stdout.startswith("stopped: serve.py up, "), down
        assert up.wait(timeout=30) == 0
    finally:
        if up.poll() is None:
            up.kill()
            subprocess.run([*serve, "down", "--state", str(state)], env=env, timeout=180)
    printed = log.read_text()
    assert printed.count("stopped: ") == 1 and "Traceback" not in printed, printed[-3000:]
    assert len(groups) == 3
    for group in groups:
        with pytest.raises(ProcessLookupError):
            os.killpg(group, 0)
    assert not list(state.glob("**/*.pid"))
