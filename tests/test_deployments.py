"""deployments/prefect.yaml parses, points at real flows with valid parameters, and has valid crons; the
pipeline's parameters merge key by key (one top-level flow parameter per PipelineParams field)."""

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).parents[1]
SPEC = yaml.safe_load((ROOT / "deployments" / "prefect.yaml").read_text())


def load_flow(entrypoint: str):
    path, name = entrypoint.split(":")
    module_spec = importlib.util.spec_from_file_location(Path(path).stem, ROOT / path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return getattr(module, name)


def test_deployments_are_nightly_weekly_and_ad_hoc():
    crons = {d["name"]: [s["cron"] for s in d.get("schedules") or []] for d in SPEC["deployments"]}
    assert crons == {"nightly-cpu": ["0 2 * * *"], "weekly-champion": ["0 6 * * 1"], "sample": []}


@pytest.mark.parametrize("deployment", SPEC["deployments"], ids=lambda d: d["name"])
def test_every_deployment_points_at_a_flow_that_takes_its_parameters(deployment):
    flow = load_flow(deployment["entrypoint"])
    flow.validate_parameters(deployment["parameters"])  # raises on a parameter the flow does not take


def test_a_run_override_merges_with_the_deployment_defaults():
    from flows.pipeline import PipelineParams, pipeline

    (nightly,) = [d for d in SPEC["deployments"] if d["name"] == "nightly-cpu"]
    merged = pipeline.validate_parameters(
        {**nightly["parameters"], "max_steps": "7"}
    )  # what a run override does
    params = PipelineParams(**merged)
    assert (
        params.experiment == "llm-pipeline-nightly" and params.max_steps == 7 and params.build().name == "cpu"
    )


def test_preset_is_a_choice_in_the_flow_schema():
    from prefect.utilities.callables import parameter_schema

    from flows.pipeline import PipelineParams, pipeline
    from llmcore.presets import PRESETS

    schema = parameter_schema(pipeline).model_dump()["properties"]
    assert set(schema) == set(PipelineParams.model_fields)
    assert schema["preset"]["enum"] == list(PRESETS)


def test_an_invalid_cron_is_refused_in_one_line(tmp_path):
    bad = tmp_path / "prefect.yaml"
    spec = yaml.safe_load((ROOT / "deployments" / "prefect.yaml").read_text())
    spec["deployments"][0]["schedules"][0]["cron"] = "0 2 * *"
    bad.write_text(yaml.safe_dump(spec))
    done = subprocess.run(
        [
            sys.executable,
            str(ROOT / "deployments" / "serve.py"),
            "up",
            "--state",
            str(tmp_path / "s"),
            "--prefect-file",
            str(bad),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2
    (line,) = done.stderr.strip().splitlines()
    assert line.startswith("error: ") and "invalid cron '0 2 * *'" in line and "nightly-cpu" in line
    assert not list((tmp_path / "s").glob("pids/*.pid"))  # nothing was started
