"""Training under torchrun on CPU (gloo): two ranks with half the per-rank batch train like one rank with the
whole batch (pretraining and fine-tuning), a run resumes across world sizes and across DDP and FSDP2, ranks
that disagree on their config stop with one line, and the pipeline's pretraining task launches torchrun
and hands rank 0 its MLflow run.

Each torchrun launch takes a few seconds (two Python processes importing torch): the launches are marked
`distributed`; the pure checks below them are not."""

import argparse
import json
import logging
import shutil
import socket
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from llmcore.cli import to_flags
from llmcore.distributed import LaunchConfig, torchrun_command
from llmcore.errors import ConfigError
from llmcore.model import GPTConfig
from llmcore.train import TrainConfig, pretrain
from tasks import distributed as launcher
from tests.tiny_run import build_data, env, weights

MODEL = GPTConfig(vocab_size=400, block_size=32, n_layer=2, n_head=2, n_embd=64)
# A global micro-batch of 4 rows, two micro-steps per optimizer step (so no_sync is on the path), and a
# checkpoint after every step: each step's loss is read back from its checkpoint's JSON.
TRAIN = TrainConfig(
    max_steps=6,
    batch_size=4,
    grad_accum_steps=2,
    warmup_steps=2,
    eval_interval=100,
    eval_batches=3,  # at the last step: 2 ranks score 2 and 1 of them
    checkpoint_interval=1,
    keep_checkpoints=100,
    log_interval=1,
    device="cpu",
)
LOSS_TOLERANCE = 1e-5  # nats; summing two ranks' gradients rounds differently from one rank's sum
WEIGHT_TOLERANCE = 5e-5  # after 6 AdamW steps, which divide by the root of tiny second moments


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, Path]:
    return build_data(tmp_path_factory.mktemp("ddp-data"))


@pytest.fixture(scope="module")
def one_rank(data, tmp_path_factory) -> Path:
    """The reference: one process, the whole batch, in this process."""
    out = tmp_path_factory.mktemp("one-rank")
    pretrain(data["tokenizer"], data["tokens"], MODEL, TRAIN, out)
    return out


def step_losses(out: Path) -> list[float]:
    return [
        json.loads(path.read_text())["metrics"]["loss"]
        for path in sorted((out / "checkpoints").glob("step_*.json"))
    ]


def max_weight_diff(a: Path, b: Path) -> float:
    wa, wb = weights(a / "model.pt"), weights(b / "model.pt")
    return max(float((wa[name] - wb[name]).abs().max()) for name in wa)


def resume_from(source: Path, out: Path, step: int) -> Path:
    """`out` holding the checkpoints of `source` up to `step`, as a run killed after that step left it."""
    (out / "checkpoints").mkdir(parents=True)
    for path in (source / "checkpoints").glob("step_*"):
        if int(path.stem.removeprefix("step_")) <= step:
            shutil.copy(path, out / "checkpoints" / path.name)
    return out


def assert_same_training(
    reference: Path, other: Path, validation: tuple[str, ...] = ("val_loss", "val_bpb")
) -> None:
    expected, got = step_losses(reference), step_losses(other)
    assert len(expected) == len(got) == TRAIN.max_steps
    diffs = [abs(a - b) for a, b in zip(expected, got, strict=True)]
    print(f"{other.name}: max abs loss diff per step {[f'{d:.1e}' for d in diffs]}")
    assert max(diffs) < LOSS_TOLERANCE, diffs
    assert max_weight_diff(reference, other) < WEIGHT_TOLERANCE
    final = [
        json.loads(max((out / "checkpoints").glob("step_*.json")).read_text())["metrics"]
        for out in (reference, other)
    ]
    for key in validation:  # the ranks' shares of the validation pass add up to one pass
        assert abs(final[0][key] - final[1][key]) < LOSS_TOLERANCE, key


