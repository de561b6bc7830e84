"""Recipe options: Muon for the blocks' matrices, the warmup-stable-decay schedule, QK-norm."""

import pytest
import torch

from llmcore.checkpoint import latest_checkpoint, load_checkpoint
from llmcore.errors import ConfigError
from llmcore.model import GPT, GPTConfig, KVCache
from llmcore.optim import Combined, build_optimizer
from llmcore.train import learning_rate_at, token_windows
from tests.test_train import MODEL, config, run, split


def test_muon_takes_the_block_matrices_and_adamw_everything_else():
    model = GPT(MODEL)
    optimizer = build_optimizer(model, "muon", 1e-3, (0.9, 0.95), 0.1)
    assert isinstance(optimizer, Combined)
    groups = {
        name: [p for g in opt.param_groups for p in g["params"]] for name, opt in optimizer.optimizers.items()
    }
    names = {id(p): name for name, p in model.named_parameters()}
    muon = {names[id(p)] for p in groups["muon"]}
    adamw = {names[id(p)] for p in groups["adamw"]}
    assert muon == {n for n, p in model.named_parameters() if n.startswith("blocks.") and p.dim() == 2}
    assert {"wte.weight", "norm_f.weight", "blocks.0.norm_1.weight"} <= adamw  # the tied head is wte
    assert not muon & adamw and muon | adamw == set(names.values())
    # the loop sets one learning rate on every group of both
    assert len(optimizer.param_groups) == sum(len(o.param_groups) for o in optimizer.optimizers.values())


def test_muon_trains_and_resumes_bit_identically(tmp_path):
    cfg = config(optimizer="muon", learning_rate=2e-2)
    straight, _ = run(tmp_path / "straight", cfg)
    with_adamw, _ = run(tmp_path / "adamw", config(learning_rate=2e-2))
    block = "blocks.0.mlp.c_fc.weight"
    assert not torch.allclose(straight.state_dict()[block], with_adamw.state_dict()[block])

    batches = token_windows(split(4000), MODEL.block_size, cfg.batch_size, cfg.seed, "train")
    real_get = batches.get

    def killed_during_step_5(index, *part):
        if index >= 4 * cfg.grad_accum_steps + 1:
            raise KeyboardInterrupt("killed")
        return real_get(index, *part)

    batches.get = killed_during_step_5
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "resumed", cfg, batches)
    assert latest_checkpoint(tmp_path / "resumed").name == "step_000003.pt"
    resumed, _ = run(tmp_path / "resumed", cfg)
    for (name, a), (_, b) in zip(straight.state_dict().items(), resumed.state_dict().items(), strict=True):
        assert torch.equal(a, b), name
    momentum = load_checkpoint(tmp_path / "resumed")["optimizer"]["muon"]["state"]
    assert momentum and all(torch.count_nonzero(s["momentum_buffer"]) for s in momentum.values())


def test_switching_the_optimizer_of_a_checkpointed_run_is_refused(tmp_path):
    run(tmp_path, config(max_steps=3, checkpoint_interval=3))
    with pytest.raises(ConfigError, match="optimizer"):
        run(tmp_path, config(max_steps=3, checkpoint_interval=3, optimizer="muon"))


def test_wsd_warms_up_holds_the_peak_then_decays_linearly_to_the_floor():
    cfg = config(
        max_steps=100,
        warmup_steps=10,
        learning_rate=1.0,
        min_lr_ratio=0.1,
        lr_schedule="wsd",
        cooldown_fraction=0.2,
    )
    lrs = [learning_rate_at(s, 100, cfg) for s in range(100)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert all(lr == pytest.approx(1.0) for lr in lrs[10:80])  # stable until the last 20 steps
    cooldown = lrs[80:]
    assert all(a > b for a, b in zip(cooldown, cooldown[1:], strict=False))
    steps = [a - b for a, b in zip(cooldown, cooldown[1:], strict=False)]
    assert max(steps) == pytest.approx(min(steps))  # linear
    assert lrs[-1] == pytest.approx(0.1)


@pytest.mark.parametrize(
    "changes, match",
    [
        ({"optimizer": "sgd"}, "--optimizer"),
        ({"lr_schedule": "step"}, "--lr-schedule"),
        ({"cooldown_fraction": 0}, "--cooldown-fraction"),
    ],
)
def test_bad_recipe_options_raise(changes, match):
    with pytest.raises(ConfigError, match=match):
        config(**changes)


def test_qk_norm_bounds_each_head_and_the_kv_cache_still_equals_the_full_forward():
    config_ = GPTConfig(
        vocab_size=64, block_size=16, n_layer=2, n_head=4, n_kv_head=2, n_embd=32, qk_norm=True
    )
    torch.manual_seed(0)
    model = GPT(config_).eval()
    assert model.state_dict().keys() == GPT(MODEL).state_dict().keys() | set()  # no new weights
    idx = torch.randint(0, 64, (2, 12))
    full = model(idx)[0]
    cache = KVCache(config_, batch_size=2, max_len=12, device="cpu", dtype=torch.float32)
    steps = [model(idx[:, :5], kv_cache=cache)[0]] + [
        model(idx[:, t : t + 1], kv_cache=cache)[0] for t in range(5, 12)
    ]
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-5, rtol=0)
    plain = GPT(GPTConfig(**{**config_.__dict__, "qk_norm": False})).eval()
    plain.load_state_dict(model.state_dict())
    assert not torch.allclose(plain(idx)[0], full)  # the norm changes what attention computes
