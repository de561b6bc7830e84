import copy
import math
import pickle
from dataclasses import replace

import pytest
import torch

from llmcore.errors import ConfigError
from llmcore.model import GPT, GPTConfig, KVCache
from llmcore.sampling import (
    SamplingConfig,
    _KeptLinear,
    decoding_layout,
    filter_logits,
    generate,
    generate_batch,
    keep_decoding_layout,
)

CONFIG = GPTConfig(vocab_size=64, block_size=32, n_layer=2, n_head=4, n_kv_head=2, n_embd=32)
GREEDY = SamplingConfig(max_new_tokens=6, temperature=0.0)


@pytest.fixture(scope="module")
def model() -> GPT:
    torch.manual_seed(0)
    return GPT(CONFIG)


def test_greedy_equals_repeated_argmax_of_full_forward(model):
    prompt = [5, 9, 13, 2]
    ids = list(prompt)
    for _ in range(GREEDY.max_new_tokens):
        logits, _ = model(torch.tensor([ids]))
        ids.append(int(logits[0, -1].argmax()))
    assert generate(model, prompt, GREEDY) == ids[len(prompt) :]


def test_eval_mode_during_the_call_and_restored_after(model):
    modes = []
    hook = model.register_forward_pre_hook(lambda module, args: modes.append(module.training))
    try:
        model.train()
        generate(model, [1, 2], GREEDY)
        assert model.training
        model.eval()
        generate(model, [1, 2], GREEDY)
        assert not model.training
    finally:
        hook.remove()
    assert len(modes) == 2 * GREEDY.max_new_tokens and not any(modes)


def test_seed_decides_the_sample(model):
    config = SamplingConfig(max_new_tokens=20, temperature=1.0, seed=7)
    first = generate(model, [3, 4], config)
    assert len(first) == 20
    assert generate(model, [3, 4], config) == first
    assert generate(model, [3, 4], SamplingConfig(max_new_tokens=20, temperature=1.0, seed=8)) != first


def test_stop_id_stops_and_is_not_returned(model):
    config = SamplingConfig(max_new_tokens=20, temperature=1.0, seed=3)
    free = generate(model, [1], config)
    # the first token that did not occur before it, so the run with it as stop_id must end right there
    i = next(i for i in range(1, len(free)) if free[i] not in free[:i])
    assert generate(model, [1], config, stop_id=free[i]) == free[:i]


def test_stops_when_the_context_is_full_and_crops_long_prompts(model):
    many = SamplingConfig(max_new_tokens=100, temperature=0.0)
    assert len(generate(model, list(range(25)), many)) == CONFIG.block_size - 25
    long_prompt = [i % CONFIG.vocab_size for i in range(40)]
    out = generate(model, long_prompt, many)
    assert len(out) == 1
    assert out == generate(model, long_prompt[-(CONFIG.block_size - 1) :], many)


def test_empty_prompt_raises(model):
    with pytest.raises(ConfigError, match="prompt is empty"):
        generate(model, [], GREEDY)


def test_filter_logits_top_k_keeps_exactly_k():
    logits = torch.tensor([[0.1, 3.0, -1.0, 2.0, 2.0, 0.5], [5.0, 4.0, 3.0, 2.0, 1.0, 0.0]])
    out = filter_logits(logits, top_k=3, top_p=None)
    kept = torch.isfinite(out)
    assert kept.sum(dim=-1).tolist() == [3, 3]
    assert kept[0].tolist() == [False, True, False, True, True, False]
    assert torch.equal(out[kept], logits[kept])
    # ties at the k-th value still leave exactly k
    assert torch.isfinite(filter_logits(torch.zeros(10), top_k=4, top_p=None)).sum() == 4
    assert torch.equal(filter_logits(logits, top_k=100, top_p=None), logits)