@pytest.mark.distributed
def test_two_ranks_with_half_the_batch_train_like_one_and_rank_0_alone_logs(
    prefect_harness, data, one_rank, tmp_path, monkeypatch
):
    """Through the pipeline's pretraining task (real Prefect task run, real MLflow store), with 2 ranks;
    then the 2-rank run, killed after step 3, resumes on one process and still matches."""
    from mlflow import MlflowClient
    from prefect import flow

    from tasks import stages
    from tasks.tracking import configure_tracking, mlflow_run

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.setenv("PYTHONPATH", env()["PYTHONPATH"])  # the launched ranks import this worktree
    monkeypatch.setenv("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", "1")  # its monitor stops within a sample
    configure_tracking()

    @flow
    def two_ranks() -> tuple[str, str]:
        with mlflow_run("ddp-test", "pretrain-ddp") as run_id:
            launch = LaunchConfig(nproc_per_node=2)
            model_file = stages.pretrain(
                str(data["tokenizer"]), str(data["tokens"]), MODEL, TRAIN, "runs", run_id, launch
            )
            return model_file, run_id

    model_file, run_id = two_ranks()
    two = Path(model_file).parent
    assert_same_training(one_rank, two)

    client = MlflowClient()
    history = client.get_metric_history(run_id, "pretrain/loss")
    assert sorted(m.step for m in history) == list(range(1, TRAIN.max_steps + 1))  # once per step: rank 0
    params = client.get_run(run_id).data.params
    assert params["launch.nproc_per_node"] == "2" and params["model.n_embd"] == "64"  # the ranks' params

    resumed = resume_from(two, tmp_path / "resumed-on-one", step=3)
    pretrain(data["tokenizer"], data["tokens"], MODEL, TRAIN, resumed)
    assert_same_training(one_rank, resumed)


@pytest.mark.distributed
def test_fsdp_resumes_a_single_process_checkpoint_and_matches_it(data, one_rank, tmp_path):
    out = resume_from(one_rank, tmp_path / "fsdp", step=3)
    launcher.pretrain(
        LaunchConfig(nproc_per_node=2),
        str(data["tokenizer"]),
        str(data["tokens"]),
        MODEL,
        replace(TRAIN, fsdp=True),
        out,
        None,
        logging.getLogger("test"),
    )
    assert_same_training(one_rank, out)


@pytest.mark.distributed
def test_two_ranks_fine_tune_like_one_with_different_trained_tokens_per_rank(data, one_rank, tmp_path):
    """Pairs train on their response tokens only, so the ranks hold different numbers of trained tokens:
    the loss still weighs every trained token of the global batch alike, so 2 ranks of 2 rows train like
    1 rank of 4."""
    from llmcore.finetune import finetune

    base = str(one_rank / "model.pt")
    finetune(Path(base), data["tokenizer"], data["sft"], TRAIN, tmp_path / "one")
    launch = LaunchConfig(nproc_per_node=2)
    args = (str(data["tokenizer"]), str(data["sft"]), TRAIN, tmp_path / "two", None, None)
    launcher.finetune(launch, base, *args, logging.getLogger("test"))
    assert_same_training(tmp_path / "one", tmp_path / "two", validation=("val_loss",))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _score_a_share(rank: int, port: int, out: str) -> None:
    """One of two gloo ranks: a DDP-wrapped tiny GPT scores 3 validation batches with `shared_scores`."""
    import torch.distributed as dist

    from llmcore import distributed
    from llmcore.losses import token_loss
    from llmcore.model import GPT

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        torch.manual_seed(0)  # the same weights and batches on both ranks
        model = GPT(MODEL)
        batches = [(torch.randint(0, 400, (2, 16)), torch.randint(0, 400, (2, 16))) for _ in range(3)]
        trained = torch.nn.parallel.DistributedDataParallel(model)
        scored = []

        def score(module, share):
            scored.append((module is model, len(share)))
            return token_loss(module, share, torch.device("cpu"), torch.ones(400, dtype=torch.long))

        context = distributed.Context(rank=rank, local_rank=rank, world_size=2)
        shared = distributed.shared_scores(context, trained, batches, score, torch.device("cpu"))
        whole = token_loss(model, batches, torch.device("cpu"), torch.ones(400, dtype=torch.long))
        Path(out, f"rank{rank}.json").write_text(
            json.dumps({"scored": scored, "shared": shared, "whole": whole})
        )
    finally:
        dist.destroy_process_group()


@pytest.mark.distributed
def test_ranks_share_a_validation_pass_and_its_sums_make_the_whole(tmp_path):
    torch.multiprocessing.spawn(_score_a_share, args=(_free_port(), str(tmp_path)), nprocs=2)
    ranks = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in (0, 1)]
    assert [r["scored"] for r in ranks] == [[[True, 2]], [[True, 1]]]  # batches 0, 2 and 1, unwrapped
    for r in ranks:
        for key in ("loss", "bpb", "tokens", "bytes"):
            assert r["shared"][key] == pytest.approx(r["whole"][key], rel=1e-6), key


