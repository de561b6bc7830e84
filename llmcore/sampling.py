"""Text generation from a GPT with the KV cache: token ids in, token ids out.

The prompt is prefilled into a `KVCache` in one forward pass, then one token is decoded per step, greedily
or by sampling with temperature, top-k and top-p (nucleus) filtering, from a seeded generator so that the
same seed gives the same output. It knows nothing about tokenization, checkpoints or chat formats: callers
encode and decode, and load the model.

Usage: a library module without a CLI; a sampling command needs a checkpoint and a tokenizer, which other
modules load, then call `generate(model, prompt_ids, SamplingConfig(...), stop_id=...)`.
"""

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from llmcore.errors import ConfigError, flag, require_non_negative, require_positive
from llmcore.model import GPT, KVCache


@dataclass(frozen=True)
class SamplingConfig:
    max_new_tokens: int = 128  # generate at most this many tokens
    temperature: float = 0.8  # divides the logits; 0 means greedy (argmax), no randomness
    top_k: int | None = None  # keep the k most likely tokens; None = all
    top_p: float | None = None  # nucleus: keep the smallest set with cumulative probability >= top_p; None = all
    seed: int = 0  # seeds the generator: the same seed gives the same output

    def __post_init__(self) -> None:
        for name in ("max_new_tokens", "top_k", "seed"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
                raise ConfigError(f"{name} must be an integer, got {value!r}: pass {flag(name)} N")
        require_positive("max_new_tokens", self.max_new_tokens)
        require_non_negative("temperature", self.temperature)
        if self.top_k is not None:
            require_positive("top_k", self.top_k)
        if self.top_p is not None and not (isinstance(self.top_p, (int, float)) and 0 < self.top_p <= 1):
            raise ConfigError(f"top_p must be in (0, 1], got {self.top_p!r}: pass --top-p with 0 < value <= 1")


def filter_logits(logits: torch.Tensor, top_k: int | None, top_p: float | None) -> torch.Tensor:
    """Set to -inf every logit (..., vocab) outside the top k, then outside the top-p nucleus of what is left."""
    if top_k is not None and top_k < logits.size(-1):
        values, indices = torch.topk(logits, top_k, dim=-1)
        # scatter rather than compare with the k-th value, so that ties still leave exactly k tokens
        logits = torch.full_like(logits, -math.inf).scatter(-1, indices, values)
    if top_p is not None and top_p < 1:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        # A token stays if the tokens more likely than it have not reached top_p yet; the first always stays.
        drop_sorted = probs.cumsum(dim=-1) - probs >= top_p
        logits = logits.masked_fill(drop_sorted.scatter(-1, order, drop_sorted), -math.inf)
    return logits


def _next_token(logits: torch.Tensor, config: SamplingConfig, generator: torch.Generator) -> int:
    """Pick the next token from the last position's logits (vocab,)."""
    if config.temperature == 0:
        return int(logits.argmax())
    probs = F.softmax(filter_logits(logits / config.temperature, config.top_k, config.top_p), dim=-1)
    return int(torch.multinomial(probs, 1, generator=generator))


@torch.no_grad()
def generate(model: GPT, prompt_ids: list[int], config: SamplingConfig, stop_id: int | None = None) -> list[int]:
    """Continue `prompt_ids`; return only the new tokens, without the stop token.

    Stops at `stop_id`, after `max_new_tokens`, or when prompt plus output fill the context (block_size).
    A prompt longer than block_size - 1 keeps its last block_size - 1 tokens, leaving room for one new token.
    The model is in eval mode for the call and back in its previous mode afterwards.
    """
    if not prompt_ids:
        raise ConfigError("the prompt is empty: pass at least one token id (e.g. the tokenizer's BOS id)")
    block_size = model.config.block_size
    prompt = prompt_ids[-max(block_size - 1, 1):]
    n_new = min(config.max_new_tokens, block_size - len(prompt))
    param = next(model.parameters())
    generator = torch.Generator(device=param.device).manual_seed(config.seed)
    cache = KVCache(model.config, batch_size=1, max_len=block_size, device=param.device, dtype=param.dtype)

    was_training = model.training
    model.eval()
    try:
        new: list[int] = []
        idx = torch.tensor([prompt], dtype=torch.long, device=param.device)  # (1, T): the prefill
        while len(new) < n_new:
            logits, _ = model(idx, kv_cache=cache)
            token = _next_token(logits[0, -1], config, generator)
            if token == stop_id:
                break
            new.append(token)
            idx = torch.tensor([[token]], dtype=torch.long, device=param.device)  # (1, 1): one step
        return new
    finally:
        model.train(was_training)
