import math
import sys

import pytest
import torch
import torch.nn.functional as F

from llmcore.errors import ConfigError
from llmcore.model import GPT, GPTConfig, KVCache, apply_rotary, main

TINY = dict(vocab_size=64, block_size=32, n_layer=2, n_head=4, n_embd=32)
CONFIGS = {
    "tied": GPTConfig(**TINY),
    "gqa": GPTConfig(**TINY, n_kv_head=2),
    "mqa": GPTConfig(**TINY, n_kv_head=1),
    "untied": GPTConfig(**TINY, tie_embeddings=False),
}


def make_model(config: GPTConfig, seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    return GPT(config).eval()


def random_ids(config: GPTConfig, B: int, T: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, config.vocab_size, (B, T), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("name", CONFIGS)
def test_shapes_and_dtype(name):
    config = CONFIGS[name]
    idx = random_ids(config, B=3, T=7)
    logits, loss = make_model(config)(idx)
    assert logits.shape == (3, 7, config.vocab_size)
    assert logits.dtype == torch.float32
    assert loss is None


def test_loss_at_init_is_about_log_vocab():
    config = GPTConfig(vocab_size=512, block_size=64, n_layer=2, n_head=4, n_embd=64)
    idx = random_ids(config, B=4, T=64)
    _, loss = make_model(config)(idx, random_ids(config, B=4, T=64, seed=2))
    assert loss.item() == pytest.approx(math.log(512), abs=0.1)


def test_tied_and_untied_embeddings():
    tied, untied = make_model(CONFIGS["tied"]), make_model(CONFIGS["untied"])
    assert tied.lm_head.weight is tied.wte.weight
    assert untied.lm_head.weight is not untied.wte.weight
    table = TINY["vocab_size"] * TINY["n_embd"]
    assert untied.num_params() - tied.num_params() == table
    assert tied.num_params() - tied.num_params(exclude_embeddings=True) == table


def test_parameter_count_and_flops_by_hand():
    c = GPTConfig(vocab_size=100, block_size=16, n_layer=3, n_head=4, n_kv_head=2, n_embd=64)
    assert (c.head_dim, c.kv_heads, c.mlp_hidden) == (16, 2, 192)  # 8/3 * 64 = 170.7, rounded up to 64s
    attn = 64 * (4 + 2 * 2) * 16 + 64 * 64
    mlp = 64 * 2 * 192 + 192 * 64
    norms = 2 * 64
    model = make_model(c)
    assert model.num_params() == 100 * 64 + 3 * (attn + mlp + norms) + 64
    # the tied output projection is a matmul, so it counts towards the flops even though it is shared
    assert model.flops_per_token() == 6 * (3 * (attn + mlp) + 100 * 64) + 12 * 3 * 4 * 16 * 16


def test_rotary_tables_are_not_saved_and_state_dict_round_trips():
    a, b = make_model(CONFIGS["gqa"], seed=0), make_model(CONFIGS["gqa"], seed=1)
    state = a.state_dict()
    assert not {"cos", "sin"} & set(state)
    b.load_state_dict(state)
    idx = random_ids(CONFIGS["gqa"], B=1, T=5)
    torch.testing.assert_close(a(idx)[0], b(idx)[0])


@pytest.mark.parametrize("name", ["tied", "gqa"])
def test_causality(name):
    config = CONFIGS[name]
    model = make_model(config)
    idx = random_ids(config, B=2, T=12)
    changed = idx.clone()
    t = 6
    changed[:, t] = (changed[:, t] + 1) % config.vocab_size
    before, after = model(idx)[0], model(changed)[0]
    torch.testing.assert_close(before[:, :t], after[:, :t])
    assert not torch.allclose(before[:, t:], after[:, t:])


def decode_in_chunks(model: GPT, idx: torch.Tensor, chunks: list[int]) -> torch.Tensor:
    cache = KVCache(
        model.config, batch_size=idx.size(0), max_len=idx.size(1), device="cpu", dtype=torch.float32
    )
    logits, start = [], 0
    for size in chunks:
        logits.append(model(idx[:, start : start + size], kv_cache=cache)[0])
        start += size
    assert cache.pos.tolist() == [idx.size(1)] * idx.size(0)
    return torch.cat(logits, dim=1)


@pytest.mark.parametrize("name", ["tied", "gqa", "mqa"])
@pytest.mark.parametrize("chunks", [[5] + [1] * 7, [3, 4, 1, 1, 3]], ids=["prefill+steps", "chunk-on-cache"])
def test_kv_cache_decoding_equals_full_forward(name, chunks):
    config = CONFIGS[name]
    model = make_model(config)
    idx = random_ids(config, B=2, T=sum(chunks))
    full = model(idx)[0]
    torch.testing.assert_close(decode_in_chunks(model, idx, chunks), full, atol=1e-5, rtol=0)


def test_context_longer_than_block_size_raises():
    config = CONFIGS["tied"]
    model = make_model(config)
    with pytest.raises(ConfigError, match=r"context length 33 .*block_size 32.*--block-size >= 33"):
        model(random_ids(config, B=1, T=33))
    cache = KVCache(config, batch_size=1, max_len=32, device="cpu", dtype=torch.float32)
    model(random_ids(config, B=1, T=30), kv_cache=cache)
    with pytest.raises(ConfigError, match=r"context length 34 "):
        model(random_ids(config, B=1, T=4), kv_cache=cache)


def test_input_that_does_not_fit_the_cache_raises():
    config = CONFIGS["tied"]
    model = make_model(config)
    with pytest.raises(ConfigError, match="build a KVCache that fits"):
        model(random_ids(config, B=2, T=3), kv_cache=KVCache(config, 1, 8, "cpu", torch.float32))
    with pytest.raises(ConfigError, match="build a KVCache that fits"):
        model(random_ids(config, B=1, T=9), kv_cache=KVCache(config, 1, 8, "cpu", torch.float32))
    with pytest.raises(ConfigError, match="max_len <= 32"):
        KVCache(config, 1, 33, "cpu", torch.float32)


@pytest.mark.parametrize(
    "changes, match",
    [
        (
            dict(n_embd=100, n_head=3),
            r"n_head must divide n_embd \(got n_embd=100, n_head=3\): pass --n-head",
        ),
        (dict(n_head=4, n_kv_head=3), r"n_kv_head must divide n_head .*: pass --n-kv-head"),
        (dict(n_embd=12, n_head=4), r"must be even for rotary .*: pass --n-embd"),
        (dict(vocab_size=0), r"vocab_size .*: pass --vocab-size"),
        (dict(n_layer=-1), r"n_layer .*: pass --n-layer"),
        (dict(n_kv_head=0), r"n_kv_head .*: pass --n-kv-head"),
        (dict(rope_theta=float("nan")), r"rope_theta .*: pass --rope-theta"),
        (dict(block_size=2.5), r"block_size must be an integer"),
        (dict(dropout=1.0), r"dropout must be in \[0, 1\), got 1.0: pass --dropout"),
        (dict(dropout=-0.1), r"dropout must be in \[0, 1\)"),
    ],
)
def test_bad_config_raises(changes, match):
    with pytest.raises(ConfigError, match=match):
        GPTConfig(**{**TINY, **changes})


def test_dropout_acts_in_training_only():
    plain, dropped = make_model(GPTConfig(**TINY)), make_model(GPTConfig(**TINY, dropout=0.3))
    idx = random_ids(plain.config, B=2, T=16)
    torch.testing.assert_close(dropped(idx)[0], plain(idx)[0], rtol=0, atol=0)  # evaluation: no dropout
    plain.train(), dropped.train()
    torch.manual_seed(0)
    first = dropped(idx, idx, reduction="sum")[1]
    torch.manual_seed(1)
    second = dropped(idx, idx, reduction="sum")[1]
    assert first != second  # another draw of the dropped activations
    torch.manual_seed(0)
    assert dropped(idx, idx, reduction="sum")[1] == first  # the same draw under the same seed
    assert abs(float(first) - float(plain(idx, idx, reduction="sum")[1])) > 1e-3
    first.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in dropped.parameters())


def test_reductions_are_per_token_mean_and_sum_of_cross_entropy_ignoring_minus_100():
    config = CONFIGS["untied"]
    model = make_model(config)
    idx, targets = random_ids(config, B=2, T=6), random_ids(config, B=2, T=6, seed=3)
    targets[0, :2] = -100
    targets[1, 5] = -100
    logits, per_token = model(idx, targets, reduction="none")
    assert per_token.shape == (2, 6)
    keep = targets != -100
    expected = F.cross_entropy(logits[keep], targets[keep], reduction="none")
    torch.testing.assert_close(per_token[keep], expected)
    assert torch.all(per_token[~keep] == 0)
    _, mean = model(idx, targets)
    torch.testing.assert_close(mean, expected.mean())
    no_logits, total = model(idx, targets, reduction="sum")  # the training loss: chunked, no logits
    assert no_logits is None
    torch.testing.assert_close(total, expected.sum())
    with pytest.raises(ConfigError, match="reduction"):
        model(idx, targets, reduction="max")


def test_cli_prints_size(monkeypatch, capsys):
    argv = (
        "--vocab-size 100 --block-size 16 --n-layer 3 --n-head 4 --n-kv-head 2 --n-embd 64 "
        "--no-tie-embeddings"
    )
    monkeypatch.setattr(sys, "argv", ["llmcore.model", *argv.split()])
    main()
    config = GPTConfig(
        vocab_size=100, block_size=16, n_layer=3, n_head=4, n_kv_head=2, n_embd=64, tie_embeddings=False
    )
    model = make_model(config)
    out = capsys.readouterr().out
    assert f"parameters: {model.num_params():,}" in out
    assert f"flops/token: {model.flops_per_token():.4g}" in out
    monkeypatch.setattr(sys, "argv", ["llmcore.model", *"--vocab-size 100 --n-embd 100 --n-head 3".split()])
    with pytest.raises(SystemExit) as exit_info:
        main()
    assert exit_info.value.code == 2 and "pass --n-head" in capsys.readouterr().err


def test_rotary_rotates_each_pair_by_its_position_angle():
    config = CONFIGS["gqa"]
    model = make_model(config)
    B, H, T, hd = 2, 3, 5, config.head_dim
    x = torch.randn(B, H, T, hd, generator=torch.Generator().manual_seed(0))
    out = apply_rotary(x, model.cos[:T], model.sin[:T])
    half = hd // 2
    theta = torch.arange(T)[:, None] * config.rope_theta ** (-torch.arange(half) * 2 / hd)  # (T, hd/2)
    cos, sin = theta.cos(), theta.sin()
    x1, x2 = x[..., :half], x[..., half:]
    torch.testing.assert_close(out, torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1))


def test_logits_of_one_position_per_row_equal_those_of_the_full_forward():
    model = make_model(CONFIGS["gqa"])
    idx = random_ids(CONFIGS["gqa"], B=3, T=9)
    only = torch.tensor([8, 0, 4])
    logits = model(idx, only=only)[0]
    assert logits.shape == (3, 1, CONFIGS["gqa"].vocab_size)
    torch.testing.assert_close(logits[:, 0], model(idx)[0][torch.arange(3), only])