@pytest.mark.distributed
def test_ranks_that_disagree_on_their_config_stop_with_one_line(data, tmp_path):
    """Two ranks started by hand (as torchrun would) with different learning rates."""
    port, processes = _free_port(), []
    for rank, lr in ((0, "0.001"), (1, "0.002")):
        rank_env = env() | {
            "RANK": str(rank),
            "LOCAL_RANK": str(rank),
            "WORLD_SIZE": "2",
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
        }
        args = [
            "--tokenizer",
            str(data["tokenizer"]),
            "--tokens",
            str(data["tokens"]),
            "--out",
            str(tmp_path),
        ]
        command = [sys.executable, "-m", "llmcore.train", *args, *to_flags(MODEL, skip=("vocab_size",))]
        command += [*to_flags(TRAIN), "--learning-rate", lr]
        processes.append(subprocess.Popen(command, env=rank_env, stderr=subprocess.PIPE, text=True))
    for process in processes:
        _, stderr = process.communicate(timeout=120)
        assert process.returncode == 2, stderr[-2000:]
        assert "Traceback" not in stderr
        assert (
            stderr.strip()
            .splitlines()[-1]
            .endswith(
                "error: ranks 1 disagree with rank 0 on config: launch every rank with the same flags, data "
                "and checkpoint folder (a shared --out on every node)"
            )
        )
    assert not list(tmp_path.glob("checkpoints/step_*"))


@pytest.mark.distributed
def test_the_launcher_fails_with_the_ranks_error_line(data, tmp_path):
    with pytest.raises(
        ConfigError, match=r"^batch_size 3 does not split over 2 processes: pass --batch-size"
    ):
        launcher.pretrain(
            LaunchConfig(nproc_per_node=2),
            str(data["tokenizer"]),
            str(data["tokens"]),
            MODEL,
            replace(TRAIN, batch_size=3),
            tmp_path,
            None,
            logging.getLogger("test"),
        )


def test_configs_travel_to_the_ranks_as_flags_unchanged():
    from llmcore.cli import add_config_flags, given

    config = replace(TRAIN, compile=False, fsdp=True, learning_rate=3e-4 / 7, max_tokens=12345)
    parser = argparse.ArgumentParser()
    add_config_flags(parser, TrainConfig)
    parsed = given(TrainConfig, vars(parser.parse_args(to_flags(config))))
    assert TrainConfig(**parsed) == config


def test_launch_commands_and_bad_launches():
    one_node = torchrun_command(LaunchConfig(nproc_per_node=4), "llmcore.train", ["--out", "x"], "py")
    assert one_node == "py -m torch.distributed.run --nnodes 1 --nproc-per-node 4 --standalone".split() + [
        "-m",
        "llmcore.train",
        "--out",
        "x",
    ]
    two_nodes = torchrun_command(LaunchConfig(2, 8, "head:29400"), "llmcore.finetune", [], "py")
    assert "--rdzv-endpoint head:29400" in " ".join(two_nodes) and "--standalone" not in two_nodes
    with pytest.raises(ConfigError, match="--rdzv-endpoint HOST:PORT"):
        LaunchConfig(nnodes=2)
    with pytest.raises(ConfigError, match="nproc_per_node must be a positive"):
        LaunchConfig(nproc_per_node=0)


@pytest.mark.parametrize(
    "line, error",
    [
        (
            "[rank0]: llmcore.train.TrainingDiverged: loss became nan",
            "llmcore.train.TrainingDiverged: loss became nan",
        ),
        (
            "[rank1]: torch.OutOfMemoryError: CUDA out of memory.",
            "torch.OutOfMemoryError: CUDA out of memory.",
        ),
        ("train.py: error: batch_size 3 does not split", "train.py: error: batch_size 3 does not split"),
        ("torch.distributed.elastic.multiprocessing.errors.ChildFailedError: ", None),  # torchrun's summary
        ("2026-11-30 01:33:38,632 pretrain step 1/6 | loss 5.9804", None),
    ],
)
def test_the_launcher_picks_the_ranks_error_lines(line, error):
    assert launcher.error_line(line) == error


def test_the_pipeline_refuses_a_batch_that_does_not_split_over_its_processes():
    from flows.pipeline import PipelineParams

    assert PipelineParams(nproc_per_node=2, batch_size=8).launch().world_size == 2
    with pytest.raises(ConfigError, match="batch_size 6 does not split over 4 processes"):
        PipelineParams(nproc_per_node=4, batch_size=6).build()
