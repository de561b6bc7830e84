"""The full definition of the GPT, all of it in this file.

A decoder-only transformer in the style of Llama / nanochat:
- token embedding, no learned position embedding: rotary position embeddings (RoPE) on queries and keys,
  with cos/sin tables precomputed up to `block_size` and kept as non-persistent buffers;
- pre-norm blocks with RMSNorm, and a final RMSNorm before the output projection;
- causal self-attention through `F.scaled_dot_product_attention` (flash kernels on CUDA come free),
  with optional grouped-query attention (`n_kv_head` < `n_head`);
- optional QK-norm: queries and keys RMS-normalized per head after the rotation (`qk_norm`);
- optional dropout in training (`dropout`) on the token embeddings and on each block's two additions to the
  residual stream (GPT-2's places, less attention's weights), for data seen many times over;
- SwiGLU MLP; no biases anywhere; optionally tied input/output embeddings;
- init: normal(0, 0.02), residual projections scaled by 1/sqrt(2 * n_layer) (GPT-2);
- optional activation checkpointing (`GPT.activation_checkpointing`, set by the training loop): in
  training each block's activations are recomputed in the backward pass instead of kept;
- a training loss that never builds the full logits (`reduction="sum"`, `llmcore.losses`);
- a `KVCache` for incremental decoding: each row continues from its own position, so prompts of
  different lengths decode in one batch (right-padded; a row never sees keys past its position).

The code is single-device and runs in whatever dtype it is given. It does NOT compile, autocast, shard or
wrap the model for DDP/FSDP: the training code owns those. It knows nothing about tokenization.

Usage: python -m llmcore.model --vocab-size 4096 --n-layer 4 --n-embd 256   # prints size and flops/token
"""

import argparse
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from llmcore.errors import ConfigError, flag, require_choice, require_positive
from llmcore.losses import linear_cross_entropy


