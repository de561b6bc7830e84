"""Held-out metrics: bits per byte from token losses, and the compressor baselines."""

import math

import pytest
import torch

from llmcore.baselines import compressor_bits_per_byte
from llmcore.losses import token_loss


class UniformModel(torch.nn.Module):
    """Predicts every token with probability 1/V: its loss is exactly ln V per token."""

    def __init__(self, vocab):
        super().__init__()
        self.vocab = vocab

    def forward(self, x, y, reduction="mean"):
        logits = torch.zeros(*x.shape, self.vocab)
        losses = torch.nn.functional.cross_entropy(
            logits.view(-1, self.vocab), y.view(-1), ignore_index=-100, reduction="none"
        ).view(y.shape)
        return logits, losses


def test_bits_per_byte_charges_loss_to_the_bytes_tokens_stand_for():
    vocab = 16
    token_bytes = torch.tensor([0] + [2] * (vocab - 1))  # id 0 is a control token with no bytes
    y = torch.tensor([[1, 2, 0, 3]])
    result = token_loss(UniformModel(vocab), [(y.clone(), y)], torch.device("cpu"), token_bytes)
    assert result["loss"] == pytest.approx(math.log(vocab))
    assert result["bytes"] == 6
    assert result["bpb"] == pytest.approx(3 * math.log2(vocab) / 6)


def test_ignored_targets_are_not_scored():
    y = torch.tensor([[1, -100, -100, 2]])
    assert token_loss(UniformModel(8), [(y.clamp(min=0), y)], torch.device("cpu"))["tokens"] == 2


def test_compressors_rank_as_expected_on_repetitive_and_random_text():
    repetitive = b"def f(x):\n    return x + 1\n" * 400
    figures = compressor_bits_per_byte(repetitive)
    assert all(v < 0.5 for v in figures.values())
    noise = bytes(torch.randint(0, 256, (20000,), generator=torch.Generator().manual_seed(0)).tolist())
    assert all(v > 7.9 for v in compressor_bits_per_byte(noise).values())


def test_model_and_compressors_are_scored_on_the_same_bytes(tmp_path):
    """The compressors get exactly the text whose bytes the model's bits per byte divide by."""
    from llmcore.checkpoint import save_model
    from llmcore.evaluate import EvalConfig, evaluate_model
    from llmcore.model import GPT, GPTConfig
    from llmcore.tokenizer import TokenizerConfig, encode_corpus, train_tokenizer
    from tests.test_tokenizer import source_documents, write_corpus

    docs = source_documents()
    corpus = write_corpus(tmp_path / "corpus", docs[1:], docs[:1] + docs[-3:])
    train_tokenizer(corpus, tmp_path / "tok", TokenizerConfig(vocab_size=512))
    encode_corpus(corpus, tmp_path / "tok", tmp_path / "tokens")
    torch.manual_seed(0)
    save_model(
        tmp_path / "model.pt", GPT(GPTConfig(vocab_size=512, block_size=64, n_layer=1, n_head=2, n_embd=32))
    )
    result = evaluate_model(
        tmp_path / "model.pt",
        tmp_path / "tok",
        tmp_path / "tokens",
        EvalConfig(max_tokens=4096, batch_size=4, device="cpu"),
    )
    assert result["bytes"] == result["text_bytes"] > 5_000
    assert result["bpb"] > result["xz_bpb"]  # an untrained model loses to xz
    assert result["perplexity"] == pytest.approx(math.exp(result["loss"]))
