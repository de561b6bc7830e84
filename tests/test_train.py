"""The training loop: schedule, deterministic batches, bit-exact resume, divergence handling."""

import json

import numpy as np
import pytest
import torch

from llmcore.checkpoint import (
    checkpoint_path,
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    save_checkpoint,
)
from llmcore.errors import ConfigError
from llmcore.model import GPT, GPTConfig
from llmcore.shards import TokenSplit
from llmcore.train import TrainConfig, TrainingDiverged, fit, learning_rate_at, token_windows

MODEL = GPTConfig(vocab_size=64, block_size=16, n_layer=2, n_head=2, n_embd=32)


def split(tokens: int, seed: int = 0) -> TokenSplit:
    data = np.random.default_rng(seed).integers(0, 64, size=tokens).astype(np.uint16)
    return TokenSplit(shards=[data[: tokens // 2], data[tokens // 2 :]], num_tokens=tokens)


def config(**overrides) -> TrainConfig:
    base = dict(
        max_steps=6,
        batch_size=4,
        grad_accum_steps=2,
        learning_rate=1e-2,
        warmup_steps=2,
        eval_interval=3,
        eval_batches=2,
        checkpoint_interval=3,
        log_interval=1,
        device="cpu",
    )
    return TrainConfig(**{**base, **overrides})


def windows(cfg: TrainConfig, tokens: int = 4000):
    return token_windows(
        split(tokens), MODEL.block_size, cfg.batch_size, cfg.seed, "train", cfg.shift_windows
    )


def run(tmp, cfg, batches=None):
    torch.manual_seed(cfg.seed)
    model = GPT(MODEL)
    batches = batches or windows(cfg)
    val = token_windows(split(1000, seed=1), MODEL.block_size, cfg.batch_size, 0, "validation").in_order(2)
    metrics = fit(model, batches, val, cfg, tmp, token_bytes=torch.ones(64, dtype=torch.long))
    return model, metrics


def test_learning_rate_warms_up_then_decays_to_the_floor():
    cfg = config(max_steps=100, warmup_steps=10, learning_rate=1.0, min_lr_ratio=0.1)
    lrs = [learning_rate_at(s, 100, cfg) for s in range(100)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(lrs[9:], lrs[10:], strict=False))
    assert lrs[-1] == pytest.approx(0.1, abs=1e-3)


def test_token_budget_sets_the_number_of_steps():
    assert config(max_tokens=1000, batch_size=4, grad_accum_steps=2).total_steps(block_size=16) == 8


def test_windows_are_deterministic_and_cover_every_window_once_per_epoch():
    windows = token_windows(split(4000), 16, 4, seed=3, name="train")
    again = token_windows(split(4000), 16, 4, seed=3, name="train")
    assert torch.equal(windows.get(5)[0], again.get(5)[0])
    x, y = windows.get(0)
    assert torch.equal(x[:, 1:], y[:, :-1])  # targets are inputs shifted by one
    seen = sorted(windows._index(s)[0] for s in range(windows.num_rows))
    assert seen == list(range(windows.num_rows))


def test_shifted_windows_move_each_epoch_after_the_first_and_stay_slices_of_their_shard():
    shard = split(4000).shards[0]  # 2000 tokens: 124 windows of 16, 15 tokens left over
    shifted = token_windows(split(4000), 16, 4, seed=3, name="train", shift=True)
    plain = token_windows(split(4000), 16, 4, seed=3, name="train")
    per_epoch = shifted.num_rows // 4
    for batch in range(per_epoch):  # epoch 0 reads the unshifted windows
        assert torch.equal(shifted.get(batch)[0], plain.get(batch)[0])
    offsets = set()
    again = token_windows(split(4000), 16, 4, seed=3, name="train", shift=True)
    for batch in range(per_epoch, 4 * per_epoch):  # epochs 1-3
        (x, y), (x_again, _) = shifted.get(batch), again.get(batch)
        assert torch.equal(x, x_again) and torch.equal(x[:, 1:], y[:, :-1])
        for row in range(4):
            index, epoch = shifted._index(batch * 4 + row)
            if index < 124:  # a window of shard 0: where in the shard does it start?
                starts = [o for o in range(16) if np.array_equal(shard[index * 16 + o :][:16], x[row])]
                assert len(starts) == 1
                offsets.add((epoch, starts[0]))
    assert {epoch for epoch, _ in offsets} == {1, 2, 3}
    assert len({offset for _, offset in offsets}) > 1  # one shift per epoch, not the same in all
    assert len(offsets) == 3


def test_too_few_tokens_for_one_context_is_a_config_error():
    with pytest.raises(ConfigError, match="block-size"):
        token_windows(split(10), 16, 4, 0, "validation")


def test_bad_train_config_is_rejected_before_training():
    for bad in (dict(learning_rate=float("nan")), dict(max_steps=0), dict(batch_size=-1), dict(device="tpu")):
        with pytest.raises(ConfigError):
            config(**bad)


def test_training_lowers_the_loss_and_reports_metrics(tmp_path):
    cfg = config(max_steps=30, checkpoint_interval=30, eval_interval=30)
    data = np.tile(np.arange(64, dtype=np.uint16), 60)  # a learnable, repeating sequence
    batches = token_windows(TokenSplit([data], len(data)), 16, 4, 0, "train")
    _, metrics = run(tmp_path, cfg, batches)
    assert metrics["loss"] < 2.0 < np.log(64)
    assert metrics["tokens_per_second"] > 0 and metrics["steps"] == 30
    assert metrics["val_bpb"] == pytest.approx(metrics["val_loss"] / np.log(2))  # one byte per token here


@pytest.mark.parametrize("shift", [False, True])
def test_resume_is_bit_identical_to_an_uninterrupted_run(tmp_path, shift):
    cfg = config(shift_windows=shift)
    straight, _ = run(tmp_path / "straight", cfg, windows(cfg, 400) if shift else None)  # 6 batches an epoch

    batches = windows(cfg, 400 if shift else 4000)
    real_get = batches.get

    def killed_during_step_5(index, *part):  # after the step-3 checkpoint, with step 4 done and lost
        if index >= 4 * cfg.grad_accum_steps + 1:
            raise KeyboardInterrupt("killed")
        return real_get(index, *part)

    batches.get = killed_during_step_5
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "resumed", cfg, batches)
    assert latest_checkpoint(tmp_path / "resumed").name == "step_000003.pt"
    assert load_checkpoint(tmp_path / "resumed")["batch_index"] == 3 * cfg.grad_accum_steps

    # a fresh model: everything comes from the checkpoint
    resumed, _ = run(tmp_path / "resumed", cfg, windows(cfg, 400) if shift else None)
    for (name, a), (_, b) in zip(straight.state_dict().items(), resumed.state_dict().items(), strict=True):
        assert torch.equal(a, b), name
    straight_opt = load_checkpoint(tmp_path / "straight")["optimizer"]["state"]
    resumed_opt = load_checkpoint(tmp_path / "resumed")["optimizer"]["state"]
    for index, moments in straight_opt.items():
        for key in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(moments[key], resumed_opt[index][key]), (index, key)


def test_resuming_with_another_recipe_is_refused(tmp_path):
    run(tmp_path, config(max_steps=3, checkpoint_interval=3))
    with pytest.raises(ConfigError, match="learning_rate"):
        run(tmp_path, config(max_steps=3, checkpoint_interval=3, learning_rate=5e-3))
    run(tmp_path, config(max_steps=3, checkpoint_interval=3, log_interval=2))  # reporting settings may change


def test_a_run_stored_before_a_config_field_existed_resumes_with_that_field_at_its_default(tmp_path):
    cfg = config(max_steps=6, checkpoint_interval=3)
    straight, _ = run(tmp_path / "straight", cfg)
    run(tmp_path / "old", cfg)

    def store_step_3_as(change) -> None:  # and drop the steps after it
        for path in (tmp_path / "old").glob("step_000006.*"):
            path.unlink()
        path = checkpoint_path(tmp_path / "old", 3)
        state, meta = load_checkpoint(path), json.loads(path.with_suffix(".json").read_text())
        for identity in (state["identity"], meta["identity"]):
            change(identity)
        save_checkpoint(tmp_path / "old", 3, state, meta)

    def as_before_the_fields(identity):
        del identity["model"]["dropout"], identity["train"]["shift_windows"]

    store_step_3_as(as_before_the_fields)
    resumed, _ = run(tmp_path / "old", cfg)
    assert load_checkpoint(tmp_path / "old")["batch_index"] == 6 * cfg.grad_accum_steps
    assert all(torch.equal(a, b) for a, b in zip(straight.parameters(), resumed.parameters(), strict=True))

    store_step_3_as(lambda identity: identity["model"].update(dropout=0.1))  # not the default: differs
    with pytest.raises(ConfigError, match=r"different model\.dropout:"):
        run(tmp_path / "old", cfg)


def test_checkpoints_are_pruned_to_the_newest(tmp_path):
    run(tmp_path, config(max_steps=6, checkpoint_interval=1, keep_checkpoints=2))
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_000005.pt", "step_000006.pt"]


def test_non_finite_loss_stops_training_and_keeps_the_last_good_checkpoint(tmp_path):
    cfg = config(max_steps=6, checkpoint_interval=2)
    batches = token_windows(split(4000), MODEL.block_size, cfg.batch_size, cfg.seed, "train")
    model = GPT(MODEL)
    original_forward = model.forward
    calls = {"n": 0}

    def forward(x, y=None, **kw):
        calls["n"] += 1
        logits, loss = original_forward(x, y, **kw)
        return (logits, loss * float("nan")) if model.training and calls["n"] > 2 * 3 else (logits, loss)

    model.forward = forward
    val = token_windows(split(1000, seed=1), 16, 4, 0, "validation").in_order(1)
    with pytest.raises(TrainingDiverged, match="step 3.*step_000002.pt"):
        fit(model, batches, val, cfg, tmp_path)
    good = load_checkpoint(tmp_path)
    assert good["step"] == 2
    assert all(torch.isfinite(t).all() for t in good["model"].values())


def padded_rows(num_rows: int = 8):
    """Rows whose trained targets differ in number (the rest ignored), like padded fine-tuning rows."""
    from llmcore.batches import Batches

    generator = torch.Generator().manual_seed(0)
    x = torch.randint(0, 64, (num_rows, MODEL.block_size), generator=generator)
    y = torch.randint(0, 64, (num_rows, MODEL.block_size), generator=generator)
    for row in range(num_rows):
        y[row, 2 + 2 * row :] = -100  # row r trains 2 + 2r targets
    return lambda batch_size: Batches(num_rows, lambda i: (x[i], y[i]), batch_size, seed=5)


def test_accumulation_weights_every_trained_token_equally(tmp_path):
    rows = padded_rows()
    one, _ = run(
        tmp_path / "one", config(max_steps=1, batch_size=8, grad_accum_steps=1, grad_clip=0), rows(8)
    )
    two, _ = run(
        tmp_path / "two", config(max_steps=1, batch_size=4, grad_accum_steps=2, grad_clip=0), rows(4)
    )
    # One AdamW step moves a weight by ~lr * g / (|g| + 1e-8): a gradient that is float noise (~1e-9) moves
    # by up to ~lr / 10, so differences in the order of float rounding reach a few 1e-6 here.
    for (name, a), b in zip(one.state_dict().items(), two.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=5e-6, msg=name)
