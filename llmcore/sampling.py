"""Text generation from a GPT with the KV cache: token ids in, token ids out, one prompt or a batch.

Prompts of different lengths decode together: they are right-padded into one prefill forward pass, each
row then continues from its own position in the `KVCache` (the padding is hidden and overwritten), one
token per row per step, greedily or by sampling with temperature, top-k and top-p (nucleus) filtering.
Each row stops on its own (stop token, max_new_tokens, full context) and holds still until the slowest
row is done. Every row samples from its own generator seeded with `seed`, so a prompt's completion does
not depend on which prompts share its batch, and `generate` (one prompt) is a batch of one.
On CPU, each linear layer's weight is held in the layout BLAS multiplies a few rows by fastest for the
call (`decoding_layout`); a model that only generates and scores (a served model, the sampling stage)
keeps that layout for good and multiplies through oneDNN (`keep_decoding_layout`). It knows nothing about
tokenization, checkpoints or chat formats: callers encode and decode, and load the model.

Usage: a library module without a CLI; a sampling command needs a checkpoint and a tokenizer, which other
modules load, then call `generate_batch(model, [prompt_ids, ...], SamplingConfig(...), stop_id=...)`.
"""

import math
import threading
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
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
    top_p: float | None = (
        None  # nucleus: keep the smallest set with cumulative probability >= top_p; None = all
    )
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
            raise ConfigError(
                f"top_p must be in (0, 1], got {self.top_p!r}: pass --top-p with 0 < value <= 1"
            )


def filter_logits(logits: torch.Tensor, top_k: int | None, top_p: float | None) -> torch.Tensor:
    """Set to -inf every logit (..., vocab) outside the top k, then outside the top-p nucleus of what is
    left."""
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


def _next_tokens(
    logits: torch.Tensor, config: SamplingConfig, generators: list[torch.Generator]
) -> torch.Tensor:
    """Pick each row's next token (B,) from its last position's logits (B, vocab)."""
    if config.temperature == 0:
        return logits.argmax(dim=-1)
    probs = F.softmax(filter_logits(logits / config.temperature, config.top_k, config.top_p), dim=-1)
    return torch.cat(
        [torch.multinomial(row, 1, generator=g) for row, g in zip(probs, generators, strict=True)]
    )


@torch.inference_mode()
def generate_batch(
    model: GPT,
    prompts: list[list[int]],
    config: SamplingConfig,
    stop_id: int | None = None,
    max_batch: int = 32,
) -> list[list[int]]:
    """Continue each prompt; return, per prompt, only its new tokens, without the stop token.

    A row stops at `stop_id`, after `max_new_tokens`, or when its prompt plus output fill the context
    (block_size); a prompt longer than block_size - 1 keeps its last block_size - 1 tokens. Prompts run in
    batches of at most `max_batch`, similar lengths together (which bounds the cache's memory and padding).
    The model is in eval mode for the call and back in its previous mode afterwards.
    """
    require_positive("max_batch", max_batch)
    if not all(prompts):
        raise ConfigError(
            "a prompt is empty: pass at least one token id per prompt (e.g. the tokenizer's BOS id)"
        )
    block_size = model.config.block_size
    cropped = [p[-max(block_size - 1, 1) :] for p in prompts]
    order = sorted(range(len(cropped)), key=lambda i: len(cropped[i]))
    outputs: list[list[int]] = [[] for _ in prompts]
    was_training = model.training
    model.eval()
    try:
        with decoding_layout(model):
            for first in range(0, len(order), max_batch):
                rows = order[first : first + max_batch]
                done = _generate_rows(model, [cropped[i] for i in rows], config, stop_id)
                for i, new in zip(rows, done, strict=True):
                    outputs[i] = new
    finally:
        model.train(was_training)
    return outputs


# Models in the decoding layout, and how many calls are using it: the first call in lays the weights out,
# the last one out puts them back, so concurrent calls on one model never see a weight change under them.
_LAYOUT_LOCK = threading.Lock()
_LAYOUT_USERS: "weakref.WeakKeyDictionary[torch.nn.Module, tuple[int, list[torch.nn.Parameter]]]" = (
    weakref.WeakKeyDictionary()
)