@dataclass(frozen=True)
class GPTConfig:
    vocab_size: int  # tokens in the tokenizer, control symbols included
    block_size: int = 256  # longest context the model supports (rotary tables are built this long)
    n_layer: int = 4  # transformer blocks
    n_head: int = 4  # query heads per attention layer
    n_kv_head: int | None = None  # grouped-query attention: key/value heads; None = n_head
    n_embd: int = 256  # width of the residual stream
    rope_theta: float = 10000.0  # RoPE base: larger values stretch the wavelengths of the rotations
    tie_embeddings: bool = True  # output projection shares its weight with the token embedding
    qk_norm: bool = False  # RMS-normalize each head's queries and keys (no weights), as in nanochat
    dropout: float = 0.0  # training only: share of embedding and residual-branch activations zeroed

    def __post_init__(self) -> None:
        for name in ("vocab_size", "block_size", "n_layer", "n_head", "n_embd"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise ConfigError(f"{name} must be an integer, got {value!r}: pass {flag(name)} N")
            require_positive(name, value)
        require_positive("rope_theta", self.rope_theta)
        if (
            isinstance(self.dropout, bool)
            or not isinstance(self.dropout, (int, float))
            or not 0 <= self.dropout < 1
        ):
            raise ConfigError(f"dropout must be in [0, 1), got {self.dropout!r}: pass --dropout in [0, 1)")
        if self.n_kv_head is not None:
            if isinstance(self.n_kv_head, bool) or not isinstance(self.n_kv_head, int):
                raise ConfigError(f"n_kv_head must be an integer, got {self.n_kv_head!r}: pass --n-kv-head N")
            require_positive("n_kv_head", self.n_kv_head)
        if self.n_embd % self.n_head:
            raise ConfigError(
                f"n_head must divide n_embd (got n_embd={self.n_embd}, n_head={self.n_head}): "
                "pass --n-head that divides --n-embd"
            )
        if self.n_head % self.kv_heads:
            raise ConfigError(
                f"n_kv_head must divide n_head (got n_head={self.n_head}, n_kv_head={self.n_kv_head}): "
                "pass --n-kv-head that divides --n-head"
            )
        if self.head_dim % 2:
            raise ConfigError(
                f"head size n_embd/n_head must be even for rotary embeddings (got {self.n_embd}/"
                f"{self.n_head}={self.head_dim}): pass --n-embd and --n-head with an even quotient"
            )

    # Derived sizes: computed here and nowhere else.
    @property
    def kv_heads(self) -> int:
        return self.n_head if self.n_kv_head is None else self.n_kv_head

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @property
    def mlp_hidden(self) -> int:
        # SwiGLU has three matrices instead of two, so 8/3 * n_embd keeps the MLP's parameter count at that
        # of a 4 * n_embd GELU MLP; rounded up to a multiple of 64 for efficient matmuls (Llama).
        return 64 * math.ceil(8 * self.n_embd / 3 / 64)


class KVCache:
    """Preallocated keys and values of every layer, for decoding a batch of sequences chunk by chunk.

    `pos` (B,) holds each row's number of filled positions; `GPT.forward` writes a chunk at every row's own
    position and advances all rows past it. A caller may move a row back (to drop the padding of a
    right-padded prompt, or to hold a finished row still): slots at or past a row's position are hidden
    from its queries and overwritten as it continues, so rows of different lengths share one batch.
    """

    def __init__(
        self, config: GPTConfig, batch_size: int, max_len: int, device: torch.device | str, dtype: torch.dtype
    ) -> None:
        require_positive("batch_size", batch_size)
        require_positive("max_len", max_len)
        if max_len > config.block_size:
            raise ConfigError(
                f"cache length {max_len} is longer than the model supports (block_size "
                f"{config.block_size}): pass max_len <= {config.block_size}"
            )
        shape = (config.n_layer, batch_size, config.kv_heads, max_len, config.head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.pos = torch.zeros(batch_size, dtype=torch.long, device=device)
        self._rows = torch.arange(batch_size, device=device).unsqueeze(1)  # (B, 1)
        self._slots: torch.Tensor | slice | None = None  # where the current chunk goes, set by `begin`
        self._end = 0  # keys 0.._end are read by the current chunk

    def begin(self, T: int, end: int) -> tuple[torch.Tensor | slice, torch.Tensor | None]:
        """Start a chunk of T tokens per row, reaching position `end` at most: its positions and attention
        mask (B, 1, T, end) or less.

        When every row is at the same position (one prompt, or a batch not yet ragged) the positions are a
        slice and the chunk is written with a plain slice; the mask is then None when a single query sees
        every key or a chunk at position 0 is causal on its own (SDPA's is_causal), else (T, end). Otherwise
        the positions are (B, T), written row by row, and the mask hides each row's keys past its own.
        """
        self._end = end
        start = end - T
        if int(self.pos.min()) == start:  # every row at the furthest position
            self._slots = slice(start, end)
            if T == 1 or start == 0:
                return self._slots, None
            queries = torch.arange(start, end, device=self.pos.device)  # (T,)
        else:
            self._slots = queries = self.pos.unsqueeze(1) + torch.arange(T, device=self.pos.device)  # (B, T)
        keys = torch.arange(end, device=self.pos.device)
        # a query sees keys up to its own position: (T, end) or (B, T, end)
        mask = keys <= queries.unsqueeze(-1)
        return self._slots, mask if mask.dim() == 2 else mask.unsqueeze(1)

    def append(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store `layer`'s new keys/values (B, n_kv_head, T, hd) at each row's slots; return keys 0.._end."""
        if isinstance(self._slots, slice):
            self.k[layer, :, :, self._slots] = k
            self.v[layer, :, :, self._slots] = v
        else:  # advanced indexing puts the (B, T) index dims first: write (B, T, nkv, hd)
            self.k[layer][self._rows, :, self._slots] = k.transpose(1, 2)
            self.v[layer][self._rows, :, self._slots] = v.transpose(1, 2)
        return self.k[layer, :, :, : self._end], self.v[layer, :, :, : self._end]


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (x[i], x[i + hd/2]) of x (B, nh, T, hd) by their position's angles.

    cos is (cos, cos) and sin is (-sin, sin) over the two halves, (T, hd) or per row (B, 1, T, hd): the
    rotation is then x * cos + (x2, x1) * sin, four tensor ops and their gradients (eight with half-width
    tables; ~25% less time in the rotation, forward and backward, on CPU).
    """
    x1, x2 = x.chunk(2, dim=-1)
    # Under autocast the tables are float32 and x is not: the products promote, so cast back for SDPA.
    return (x * cos + torch.cat([x2, x1], dim=-1) * sin).type_as(x)


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig, layer: int) -> None:
        super().__init__()
        self.layer = layer  # index into the KV cache
        self.n_head, self.n_kv_head, self.head_dim = config.n_head, config.kv_heads, config.head_dim
        self.qk_norm = config.qk_norm
        # queries, keys and values in one matmul
        self.c_attn = nn.Linear(config.n_embd, (self.n_head + 2 * self.n_kv_head) * self.head_dim, bias=False)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=False)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        kv_cache: KVCache | None,
        mask: torch.Tensor | None,
    ) -> torch.Tensor:
        B, T, C = x.size()
        q, k, v = self.c_attn(x).split(
            [self.n_head * self.head_dim, self.n_kv_head * self.head_dim, self.n_kv_head * self.head_dim],
            dim=-1,
        )
        q = q.view(B, T, self.n_head, self.head_dim).transpose(1, 2)  # (B, nh, T, hd)
        k = k.view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)  # (B, nkv, T, hd)
        v = v.view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)  # (B, nkv, T, hd)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        if self.qk_norm:  # bounds the attention logits, which lets the learning rate go higher
            q, k = F.rms_norm(q, (self.head_dim,)), F.rms_norm(k, (self.head_dim,))

        if kv_cache is not None:
            k, v = kv_cache.append(self.layer, k, v)  # (B, nkv, keys, hd)
        # Without a mask, queries and keys start at the same position (no cache, or a chunk at position 0),
        # or a single query sees every key.
        y = F.scaled_dot_product_attention(
            q,
            k,
            v,
            attn_mask=mask,
            is_causal=mask is None and T > 1,
            enable_gqa=self.n_kv_head != self.n_head,
        )  # (B, nh, T, hd)
        return self.c_proj(y.transpose(1, 2).reshape(B, T, C))


