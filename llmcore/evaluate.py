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
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from llmcore.baselines import compressor_bits_per_byte
from llmcore.batches import sft_batches, token_windows
from llmcore.chat import chat_max_length
from llmcore.checkpoint import load_model
from llmcore.corpus import read_documents
from llmcore.device import require_device, resolve_device
from llmcore.errors import ConfigError, require_positive
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
    windows = token_windows(
        open_split(tokens_dir, "validation"), block_size, config.batch_size, 0, "validation"
    )
    num_batches = max(1, config.max_tokens // (block_size * config.batch_size))
    return windows.in_order(num_batches)


def evaluate_model(
    model_path: Path,
    tokenizer_dir: Path,
    tokens_dir: Path,
    config: EvalConfig,
    sft_dir: Path | None = None,
    max_length: int | None = None,
) -> dict[str, float]:
    """Held-out loss, perplexity and bits per byte of one model, plus the compressors on the same text;
    with `sft_dir`, also the loss on the response tokens of the held-out instruction pairs (the prompt
    is context only), cut as fine-tuning cut them: to `max_length`, by default the one stored with the
    model (`llmcore.chat.chat_max_length`). Pass the fine-tuned model's to score a base model on the same
    rows."""
    device = resolve_device(config.device)
    model = load_model(model_path, device)
    tokenizer = Tokenizer.load(tokenizer_dir)
    batches = held_out_batches(tokens_dir, model.config.block_size, config)
    result = token_loss(model, batches, device, torch.from_numpy(tokenizer.token_byte_lengths()))
    result["perplexity"] = math.exp(min(result["loss"], 50.0))
    text = tokenizer.decode(torch.cat([y.flatten() for _, y in batches]).tolist()).encode("utf-8")
    result.update(compressor_bits_per_byte(text), text_bytes=float(len(text)))
    if sft_dir is not None:
        max_length = max_length or chat_max_length(model_path)
        pairs = sft_batches(sft_dir, "validation", tokenizer, max_length, config.batch_size, seed=0)
        num_batches = max(1, config.max_tokens // (max_length * config.batch_size))
        result["response_loss"] = token_loss(model, pairs.in_order(num_batches), device)["loss"]
    return result


def held_out_text(corpus_dir: Path, max_bytes: int) -> list[str]:
    """The corpus's validation documents, in id order, up to about `max_bytes` UTF-8 bytes (the last one
    cut)."""
    texts, total = [], 0
    for document in read_documents(corpus_dir, "validation"):
        data = document["text"].encode("utf-8")[: max_bytes - total]
        texts.append(data.decode("utf-8", errors="ignore"))
        total += len(data)
        if total >= max_bytes:
            break
    return texts


def score_text(
    model_path: Path, tokenizer_dir: Path, texts: Sequence[str], config: EvalConfig
) -> dict[str, float]:
    """Loss, perplexity and bits per byte of one model on `texts`, encoded with the model's own tokenizer.

    Models with different tokenizers (or context lengths) are compared on exactly the same bytes: the
    texts are joined by end-of-text into one stream and every token after the first is scored, in
    non-overlapping windows of the model's context. Loss and perplexity are per token of the model's
    tokenizer; bits per byte is the figure that compares across tokenizers.
    """
    device = resolve_device(config.device)
    model = load_model(model_path, device)
    tokenizer = Tokenizer.load(tokenizer_dir)
    ids = [i for ids in tokenizer.encode_batch(list(texts)) for i in (*ids, tokenizer.eot_id)]
    if len(ids) < 2:
        raise ConfigError("no held-out text to score: the corpus has an empty validation split")
    block = model.config.block_size
    windows = [torch.tensor(ids[start : start + block + 1]) for start in range(0, len(ids) - 1, block)]
    batches = []
    for first in range(0, len(windows), config.batch_size):
        chunk = windows[first : first + config.batch_size]
        width = max(len(w) for w in chunk) - 1
        x = torch.zeros(len(chunk), width, dtype=torch.long)
        y = torch.full(
            (len(chunk), width), -100, dtype=torch.long
        )  # a short last window: its tail is ignored
        for row, w in enumerate(chunk):
            x[row, : len(w) - 1], y[row, : len(w) - 1] = w[:-1], w[1:]
        batches.append((x, y))
    result = token_loss(model, batches, device, torch.from_numpy(tokenizer.token_byte_lengths()))
    result["perplexity"] = math.exp(min(result["loss"], 50.0))
    return result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Evaluate a model on held-out tokens against gzip/bz2/xz.")
    parser.add_argument(
        "--model", type=Path, required=True, help="model.pt written by pretraining or fine-tuning"
    )
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