@contextmanager
def decoding_layout(model: torch.nn.Module) -> Iterator[None]:
    """On CPU, hold each linear weight (out, in) in memory as the transpose of an (in, out) matrix for the
    block; the last caller to leave lays them out as before. Values, shapes and gradients do not change.

    A decoding step multiplies a few rows by every weight; CPU BLAS does that 2x faster from this layout
    (the 5M-parameter benchmark model's decode matmuls, cache flushed, batch 1: 0.71 ms against 1.53 ms a
    step on the dev machine). Weights that are inference tensors are left alone. Elsewhere it does nothing.
    """
    if next(model.parameters()).device.type != "cpu":
        yield
        return
    with _LAYOUT_LOCK:
        users, weights = _LAYOUT_USERS.get(model, (0, []))
        if not users:
            weights = _lay_out(model)
        _LAYOUT_USERS[model] = (users + 1, weights)
    try:
        yield
    finally:
        with _LAYOUT_LOCK:
            users, weights = _LAYOUT_USERS.pop(model)
            if users > 1:
                _LAYOUT_USERS[model] = (users - 1, weights)
            else:
                with torch.no_grad(), torch.inference_mode(False):
                    for weight in weights:
                        weight.data = weight.data.contiguous()  # what was written meanwhile stays


def keep_decoding_layout(model: torch.nn.Module) -> None:
    """On CPU, for good, for a model that is only run forward (served, sampled, scored): lay out its
    linear weights as `decoding_layout` does and, where torch has oneDNN, make each plain `nn.Linear` a
    `_KeptLinear`, which multiplies by a copy of its weight packed for oneDNN in inference.

    Its `generate_batch` calls then skip the two copies of every weight a call otherwise makes, and on the
    dev machine (AMD EPYC) oneDNN multiplies a few rows faster than BLAS: the benchmark's output
    projection, (8, 256) x (256, 8192), in 0.20 ms against BLAS's 0.55 ms; 58 ms against 69 ms at 2048
    rows. The packed copies cost the linear weights' memory once more. Training still works (a layer takes
    the plain path when gradients are recorded), and a weight changed in place or replaced is packed again;
    a write through `weight.data` is not seen: call `release_decoding_layout` before one (`adapters` does).
    Elsewhere it does nothing.
    """
    if next(model.parameters()).device.type != "cpu":
        return
    _lay_out(model)
    if not torch.backends.mkldnn.is_available():
        return
    for module in model.modules():
        if type(module) is torch.nn.Linear and not module.weight.is_inference():
            module.__class__ = _KeptLinear


def release_decoding_layout(model: torch.nn.Module) -> None:
    """Make the `_KeptLinear`s of `model` plain `nn.Linear`s again, without their packed copies; their
    weights keep their layout (`weight.data = weight.data.contiguous()` gives one its first layout back)."""
    for module in model.modules():
        if type(module) is _KeptLinear:
            module.__dict__.pop("_packed", None)
            module.__class__ = torch.nn.Linear


class _KeptLinear(torch.nn.Linear):
    """An `nn.Linear` of a kept model (`keep_decoding_layout`). In inference, an fp32 input on CPU is
    multiplied by a copy of the weight packed for oneDNN, made at the first such call and again once the
    weight was changed in place or replaced. Under recorded gradients (of the input, weight or bias),
    autocast, other dtypes or devices, and for one row through a small weight, it is an `nn.Linear`.
    The packed copy is neither saved, pickled nor deep-copied: a copy packs its own."""

    # The batch size oneDNN packs for: at 8 it stays ahead of BLAS from 2 to 2048 rows on the dev machine,
    # where packing for 1 row is 2.5x slower at 8 rows, and packing for no size in particular 40x slower at 1.
    ROWS = 8
    # One row through a smaller weight goes faster from the decoding layout through BLAS, as oneDNN takes
    # ~15 us a call more (dev machine, one row: 256 x 256 in 7 us through BLAS, 21 us through oneDNN;
    # 1408 x 256 in 30 and 32 us; 8192 x 256 in 164 and 82 us).
    ONE_ROW_MIN = 1 << 19
    _packed: tuple | None = None  # (the weight's tensor, its version, its address, the packed copy)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # called for every layer at every decoding step: the cheapest tests first, no module attribute lookup
        weight, bias = self._parameters["weight"], self._parameters["bias"]
        if weight.dtype != torch.float32 or weight.device.type != "cpu":
            self.__dict__.pop("_packed", None)  # moved: the copy is of no more use
            return F.linear(x, weight, bias)
        if (
            (x.numel() == x.size(-1) and weight.numel() < self.ONE_ROW_MIN)
            or x.dtype != torch.float32
            or (
                torch.is_grad_enabled()
                and (x.requires_grad or weight.requires_grad or bias is not None and bias.requires_grad)
            )
            or torch.is_autocast_enabled("cpu")
        ):
            return F.linear(x, weight, bias)
        packed = self._packed  # one read: another thread may pack again meanwhile, to the same values
        if packed is None or packed[1] != weight._version or packed[2] != weight.data_ptr():
            # holding the packed-from tensor keeps its storage, so a new one cannot take its address
            source, reorder = weight.detach(), torch.ops.mkldnn._reorder_linear_weight
            with torch.no_grad():
                packed = (source, source._version, source.data_ptr(), reorder(source, self.ROWS))
            self.__dict__["_packed"] = packed
        return torch.ops.mkldnn._linear_pointwise(x, packed[3], bias, "none", [], "")

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state.pop("_packed", None)
        return state


