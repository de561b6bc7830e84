"""Registry look-ups and the promotion gate's pieces, against a local MLflow store (no training)."""

import pytest

from llmcore.errors import ConfigError
from tasks.registry import PROMOTION_METRICS, beats, version_by_alias


def test_direction_of_every_gated_metric():
    for metric, better in PROMOTION_METRICS.items():
        assert beats(metric, 1.0, 2.0) == (better == "lower")
        assert not beats(metric, 1.5, 1.5)  # a tie keeps the champion


def test_unknown_registered_model_or_alias_is_one_line(tmp_path):
    import mlflow
    from mlflow import MlflowClient

    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    with pytest.raises(ConfigError, match="no registered model 'nope'.*none registered yet"):
        version_by_alias("nope", "champion")
    MlflowClient().create_registered_model("known")
    with pytest.raises(ConfigError, match="registered model 'known' has no alias 'gold'") as error:
        version_by_alias("known", "gold")
    assert "\n" not in str(error.value)
