"""The models we compare against: nanoGPT's GPT, written here, and `transformers`' Llama with our weights.

`NanoGPT` is a rewrite of the model in karpathy/nanoGPT `model.py` (LayerNorm, learned position
embeddings, GELU MLP of 4 * n_embd, fused qkv, SDPA flash attention, tied embeddings, full logits in the
model's dtype), without dropout (0.0 there for benchmarks too) and without biases (nanoGPT's `bias=False`,
its faster setting). It is written here rather than downloaded: no network on the machines that run this.

`llama_from_gpt` builds a `LlamaForCausalLM` of the same shape as one of our GPTs and loads its weights
(the same mapping as llmcore/export.py; RoPE needs no permutation, both rotate (x[i], x[i + hd/2])).
"""

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from llmcore.model import GPT


class NanoSelfAttention(nn.Module):
    def __init__(self, n_embd: int, n_head: int) -> None:
        super().__init__()
        self.c_attn = nn.Linear(n_embd, 3 * n_embd, bias=False)
        self.c_proj = nn.Linear(n_embd, n_embd, bias=False)
        self.n_head = n_head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.size()
        q, k, v = self.c_attn(x).split(C, dim=2)
        q, k, v = (
            t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v)
        )  # (B, nh, T, hs)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.c_proj(y.transpose(1, 2).contiguous().view(B, T, C))


class NanoBlock(nn.Module):
    def __init__(self, n_embd: int, n_head: int) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(n_embd, bias=False)
        self.attn = NanoSelfAttention(n_embd, n_head)
        self.ln_2 = nn.LayerNorm(n_embd, bias=False)
        self.c_fc = nn.Linear(n_embd, 4 * n_embd, bias=False)
        self.mlp_proj = nn.Linear(4 * n_embd, n_embd, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp_proj(F.gelu(self.c_fc(self.ln_2(x))))


class NanoGPT(nn.Module):
    """nanoGPT's GPT: forward(idx, targets) -> (logits, loss), as in its training loop."""

    def __init__(self, vocab_size: int, block_size: int, n_layer: int, n_head: int, n_embd: int) -> None:
        super().__init__()
        self.wte = nn.Embedding(vocab_size, n_embd)
        self.wpe = nn.Embedding(block_size, n_embd)
        self.h = nn.ModuleList(NanoBlock(n_embd, n_head) for _ in range(n_layer))
        self.ln_f = nn.LayerNorm(n_embd, bias=False)
        self.lm_head = nn.Linear(n_embd, vocab_size, bias=False)
        self.wte.weight = self.lm_head.weight  # weight tying
        for name, p in self.named_parameters():
            if p.dim() >= 2:
                std = (
                    0.02 / math.sqrt(2 * n_layer)
                    if name.endswith(("c_proj.weight", "mlp_proj.weight"))
                    else 0.02
                )
                nn.init.normal_(p, mean=0.0, std=std)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None):
        pos = torch.arange(idx.size(1), device=idx.device)
        x = self.wte(idx) + self.wpe(pos)
        for block in self.h:
            x = block(x)
        logits = self.lm_head(self.ln_f(x))
        if targets is None:
            return logits, None
        return logits, F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1), ignore_index=-1)


def llama_from_gpt(model: GPT):
    """A `LlamaForCausalLM` (SDPA attention) with `model`'s shape, weights, dtype and device."""
    from transformers import LlamaConfig, LlamaForCausalLM

    c = model.config
    config = LlamaConfig(
        vocab_size=c.vocab_size,
        hidden_size=c.n_embd,
        intermediate_size=c.mlp_hidden,
        num_hidden_layers=c.n_layer,
        num_attention_heads=c.n_head,
        num_key_value_heads=c.kv_heads,
        max_position_embeddings=c.block_size,
        rope_theta=c.rope_theta,
        rms_norm_eps=torch.finfo(torch.float32).eps,  # nn.RMSNorm's default in fp32
        tie_word_embeddings=c.tie_embeddings,
        attention_bias=False,
        mlp_bias=False,
        hidden_act="silu",
        bos_token_id=None,
        eos_token_id=None,
        pad_token_id=0,
        attn_implementation="sdpa",
    )
    param = next(model.parameters())
    llama = LlamaForCausalLM(config).to(device=param.device, dtype=param.dtype)
    q, kv = c.n_head * c.head_dim, c.kv_heads * c.head_dim
    state = {
        "model.embed_tokens.weight": model.wte.weight,
        "model.norm.weight": model.norm_f.weight,
        "lm_head.weight": model.lm_head.weight,
    }
    for i, block in enumerate(model.blocks):
        wq, wk, wv = block.attn.c_attn.weight.split([q, kv, kv], dim=0)
        gate, up = block.mlp.c_fc.weight.chunk(2, dim=0)
        prefix = f"model.layers.{i}."
        state |= {
            prefix + "input_layernorm.weight": block.norm_1.weight,
            prefix + "post_attention_layernorm.weight": block.norm_2.weight,
            prefix + "self_attn.q_proj.weight": wq,
            prefix + "self_attn.k_proj.weight": wk,
            prefix + "self_attn.v_proj.weight": wv,
            prefix + "self_attn.o_proj.weight": block.attn.c_proj.weight,
            prefix + "mlp.gate_proj.weight": gate,
            prefix + "mlp.up_proj.weight": up,
            prefix + "mlp.down_proj.weight": block.mlp.c_proj.weight,
        }
    missing, unexpected = llama.load_state_dict(
        {k: v.detach().clone() for k, v in state.items()}, strict=False
    )
    if unexpected or set(missing) - {"lm_head.weight"}:  # a tied head is the embedding, loaded once
        raise RuntimeError(
            f"weight mapping to Llama is incomplete: missing {missing}, unexpected {unexpected}"
        )
    return llama.eval()