def _lay_out(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    """Lay out every contiguous linear weight of `model` (a tied one once) as (in, out); return them."""
    moved: dict[int, torch.nn.Parameter] = {}
    with torch.no_grad(), torch.inference_mode(False):  # the weights stay ordinary tensors
        for module in model.modules():
            weight = getattr(module, "weight", None)
            if (
                isinstance(module, torch.nn.Linear)
                and id(weight) not in moved
                and weight.is_contiguous()
                and not weight.is_inference()
            ):
                weight.data = weight.data.t().contiguous().t()
                moved[id(weight)] = weight
    return list(moved.values())


def _generate_rows(
    model: GPT, prompts: list[list[int]], config: SamplingConfig, stop_id: int | None
) -> list[list[int]]:
    """Decode one batch of prompts that fit the context (see `generate_batch`)."""
    block_size, B = model.config.block_size, len(prompts)
    param = next(model.parameters())
    device = param.device
    lengths = [len(p) for p in prompts]
    budgets = [min(config.max_new_tokens, block_size - n) for n in lengths]
    generators = [torch.Generator(device=device).manual_seed(config.seed) for _ in range(B)]
    max_len = max(n + b for n, b in zip(lengths, budgets, strict=True))
    cache = KVCache(model.config, batch_size=B, max_len=max_len, device=device, dtype=param.dtype)
    idx = torch.zeros(B, max(lengths), dtype=torch.long)  # (B, T): right-padded prompts
    for b, p in enumerate(prompts):
        idx[b, : len(p)] = torch.tensor(p)
    last = torch.tensor(lengths, device=device)
    # the prefill, with logits at each row's last real position only
    logits = model(idx.to(device), kv_cache=cache, only=last - 1)[0][:, -1]  # (B, vocab)
    cache.pos.copy_(last)  # drop the padding: each row continues right after its own prompt

    new: list[list[int]] = [[] for _ in range(B)]
    done = [False] * B
    while True:
        tokens = _next_tokens(logits, config, generators)  # (B,)
        for b, token in enumerate(tokens.tolist()):
            if done[b]:
                continue
            if token == stop_id:
                done[b] = True
            else:
                new[b].append(token)
                done[b] = len(new[b]) == budgets[b]
        if all(done):
            return new
        logits, _ = model(tokens.unsqueeze(1), kv_cache=cache)  # (B, 1, vocab): one step for every row
        logits = logits[:, -1]
        if any(done):  # a finished row holds still, so that the batch never runs past the context
            cache.pos -= torch.tensor(done, dtype=torch.long, device=device)


def generate(
    model: GPT, prompt_ids: list[int], config: SamplingConfig, stop_id: int | None = None
) -> list[int]:
    """Continue one prompt: `generate_batch` with a batch of one."""
    if not prompt_ids:
        raise ConfigError("the prompt is empty: pass at least one token id (e.g. the tokenizer's BOS id)")
    return generate_batch(model, [prompt_ids], config, stop_id)[0]
