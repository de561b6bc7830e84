"""Every `python -m flows.stages STAGE` command, chained corpus -> ... -> sample as the README shows, from a
fresh working folder: against the local store and against a real `mlflow server` that serves artifacts.

One real Prefect server (a subprocess) serves every stage call, so that each call does not start a
temporary server of its own; each stage is its own `python -m flows.stages` process, as a user runs it.
"""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

from llmcore.environment import environ_copy
from tests.servers import mlflow_server, prefect_server

pytestmark = pytest.mark.flow

ROOT = Path(__file__).resolve().parents[1]
STAGES = ("corpus", "tokenizer", "pretrain", "finetune", "evaluate", "sample")
TINY_MODEL = [
    "--vocab-size",
    "512",
    "--block-size",
    "64",
    "--n-layer",
    "1",
    "--n-head",
    "2",
    "--n-embd",
    "32",
]
TINY_TRAIN = ["--batch-size", "4", "--eval-batches", "2", "--device", "cpu"]


def stage(name: str, args: list[str], cwd: Path, env: dict[str, str]):
    """Run one stage command; return what it printed last (a path, or a dict of paths/metrics)."""
    done = subprocess.run(
        [sys.executable, "-m", "flows.stages", name, *args, "--experiment", "adhoc"],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, f"{name}: {done.stderr[-4000:]}"
    last = done.stdout.strip().splitlines()[-1]
    return ast.literal_eval(last) if last.startswith("{") else last


def run_chain(cwd: Path, env: dict[str, str]) -> dict:
    cwd.mkdir(parents=True)
    corpus = stage("corpus", ["--source", "stdlib", "--max-bytes", "300000"], cwd, env)
    tok = stage("tokenizer", ["--corpus-dir", corpus, "--vocab-size", "512"], cwd, env)
    pretrained = stage(
        "pretrain",
        [
            "--tokenizer-dir",
            tok["tokenizer_dir"],
            "--tokens-dir",
            tok["tokens_dir"],
            *TINY_MODEL,
            *TINY_TRAIN,
            "--max-steps",
            "6",
        ],
        cwd,
        env,
    )
    tuned = stage(
        "finetune",
        [
            "--base-model",
            pretrained,
            "--tokenizer-dir",
            tok["tokenizer_dir"],
            "--corpus-dir",
            corpus,
            *TINY_TRAIN,
            "--max-steps",
            "3",
        ],
        cwd,
        env,
    )
    scores = stage(
        "evaluate",
        [
            "--pretrained",
            pretrained,
            "--finetuned",
            tuned["model"],
            "--tokenizer-dir",
            tok["tokenizer_dir"],
            "--tokens-dir",
            tok["tokens_dir"],
            "--sft-dir",
            tuned["sft_dir"],
            "--max-tokens",
            "2000",
            "--device",
            "cpu",
        ],
        cwd,
        env,
    )
    samples = stage(
        "sample",
        [
            "--pretrained",
            pretrained,
            "--finetuned",
            tuned["model"],
            "--tokenizer-dir",
            tok["tokenizer_dir"],
            "--corpus-dir",
            corpus,
            "--sft-dir",
            tuned["sft_dir"],
            "--num-prompts",
            "2",
            "--max-new-tokens",
            "8",
            "--device",
            "cpu",
        ],
        cwd,
        env,
    )
    return {"corpus": corpus, **tok, "pretrained": pretrained, **tuned, "scores": scores, "samples": samples}


@pytest.fixture(scope="module")
def prefect_api(tmp_path_factory):
    with prefect_server(tmp_path_factory.mktemp("prefect-home")) as url:
        yield url


def _env(prefect_api: str, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in environ_copy().items() if not k.startswith(("MLFLOW_", "PREFECT_"))}
    return env | {
        "PYTHONPATH": str(ROOT),
        "PREFECT_API_URL": prefect_api,
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "HF_HUB_OFFLINE": "1",
        **extra,
    }


def check_runs(tracking_uri: str, prefect_api: str) -> list:
    """Six FINISHED runs named like their Prefect flow runs, each linked to it; returns the runs."""
    import mlflow
    from mlflow import MlflowClient
    from prefect.client.orchestration import SyncPrefectClient
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    mlflow.set_tracking_uri(tracking_uri)
    client = MlflowClient()
    experiment = client.get_experiment_by_name("adhoc")
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"
    runs = client.search_runs([experiment.experiment_id])
    assert sorted(r.data.tags["stage"] for r in runs) == sorted(STAGES)
    with SyncPrefectClient(prefect_api) as prefect:
        for run in runs:
            tags = run.data.tags
            assert run.info.status == "FINISHED" and run.info.run_name.startswith(tags["stage"] + "-")
            flow_run_id = tags["prefect.flow_run_id"]
            (flow_run,) = prefect.read_flow_runs(
                flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id]))
            )
            assert flow_run.name == run.info.run_name
            assert tags["prefect.flow_run_url"].endswith(flow_run_id)
            assert tags["mlflow.source.git.commit"] and tags["git.dirty"] in ("true", "false")
    return runs


