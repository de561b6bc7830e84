"""The benchmark's references are what they claim: Llama with our weights computes our logits, and
batched generation gives `transformers`' `generate` tokens (real transformers, tiny models)."""

import torch

from benchmarks.reference import NanoGPT, llama_from_gpt
from llmcore.model import GPT, GPTConfig
from llmcore.sampling import SamplingConfig, generate_batch, keep_decoding_layout

CONFIG = GPTConfig(
    vocab_size=96, block_size=48, n_layer=2, n_head=4, n_kv_head=2, n_embd=32, tie_embeddings=False
)


def test_llama_with_our_weights_gives_our_logits():
    torch.manual_seed(0)
    ours = GPT(CONFIG).eval()
    llama = llama_from_gpt(ours)
    idx = torch.randint(0, CONFIG.vocab_size, (2, 20), generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(llama(input_ids=idx).logits, ours(idx)[0], atol=1e-5, rtol=0)


def test_batched_generation_equals_transformers_generate_on_prompts_of_different_lengths():
    from transformers import GenerationConfig

    torch.manual_seed(0)
    ours = GPT(CONFIG).eval()
    with torch.no_grad():
        ours.lm_head.weight.mul_(10)  # continuations that differ by prompt (see tests/test_sampling.py)
    llama = llama_from_gpt(ours)
    prompts = [[5, 9, 13, 2], [1], list(range(20, 31))]
    width = max(map(len, prompts))
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    settings = GenerationConfig(
        max_new_tokens=10, min_new_tokens=10, do_sample=False, pad_token_id=0, eos_token_id=None
    )
    theirs = [
        row[width:].tolist()
        for row in llama.generate(input_ids=ids, attention_mask=mask, generation_config=settings)
    ]
    greedy = SamplingConfig(max_new_tokens=10, temperature=0.0)
    assert generate_batch(ours, prompts, greedy) == theirs
    assert len({tuple(t) for t in theirs}) == len(prompts)
    keep_decoding_layout(ours)  # as the benchmark, the served model and the sampling stage hold it
    assert generate_batch(ours, prompts, greedy) == theirs


def test_nanogpt_reference_has_nanogpt_shape_and_trains():
    model = NanoGPT(vocab_size=64, block_size=16, n_layer=2, n_head=2, n_embd=32)
    assert model.wte.weight is model.lm_head.weight
    assert {type(m).__name__ for m in model.modules()} >= {"LayerNorm", "Embedding"}
    x = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(0))
    logits, loss = model(x, x)
    assert logits.shape == (2, 16, 64)
    loss.backward()
    assert model.wpe.weight.grad is not None and model.wpe.weight.grad.abs().sum() > 0
