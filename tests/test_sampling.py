import math

import pytest
import torch

from llmcore.errors import ConfigError
from llmcore.model import GPT, GPTConfig
from llmcore.sampling import SamplingConfig, filter_logits, generate

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
    assert generate(model, prompt, GREEDY) == ids[len(prompt):]


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
    assert out == generate(model, long_prompt[-(CONFIG.block_size - 1):], many)


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
        out = generate(model, [7, 8, 9], SamplingConfig(max_new_tokens=1, temperature=2.0, top_k=2, seed=seed))
        assert set(out) <= allowed


@pytest.mark.parametrize("kwargs, match", [
    (dict(max_new_tokens=0), "--max-new-tokens"),
    (dict(temperature=-0.1), "--temperature"),
    (dict(temperature=math.inf), "--temperature"),
    (dict(top_k=0), "--top-k"),
    (dict(top_p=0.0), "--top-p"),
    (dict(top_p=1.5), "--top-p"),
    (dict(max_new_tokens=1.5), "--max-new-tokens"),
])
def test_bad_sampling_config_raises(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        SamplingConfig(**kwargs)


def test_tiny_model_overfit_on_one_sequence_generates_it():
    sequence = [3, 17, 8, 3, 25, 11, 8, 30, 2, 19, 25, 6, 14, 3, 17, 9]  # repeats: the next token needs context
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