class MLP(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 2 * config.mlp_hidden, bias=False)  # gate and up, fused
        self.c_proj = nn.Linear(config.mlp_hidden, config.n_embd, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.c_fc(x).chunk(2, dim=-1)  # (B, T, hidden) each
        return self.c_proj(F.silu(gate) * up)  # (B, T, C)


class Block(nn.Module):
    def __init__(self, config: GPTConfig, layer: int) -> None:
        super().__init__()
        self.norm_1 = nn.RMSNorm(config.n_embd)
        self.attn = CausalSelfAttention(config, layer)
        self.norm_2 = nn.RMSNorm(config.n_embd)
        self.mlp = MLP(config)
        self.dropout = config.dropout

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        kv_cache: KVCache | None,
        mask: torch.Tensor | None,
    ) -> torch.Tensor:
        x = x + _drop(self.attn(self.norm_1(x), cos, sin, kv_cache, mask), self.dropout, self.training)
        return x + _drop(self.mlp(self.norm_2(x)), self.dropout, self.training)


def _drop(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """Dropout in training; no op at all (not even a copy) when p is 0 or in evaluation."""
    return F.dropout(x, p, training=True) if p and training else x


class GPT(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.config = config
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        self.blocks = nn.ModuleList(Block(config, layer) for layer in range(config.n_layer))
        self.norm_f = nn.RMSNorm(config.n_embd)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.wte.weight

        # Rotary tables: derived from the config, so not saved in checkpoints.
        exponents = torch.arange(0, config.head_dim, 2, dtype=torch.float32) / config.head_dim
        inv_freq = 1.0 / config.rope_theta**exponents  # (hd/2,)
        angles = torch.outer(
            torch.arange(config.block_size, dtype=torch.float32), inv_freq
        )  # (block_size, hd/2)
        # (cos, cos) and (-sin, sin) over the two halves of a head: see apply_rotary
        cos, sin = angles.cos(), angles.sin()
        self.register_buffer("cos", torch.cat([cos, cos], dim=-1), persistent=False)  # (block_size, hd)
        self.register_buffer("sin", torch.cat([-sin, sin], dim=-1), persistent=False)

        # Recompute each block's activations in the backward pass instead of keeping them (training only):
        # memory for compute, the same loss and gradients. The training loop sets it.
        self.activation_checkpointing = False

        self.apply(self._init_weights)
        # Each block adds two projections to the residual stream: scale them so its variance stays put.
        for block in self.blocks:
            for proj in (block.attn.c_proj, block.mlp.c_proj):
                nn.init.normal_(proj.weight, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def forward(
        self,
        idx: torch.Tensor,
        targets: torch.Tensor | None = None,
        *,
        kv_cache: KVCache | None = None,
        reduction: str = "mean",
        only: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Logits (B, T, vocab) in float32 and, given targets (B, T; -100 = ignore), the loss.

        reduction "mean" averages over the targets that are not ignored; "none" gives the loss per token
        (B, T); "sum" (training) gives their float32 sum and no logits (None), computed a chunk of positions
        at a time so that the full logits never exist.
        With a `kv_cache`, each row of `idx` continues from that row's cache position, advanced past it.
        `only` (B,), without targets: the logits (B, 1, vocab) of one position per row, e.g. the last of each
        prompt in a prefill, sparing the output projection of every other position.
        """
        require_choice("reduction", reduction, ("mean", "none", "sum"))
        B, T = idx.size()
        end = T if kv_cache is None else int(kv_cache.pos.max()) + T  # the furthest position reached
        if end > self.config.block_size:
            raise ConfigError(
                f"context length {end} is longer than the model supports (block_size "
                f"{self.config.block_size}): shorten the input or pass --block-size >= {end}"
            )
        if kv_cache is not None and (kv_cache.k.size(1) != B or end > kv_cache.k.size(3)):
            raise ConfigError(
                f"input of batch {B} reaching position {end} does not fit a cache of batch "
                f"{kv_cache.k.size(1)} and length {kv_cache.k.size(3)}: "
                "build a KVCache that fits"
            )

        mask = None
        if kv_cache is None:
            cos, sin = self.cos[:T], self.sin[:T]  # (T, hd)
        else:
            positions, mask = kv_cache.begin(T, end)  # a slice or (B, T); None or (B, 1, T, keys)
            cos, sin = self.cos[positions], self.sin[positions]  # (T, hd) or (B, T, hd)
            if cos.dim() == 3:
                cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)  # (B, 1, T, hd): per row
        x = self.run_blocks(
            _drop(self.wte(idx), self.config.dropout, self.training), cos, sin, kv_cache, mask
        )
        if kv_cache is not None:
            kv_cache.pos += T
        if targets is not None and reduction == "sum" and type(self.lm_head) is nn.Linear:
            return None, linear_cross_entropy(self.norm_f(x), self.lm_head.weight, targets)
        if only is not None:
            x = x[torch.arange(B, device=x.device), only].unsqueeze(1)  # (B, 1, C)
        logits = self.lm_head(self.norm_f(x)).float()  # (B, T, vocab)

        if targets is None:
            return logits, None
        # an output projection wrapped by an adapter (LoRA) sums here: its forward is not a plain linear
        loss = F.cross_entropy(
            logits.view(B * T, -1), targets.reshape(B * T), ignore_index=-100, reduction=reduction
        )
        return (
            (None, loss) if reduction == "sum" else (logits, loss.view(B, T) if reduction == "none" else loss)
        )

    def run_blocks(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        kv_cache: KVCache | None = None,
        mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The transformer blocks over embeddings x (B, T, C), recomputing each block's activations in
        backward when `activation_checkpointing` is set (training without a cache)."""
        recompute = self.activation_checkpointing and self.training and torch.is_grad_enabled()
        for block in self.blocks:
            if recompute and kv_cache is None:
                x = checkpoint(block, x, cos, sin, None, None, use_reentrant=False)
            else:
                x = block(x, cos, sin, kv_cache, mask)
        return x

    def num_params(self, exclude_embeddings: bool = False) -> int:
        """Parameters, each shared tensor counted once; optionally without the token-embedding table.

        With tied embeddings the excluded table is also the output projection.
        """
        n = sum(p.numel() for p in self.parameters())
        return n - self.wte.weight.numel() if exclude_embeddings else n

    def flops_per_token(self) -> float:
        """Training flops (forward + backward) per token at full context: 6N + 12 * L * H * Q * T
        (PaLM, app. B).

        N counts the weights used in matmuls: every linear layer including the output projection (tied or
        not), but not the embedding lookup or the norms. The second term is attention's QK^T and AV.
        """
        c = self.config
        n_matmul = sum(m.weight.numel() for m in self.modules() if isinstance(m, nn.Linear))
        return 6.0 * n_matmul + 12.0 * c.n_layer * c.n_head * c.head_dim * c.block_size


def main() -> None:
    p = argparse.ArgumentParser(
        prog="python -m llmcore.model",
        description="Print a GPT configuration's derived sizes, parameters and flops/token.",
    )
    p.add_argument("--vocab-size", type=int, required=True)
    p.add_argument("--block-size", type=int, default=GPTConfig.block_size)
    p.add_argument("--n-layer", type=int, default=GPTConfig.n_layer)
    p.add_argument("--n-head", type=int, default=GPTConfig.n_head)
    p.add_argument("--n-kv-head", type=int, default=GPTConfig.n_kv_head)
    p.add_argument("--n-embd", type=int, default=GPTConfig.n_embd)
    p.add_argument("--rope-theta", type=float, default=GPTConfig.rope_theta)
    p.add_argument(
        "--tie-embeddings", action=argparse.BooleanOptionalAction, default=GPTConfig.tie_embeddings
    )
    p.add_argument("--qk-norm", action=argparse.BooleanOptionalAction, default=GPTConfig.qk_norm)
    p.add_argument("--dropout", type=float, default=GPTConfig.dropout)
    args = p.parse_args()
    try:
        config = GPTConfig(**vars(args))
    except ConfigError as e:
        p.error(str(e))
    with torch.device("meta"):  # shapes only: no memory, no init cost, even for large configs
        model = GPT(config)
    print(config)
    print(f"head_dim={config.head_dim} n_kv_head={config.kv_heads} mlp_hidden={config.mlp_hidden}")
    print(
        f"parameters: {model.num_params():,} "
        f"({model.num_params(exclude_embeddings=True):,} without embeddings)"
    )
    print(f"flops/token: {model.flops_per_token():.4g}")


if __name__ == "__main__":
    main()
