"""deployments/prefect.yaml parses and points at a real flow with valid parameters."""

import importlib.util
from pathlib import Path

import yaml

ROOT = Path(__file__).parents[1]


def test_nightly_deployment_points_at_the_pipeline_flow():
    spec = yaml.safe_load((ROOT / "deployments" / "prefect.yaml").read_text())
    (deployment,) = spec["deployments"]
    assert deployment["schedules"][0]["cron"] == "0 2 * * *"
    path, name = deployment["entrypoint"].split(":")
    module_spec = importlib.util.spec_from_file_location("entry", ROOT / path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    flow = getattr(module, name)
    assert flow.name == "pipeline"
    flow.validate_parameters(deployment["parameters"])  # raises on a parameter the flow does not take
    params = module.PipelineParams(**deployment["parameters"]["params"])
    assert params.build().name == "cpu"
