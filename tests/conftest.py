"""Shared fixtures: one Prefect test harness per session, with result storage in a temporary folder
(cached results would otherwise leak across sessions), and MLflow/run folders under tmp paths."""

import os

import pytest

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_LOGGING_TO_API_WHEN_MISSING_FLOW", "ignore")  # llmcore used outside a flow
os.environ.setdefault("PREFECT_LOGGING_EXTRA_LOGGERS", "llmcore")
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")  # slow CI machines
if os.environ.get("PYTEST_XDIST_WORKER"):
    # one pytest worker per core (`make test`): each trains on one thread, and so do the processes it
    # starts, instead of every worker spinning a thread per core
    os.environ.setdefault("OMP_NUM_THREADS", "1")


@pytest.fixture(scope="session")
def prefect_harness(tmp_path_factory):
    from prefect.settings import PREFECT_RESULTS_LOCAL_STORAGE_PATH, temporary_settings
    from prefect.testing.utilities import prefect_test_harness

    storage = tmp_path_factory.mktemp("prefect-results")
    with temporary_settings({PREFECT_RESULTS_LOCAL_STORAGE_PATH: storage}):
        with prefect_test_harness(server_startup_timeout=90):
            yield


@pytest.fixture(autouse=True)
def _tracking_uri_restored():
    """`mlflow.set_tracking_uri` also sets MLFLOW_TRACKING_URI: keep one test's store out of the next."""
    before = os.environ.get("MLFLOW_TRACKING_URI")
    yield
    if before is None:
        os.environ.pop("MLFLOW_TRACKING_URI", None)
    else:
        os.environ["MLFLOW_TRACKING_URI"] = before
