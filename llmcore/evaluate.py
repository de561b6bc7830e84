"""Evaluation on held-out data, against honest baselines.

Loss, perplexity and bits per byte of a model on the validation token shards; the gzip -9, bz2 -9 and
xz -9 bits per byte of exactly the text those tokens spell, so every run shows whether the model beats a
general-purpose compressor; and the response-only loss on held-out instruction pairs. Bits per byte
divide the summed loss (in bits) by the UTF-8 bytes the scored target tokens stand for, so the figure
does not depend on the tokenizer. This module does not train or sample.

    python -m llmcore.evaluate --model DIR/model.pt --tokenizer DIR --tokens DIR [--sft DIR]
"""

import argparse
import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from llmcore.baselines import compressor_bits_per_byte
from llmcore.batches import sft_batches, token_windows
from llmcore.checkpoint import load_model
from llmcore.device import require_device, resolve_device
from llmcore.errors import require_positive
from llmcore.losses import token_loss
from llmcore.shards import open_split
from llmcore.tokenizer import Tokenizer

@dataclass(frozen=True)
class EvalConfig:
    max_tokens: int = 65_536  # held-out tokens scored; the compressors get the same text
    batch_size: int = 8  # sequences per forward pass
    device: str = "auto"  # auto | cpu | cuda | cuda:N

    def __post_init__(self):
        require_positive("max_tokens", self.max_tokens)
        require_positive("batch_size", self.batch_size)
        require_device(self.device)


def held_out_batches(tokens_dir: Path, block_size: int, config: EvalConfig):
    """The first max_tokens validation tokens as non-overlapping (input, target) windows."""
    windows = token_windows(open_split(tokens_dir, "validation"), block_size, config.batch_size, 0, "validation")
    num_batches = max(1, config.max_tokens // (block_size * config.batch_size))
    return windows.in_order(num_batches)


def evaluate_model(model_path: Path, tokenizer_dir: Path, tokens_dir: Path, config: EvalConfig,
                   sft_dir: Path | None = None) -> dict[str, float]:
    """Held-out loss, perplexity and bits per byte of one model, plus the compressors on the same text;
    with `sft_dir`, also the loss on the response tokens of the held-out instruction pairs (the prompt
    is context only)."""
    device = resolve_device(config.device)
    model = load_model(model_path, device)
    tokenizer = Tokenizer.load(tokenizer_dir)
    batches = held_out_batches(tokens_dir, model.config.block_size, config)
    result = token_loss(model, batches, device, torch.from_numpy(tokenizer.token_byte_lengths()))
    result["perplexity"] = math.exp(min(result["loss"], 50.0))
    text = tokenizer.decode(torch.cat([y.flatten() for _, y in batches]).tolist()).encode("utf-8")
    result.update(compressor_bits_per_byte(text), text_bytes=float(len(text)))
    if sft_dir is not None:
        pairs = sft_batches(sft_dir, "validation", tokenizer, model.config.block_size, config.batch_size, seed=0)
        num_batches = max(1, config.max_tokens // (model.config.block_size * config.batch_size))
        result["response_loss"] = token_loss(model, pairs.in_order(num_batches), device)["loss"]
    return result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Evaluate a model on held-out tokens against gzip/bz2/xz.")
    parser.add_argument("--model", type=Path, required=True, help="model.pt written by pretraining or fine-tuning")
    parser.add_argument("--tokenizer", type=Path, required=True)
    parser.add_argument("--tokens", type=Path, required=True)
    parser.add_argument("--sft", type=Path, help="instruction pairs folder, for the response-only loss")
    parser.add_argument("--max-tokens", type=int, default=EvalConfig.max_tokens)
    parser.add_argument("--device", default="auto")
    args = parser.parse_args(argv)
    config = EvalConfig(max_tokens=args.max_tokens, device=args.device)
    result = evaluate_model(args.model, args.tokenizer, args.tokens, config, args.sft)
    print(json.dumps({"config": asdict(config), **result}, indent=2))


if __name__ == "__main__":
    main()
