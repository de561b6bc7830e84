"""KV-cached generation tokens/s: `llmcore.sampling.generate_batch` against `transformers`' `generate`.

Both sides decode the same weights (our GPT loaded into a LlamaForCausalLM), greedily, exactly
`max_new_tokens` per row (no stop token), from the same prompts: one prompt at batch 1; at batch 8,
prompts of different lengths (right-padded for us, left-padded with an attention mask for `generate`).
Tokens/s counts generated tokens, the prefill included in the time. Our model keeps the decoding layout
(`keep_decoding_layout`), as the served pyfunc model and the sampling stage do.
"""

from dataclasses import dataclass

import torch

from benchmarks import Result, interleaved
from benchmarks.reference import llama_from_gpt
from llmcore.model import GPT, GPTConfig
from llmcore.sampling import SamplingConfig, generate_batch, keep_decoding_layout


@dataclass(frozen=True)
class GenerationBench:
    vocab_size: int = 8192
    block_size: int = 256
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 256
    max_new_tokens: int = 64
    batch_sizes: tuple[int, ...] = (1, 8)
    repetitions: int = 7
    device: str = "cpu"


def run(bench: GenerationBench) -> list[Result]:
    from transformers import GenerationConfig

    device = torch.device(bench.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    torch.manual_seed(0)
    config = GPTConfig(
        vocab_size=bench.vocab_size,
        block_size=bench.block_size,
        n_layer=bench.n_layer,
        n_head=bench.n_head,
        n_embd=bench.n_embd,
        tie_embeddings=False,
    )
    ours = GPT(config).to(device=device, dtype=dtype).eval()
    llama = llama_from_gpt(ours)  # a copy of the weights, in their own layout
    keep_decoding_layout(ours)
    sampling = SamplingConfig(max_new_tokens=bench.max_new_tokens, temperature=0.0)
    settings = GenerationConfig(
        max_new_tokens=bench.max_new_tokens,
        min_new_tokens=bench.max_new_tokens,
        do_sample=False,
        pad_token_id=0,
        eos_token_id=None,
    )
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    results = []
    for batch in bench.batch_sizes:
        rng = torch.Generator().manual_seed(batch)
        lengths = [32] if batch == 1 else torch.randint(16, 49, (batch,), generator=rng).tolist()
        prompts = [torch.randint(1, bench.vocab_size, (n,), generator=rng).tolist() for n in lengths]
        width = max(lengths)
        ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts], device=device)  # left-padded
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device)

        def theirs(ids=ids, mask=mask):
            with torch.inference_mode():
                return llama.generate(input_ids=ids, attention_mask=mask, generation_config=settings)

        def mine(prompts=prompts):
            return generate_batch(ours, prompts, sampling)

        same = [row[width:].tolist() for row in theirs()] == mine()
        seconds = interleaved({"ours": mine, "theirs": theirs}, bench.repetitions, sync=sync)
        tokens = batch * bench.max_new_tokens
        results.append(
            Result(
                f"generation vs generate, batch {batch}",
                "tokens/s",
                tokens / seconds["ours"],
                tokens / seconds["theirs"],
                2.0,
                f"greedy, {bench.max_new_tokens} new tokens, "
                f"prompts of {min(lengths)}-{max(lengths)} tokens, "
                f"d={bench.n_embd} L={bench.n_layer} V={bench.vocab_size}, {str(dtype)[6:]} {device.type}; "
                f"same tokens as generate: {'yes' if same else 'no'}; median of {bench.repetitions}",
            )
        )
    return results