def test_filter_logits_top_p_keeps_the_nucleus():
    probs = torch.tensor([0.05, 0.5, 0.1, 0.3, 0.05])
    logits = probs.log()
    kept = lambda p: torch.isfinite(filter_logits(logits, top_k=None, top_p=p)).tolist()  # noqa: E731
    assert kept(0.5) == [False, True, False, False, False]  # 0.5 alone reaches 0.5
    assert kept(0.6) == [False, True, False, True, False]  # 0.5 + 0.3
    assert kept(0.85) == [False, True, True, True, False]  # 0.5 + 0.3 + 0.1 = 0.9
    assert kept(1.0) == [True] * 5
    assert kept(0.01) == [False, True, False, False, False]  # the most likely token always stays
    # top_k first, then the nucleus of what is left: 0.5 / 0.8 = 0.625 of the top-2 mass
    assert torch.isfinite(filter_logits(logits, top_k=2, top_p=0.6)).tolist() == kept(0.5)


def test_filtered_tokens_are_never_sampled(model):
    logits, _ = model(torch.tensor([[7, 8, 9]]))
    allowed = set(logits[0, -1].topk(2).indices.tolist())
    for seed in range(5):
        out = generate(
            model, [7, 8, 9], SamplingConfig(max_new_tokens=1, temperature=2.0, top_k=2, seed=seed)
        )
        assert set(out) <= allowed


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(max_new_tokens=0), "--max-new-tokens"),
        (dict(temperature=-0.1), "--temperature"),
        (dict(temperature=math.inf), "--temperature"),
        (dict(top_k=0), "--top-k"),
        (dict(top_p=0.0), "--top-p"),
        (dict(top_p=1.5), "--top-p"),
        (dict(max_new_tokens=1.5), "--max-new-tokens"),
    ],
)
def test_bad_sampling_config_raises(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        SamplingConfig(**kwargs)


def test_tiny_model_overfit_on_one_sequence_generates_it():
    sequence = [
        3,
        17,
        8,
        3,
        25,
        11,
        8,
        30,
        2,
        19,
        25,
        6,
        14,
        3,
        17,
        9,
    ]  # repeats: the next token needs context
    config = GPTConfig(vocab_size=32, block_size=16, n_layer=2, n_head=2, n_embd=32)
    torch.manual_seed(0)
    model = GPT(config)
    x, y = torch.tensor([sequence[:-1]]), torch.tensor([sequence[1:]])
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(100):
        _, loss = model(x, y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert loss.item() < 0.05
    assert generate(model, sequence[:1], SamplingConfig(max_new_tokens=15, temperature=0.0)) == sequence[1:]


PROMPTS = [[5, 9, 13, 2], [1], list(range(20, 31)), [7, 7, 7, 8, 1, 2, 3]]  # lengths 4, 1, 11, 7


@pytest.fixture(scope="module")
def untied() -> GPT:
    """A model whose continuations differ by prompt: at init, a tied model greedily repeats the last token
    and its next-token distributions are all near uniform."""
    torch.manual_seed(0)
    model = GPT(replace(CONFIG, tie_embeddings=False))
    with torch.no_grad():
        model.lm_head.weight.mul_(10)
    return model


@pytest.mark.parametrize("max_batch", [32, 2])
def test_batched_greedy_equals_one_at_a_time(untied, max_batch):
    config = SamplingConfig(max_new_tokens=12, temperature=0.0)
    alone = [generate(untied, p, config) for p in PROMPTS]
    assert all(len(out) == 12 for out in alone) and len({tuple(out) for out in alone}) == len(PROMPTS)
    assert generate_batch(untied, PROMPTS, config, max_batch=max_batch) == alone


def test_batched_sampling_does_not_depend_on_the_batch(untied):
    config = SamplingConfig(max_new_tokens=10, temperature=1.0, top_k=20, top_p=0.9, seed=5)
    alone = [generate(untied, p, config) for p in PROMPTS]
    assert generate_batch(untied, PROMPTS, config) == alone
    assert generate_batch(untied, PROMPTS[::-1], config) == alone[::-1]
    assert len({tuple(out) for out in alone}) > 1


def test_rows_stop_on_their_own(untied):
    config = SamplingConfig(max_new_tokens=12, temperature=0.0)
    free = generate_batch(untied, PROMPTS, config)
    # a token that row 0 first emits after its first step and some other row never emits: with it as the
    # stop token, row 0 ends right there while that row runs to max_new_tokens
    i = next(
        i
        for i in range(1, len(free[0]))
        if free[0][i] not in free[0][:i] and any(free[0][i] not in other for other in free[1:])
    )
    stop = free[0][i]
    stopped = generate_batch(untied, PROMPTS, config, stop_id=stop)
    for out, whole in zip(stopped, free, strict=True):
        assert out == (whole[: whole.index(stop)] if stop in whole else whole)
    assert len(stopped[0]) == i and any(len(out) == config.max_new_tokens for out in stopped)


def test_rows_near_the_context_end_stop_there_while_short_rows_run_on(untied):
    prompts = [list(range(28)), [3, 4], [i % CONFIG.vocab_size for i in range(40)]]
    config = SamplingConfig(max_new_tokens=20, temperature=0.0)
    out = generate_batch(untied, prompts, config)
    assert [len(o) for o in out] == [CONFIG.block_size - 28, 20, 1]
    assert out == [generate(untied, p, config) for p in prompts]


def test_batched_prefill_of_padded_prompts_equals_each_prompt_alone(model):
    # the KV cache with per-row positions: right padding is hidden from every row's real tokens
    cache = KVCache(CONFIG, batch_size=2, max_len=CONFIG.block_size, device="cpu", dtype=torch.float32)
    short, long = [4, 8, 15], [16, 23, 42, 1, 2, 3]
    batch = torch.tensor([short + [0] * 3, long])
    logits, _ = model(batch, kv_cache=cache)
    torch.testing.assert_close(logits[0, :3], model(torch.tensor([short]))[0][0], atol=1e-5, rtol=0)
    cache.pos.copy_(torch.tensor([3, 6]))
    step, _ = model(torch.tensor([[9], [9]]), kv_cache=cache)
    torch.testing.assert_close(step[0, 0], model(torch.tensor([short + [9]]))[0][0, -1], atol=1e-5, rtol=0)
    torch.testing.assert_close(step[1, 0], model(torch.tensor([long + [9]]))[0][0, -1], atol=1e-5, rtol=0)
    assert cache.pos.tolist() == [4, 7]


def test_empty_prompt_in_a_batch_raises(model):
    with pytest.raises(ConfigError, match="a prompt is empty"):
        generate_batch(model, [[1, 2], []], GREEDY)


def test_decoding_layout_holds_for_the_call_only_and_changes_no_value(untied):
    before = {name: p.detach().clone() for name, p in untied.named_parameters()}
    strides = []
    hook = untied.lm_head.register_forward_pre_hook(
        lambda module, args: strides.append(module.weight.stride())
    )
    try:
        new = generate_batch(untied, PROMPTS, GREEDY)
    finally:
        hook.remove()
    assert strides and set(strides) == {(1, CONFIG.vocab_size)}  # the transposed layout, every step
    for name, p in untied.named_parameters():
        assert p.is_contiguous() and torch.equal(p, before[name]), name
    ids = torch.tensor([PROMPTS[2]])
    with decoding_layout(untied):
        generate_batch(untied, PROMPTS[:1], GREEDY)  # a nested call leaves the layout to the outer one
        assert not untied.blocks[0].attn.c_attn.weight.is_contiguous()
        inside = untied(ids)[0]
    assert untied.blocks[0].attn.c_attn.weight.is_contiguous()
    torch.testing.assert_close(inside, untied(ids)[0])
    assert new == [generate(untied, prompt, GREEDY) for prompt in PROMPTS]
    # the model still trains afterwards: no weight was left an inference tensor
    untied(ids, ids, reduction="sum")[1].backward()
    assert all(p.grad is not None for p in untied.parameters())
    untied.zero_grad(set_to_none=True)


def test_a_kept_decoding_layout_spares_the_copies_and_changes_no_output():
    torch.manual_seed(0)
    model = GPT(replace(CONFIG, tie_embeddings=False))
    ids = torch.tensor([PROMPTS[2]])
    expected, logits = generate_batch(model, PROMPTS, GREEDY), model(ids)[0]
    keep_decoding_layout(model)
    weights = [m.weight for m in model.modules() if isinstance(m, torch.nn.Linear)]
    assert all(w.t().is_contiguous() and not w.is_contiguous() for w in weights)
    storage = [w.data_ptr() for w in weights]
    assert generate_batch(model, PROMPTS, GREEDY) == expected
    assert [w.data_ptr() for w in weights] == storage  # the call laid nothing out, put nothing back
    torch.testing.assert_close(model(ids)[0], logits)  # a forward pass over many positions too
    model(ids, ids, reduction="sum")[1].backward()  # and it still trains
    assert all(p.grad is not None and p.grad.shape == p.shape for p in model.parameters())


@pytest.mark.parametrize("onednn", [True, False])
def test_a_kept_model_that_trains_on_generates_from_its_new_weights(onednn, monkeypatch):
    monkeypatch.setattr(torch.backends.mkldnn, "is_available", lambda: onednn)
    torch.manual_seed(0)
    config = replace(CONFIG, tie_embeddings=False)
    model = GPT(config)
    keep_decoding_layout(model)
    packed = [m for m in model.modules() if type(m) is _KeptLinear]
    assert len(packed) == (2 * config.n_layer * 2 + 1 if onednn else 0)  # every linear layer, or none
    ids = torch.tensor([PROMPTS[2]])
    before = generate_batch(model, PROMPTS, GREEDY)
    model(ids, ids, reduction="sum")[1].backward()
    torch.optim.SGD(model.parameters(), lr=1.0).step()
    fresh = GPT(config)
    fresh.load_state_dict(model.state_dict())
    with torch.no_grad():  # no packed copy of the old weights is used
        torch.testing.assert_close(model(ids)[0], fresh(ids)[0])
    after = generate_batch(model, PROMPTS, GREEDY)
    assert after == generate_batch(fresh, PROMPTS, GREEDY) and after != before


def test_a_kept_model_copies_pickles_and_trains_a_bias_alone():
    torch.manual_seed(0)
    model = GPT(replace(CONFIG, tie_embeddings=False))
    keep_decoding_layout(model)
    ids = torch.tensor([PROMPTS[2], PROMPTS[2][::-1]])
    with torch.no_grad():
        logits = model(ids)[0]  # packs every layer's copy
    for other in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        assert type(other.lm_head) is _KeptLinear and "_packed" not in vars(other.lm_head)
        with torch.no_grad():
            torch.testing.assert_close(other(ids)[0], logits)
    head = torch.nn.Linear(CONFIG.n_embd, 3)  # a classifier head whose bias alone trains (BitFit)
    keep_decoding_layout(head)
    head.weight.requires_grad_(False)
    head(torch.randn(4, CONFIG.n_embd)).sum().backward()
    assert torch.equal(head.bias.grad, torch.full((3,), 4.0))
    # a model moved to another dtype computes in it and drops its packed copies at the next call
    model.double()
    with torch.no_grad():
        torch.testing.assert_close(model(ids)[0], logits, atol=1e-4, rtol=0)  # logits come as float32
    assert not any("_packed" in vars(m) for m in model.modules())


def test_keeping_leaves_a_subclass_of_linear_its_own_forward():
    class Doubled(torch.nn.Linear):
        def forward(self, x):
            return 2 * super().forward(x)

    layer, x = Doubled(8, 4), torch.randn(3, 8)
    with torch.no_grad():
        expected = layer(x)
        keep_decoding_layout(layer)
        assert type(layer) is Doubled
        torch.testing.assert_close(layer(x), expected)


def test_concurrent_generation_on_one_model_gives_each_call_its_own_result(untied):
    from concurrent.futures import ThreadPoolExecutor

    alone = [generate(untied, prompt, GREEDY) for prompt in PROMPTS]
    with ThreadPoolExecutor(4) as pool:
        together = list(pool.map(lambda prompt: generate(untied, prompt, GREEDY), PROMPTS * 3))
    assert together == alone * 3
    assert all(p.is_contiguous() for p in untied.parameters())


def test_a_model_built_under_inference_mode_still_generates():
    with torch.inference_mode():
        model = GPT(CONFIG)
    assert len(generate(model, [1, 2, 3], GREEDY)) == GREEDY.max_new_tokens