def test_stage_commands_chain_against_the_local_store(tmp_path, prefect_api):
    cwd = tmp_path / "fresh"
    out = run_chain(cwd, _env(prefect_api))
    assert not (cwd / "mlflow.db").exists()  # no stray default store
    assert (cwd / "mlruns" / "mlflow.db").is_file() and (cwd / out["pretrained"]).is_file()
    assert 0 < out["scores"]["xz_bpb"] and out["samples"]["sample/num_completions"] == 16
    runs = check_runs(f"sqlite:///{cwd / 'mlruns' / 'mlflow.db'}", prefect_api)
    pretrain = next(r for r in runs if r.data.tags["stage"] == "pretrain")
    assert pretrain.data.params["pretrain.max_steps"] == "6"
    assert [i.dataset.name for i in pretrain.inputs.dataset_inputs] == ["tokens"]


def test_stage_commands_chain_against_a_server_and_the_model_loads_elsewhere(tmp_path, prefect_api):
    import mlflow
    from mlflow import MlflowClient

    with mlflow_server(tmp_path / "server") as server:
        cwd = tmp_path / "fresh"
        run_chain(cwd, _env(prefect_api, MLFLOW_TRACKING_URI=server.url))
        assert (
            not (cwd / "mlflow.db").exists() and not (cwd / "mlruns").exists()
        )  # everything went to the server
        check_runs(server.url, prefect_api)
        mlflow.set_tracking_uri(server.url)
        experiment = MlflowClient().get_experiment_by_name("adhoc")
        assert experiment.artifact_location.startswith("mlflow-artifacts:")  # the server's artifact proxy
        (model,) = [
            m
            for m in mlflow.search_logged_models(
                experiment_ids=[experiment.experiment_id], output_format="list"
            )
            if m.name == "finetuned"
        ]
        elsewhere = tmp_path / "elsewhere"
        elsewhere.mkdir()
        script = (
            "import mlflow, pandas as pd\n"
            f"model = mlflow.pyfunc.load_model({model.model_uri!r})\n"
            "out = model.predict(pd.DataFrame({'prompt': ['Add two numbers.']}), "
            "params={'max_new_tokens': 5})\n"
            "assert len(out) == 1 and isinstance(out[0], str), out\n"
            "print('OK')\n"
        )
        env = {k: v for k, v in environ_copy().items() if not k.startswith("MLFLOW_")} | {
            "MLFLOW_TRACKING_URI": server.url
        }
        env.pop("PYTHONPATH", None)  # the model's own code travels in its artifacts
        done = subprocess.run(
            [sys.executable, "-c", script],
            cwd=elsewhere,
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert done.returncode == 0 and done.stdout.strip().endswith("OK"), done.stderr[-3000:]


def test_prefect_home_is_ignored_by_git():
    done = subprocess.run(
        ["git", "-C", str(ROOT), "check-ignore", "-q", ".prefect/storage"], capture_output=True
    )
    assert done.returncode == 0
