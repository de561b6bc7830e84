"""Orchestration choices in the task layer: what is retried, and what cache keys depend on."""

import shutil
from dataclasses import replace

from prefect.states import Completed, Failed

from llmcore.errors import ConfigError
from llmcore.sft_data import SFTDataConfig
from llmcore.train import TrainConfig, TrainingDiverged, result_fields
from tasks.stages import _sft_source_digest, retry_unless_bad_input


def test_io_errors_are_retried_but_bad_input_and_divergence_are_not():
    assert retry_unless_bad_input(None, None, Failed(data=OSError("disk hiccup")))
    assert not retry_unless_bad_input(None, None, Failed(data=ConfigError("bad: pass --x")))
    assert not retry_unless_bad_input(None, None, Failed(data=TrainingDiverged("nan")))
    assert not retry_unless_bad_input(None, None, Completed(data=1))


def test_resume_and_cache_keys_ignore_how_a_run_is_executed_or_reported():
    base = TrainConfig()
    assert result_fields(base) == result_fields(
        TrainConfig(device="cpu", log_interval=1, checkpoint_interval=7)
    )
    assert result_fields(base) != result_fields(TrainConfig(learning_rate=base.learning_rate / 2))


def test_user_fine_tuning_data_is_keyed_on_its_content(tmp_path):
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text('{"prompt": "a", "response": "b"}\n')
    config = SFTDataConfig(source=str(pairs))
    before = _sft_source_digest(config)
    pairs.write_text('{"prompt": "a", "response": "c"}\n')
    assert _sft_source_digest(config) != before
    assert _sft_source_digest(SFTDataConfig()) is None  # docstrings: keyed on the corpus digest instead


def test_hf_fine_tuning_data_is_keyed_on_its_files_split_and_revision(tmp_path):
    import datasets

    saved = tmp_path / "saved"
    datasets.Dataset.from_dict({"prompt": ["a"], "response": ["b"]}).save_to_disk(str(saved))
    config = SFTDataConfig(source=f"hf:{saved}")
    before = _sft_source_digest(config)
    assert _sft_source_digest(replace(config, hf_split="other")) != before
    assert _sft_source_digest(replace(config, hf_revision="v2")) != before  # also in asdict(config)
    assert _sft_source_digest(config) == before
    datasets.Dataset.from_dict({"prompt": ["a"], "response": ["c"]}).save_to_disk(str(tmp_path / "new"))
    shutil.rmtree(saved)
    (tmp_path / "new").rename(saved)
    assert _sft_source_digest(config) != before


def test_training_holds_the_gpu_limit_only_where_the_server_has_one(prefect_harness, caplog):
    """Ad-hoc runs (no "gpu" limit) get no warning per training; served runs hold a slot of the limit."""
    from prefect import flow, get_client
    from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate
    from prefect.concurrency.sync import concurrency

    from tasks.stages import GPU_SLOT, gpu_slot

    def warnings() -> int:
        return sum("do not exist" in record.getMessage() for record in caplog.records)

    @flow
    def probe() -> tuple[int, int, int]:
        with concurrency(GPU_SLOT, occupy=1):  # Prefect's own call, for comparison: it warns
            pass
        prefect_warns = warnings()
        with gpu_slot():
            pass
        ours_warn = warnings() - prefect_warns
        with get_client(sync_client=True) as client:
            client.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name=GPU_SLOT, limit=1))
            try:
                with gpu_slot():
                    held = client.read_global_concurrency_limit_by_name(GPU_SLOT).active_slots
            finally:
                client.delete_global_concurrency_limit_by_name(GPU_SLOT)
        return prefect_warns, ours_warn, held

    with caplog.at_level("WARNING"):
        assert probe() == (1, 0, 1)
