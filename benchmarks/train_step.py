"""Train step tokens/s: our GPT against `transformers`' LlamaForCausalLM and nanoGPT's model shape.

All three have the same width, depth, heads, vocabulary, context and batch, and MLP sizes of the same
parameter count (SwiGLU at 8/3 * n_embd for ours and Llama, GELU at 4 * n_embd for nanoGPT). A step is
what `llmcore.train.fit` does: forward with the loss, backward, clip the gradient norm, fused AdamW
(decay on matrices), zero the gradients, for every side; each side computes its loss its own usual way.
fp32 on CPU, bf16 autocast on CUDA; `torch.compile` for every side when `compile` is set (our loop's
default on CUDA).
"""

from collections.abc import Callable
from dataclasses import dataclass

import torch

from benchmarks import Result, interleaved
from benchmarks.reference import NanoGPT, llama_from_gpt
from llmcore.model import GPT, GPTConfig


@dataclass(frozen=True)
class TrainBench:
    vocab_size: int = 8192
    block_size: int = 256  # context, every row full
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 256
    batch_size: int = 8
    repetitions: int = 10
    device: str = "cpu"
    compile: bool = False


def _step(
    model: torch.nn.Module,
    loss_of: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    device: torch.device,
) -> Callable[[torch.Tensor, torch.Tensor], None]:
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
        lr=1e-3,
        betas=(0.9, 0.95),
        fused=True,
    )
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")

    def step(x: torch.Tensor, y: torch.Tensor) -> None:
        with autocast:
            loss = loss_of(x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def run(bench: TrainBench) -> list[Result]:
    device = torch.device(bench.device)
    config = GPTConfig(
        vocab_size=bench.vocab_size,
        block_size=bench.block_size,
        n_layer=bench.n_layer,
        n_head=bench.n_head,
        n_embd=bench.n_embd,
    )
    torch.manual_seed(0)
    ours = GPT(config).to(device).train()
    llama = llama_from_gpt(ours).train()
    nano = (
        NanoGPT(bench.vocab_size, bench.block_size, bench.n_layer, bench.n_head, bench.n_embd)
        .to(device)
        .train()
    )
    wrap = torch.compile if bench.compile else (lambda m: m)
    fwd_ours, fwd_llama, fwd_nano = wrap(ours), wrap(llama), wrap(nano)

    def ours_loss(x, y):  # as in llmcore.train.fit: the summed loss, never the full logits
        return fwd_ours(x, y, reduction="sum")[1] / y.numel()

    def llama_loss(x, y):  # transformers' own loss: shifts labels internally, upcasts the logits
        return fwd_llama(input_ids=x, labels=x).loss

    steps = {
        "ours": _step(ours, ours_loss, device),
        "llama": _step(llama, llama_loss, device),
        "nanogpt": _step(nano, lambda x, y: fwd_nano(x, y)[1], device),
    }
    data = torch.randint(
        0,
        bench.vocab_size,
        (bench.batch_size, bench.block_size + 1),
        generator=torch.Generator().manual_seed(1),
    ).to(device)
    x, y = data[:, :-1].contiguous(), data[:, 1:].contiguous()
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    seconds = interleaved(
        {name: (lambda s=s: s(x, y)) for name, s in steps.items()},
        bench.repetitions,
        warmup=2 if bench.compile else 1,
        sync=sync,
    )
    tokens = bench.batch_size * bench.block_size
    rate = {name: tokens / s for name, s in seconds.items()}
    params = {
        name: sum(p.numel() for p in m.parameters())
        for name, m in (("ours", ours), ("llama", llama), ("nano", nano))
    }
    shape = (
        f"V={bench.vocab_size} d={bench.n_embd} L={bench.n_layer} H={bench.n_head} T={bench.block_size} "
        f"B={bench.batch_size}, {'bf16' if device.type == 'cuda' else 'fp32'} {device.type}"
        f"{', compiled' if bench.compile else ''}, median of {bench.repetitions}"
    )
    return [
        Result(
            "train step vs LlamaForCausalLM",
            "tokens/s",
            rate["ours"],
            rate["llama"],
            1.3,
            f"{shape}; params {params['ours']:,} vs {params['llama']:,}",
        ),
        Result(
            "train step vs nanoGPT shape",
            "tokens/s",
            rate["ours"],
            rate["nanogpt"],
            1.0,
            f"{shape}; params {params['ours']:,} vs {params['nano']:,}",
        ),
    ]
