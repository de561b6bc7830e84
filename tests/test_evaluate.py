"""Held-out metrics: bits per byte from token losses, and the compressor baselines."""

import math

import pytest
import torch

from llmcore.evaluate import compressor_bits_per_byte, token_loss


class UniformModel(torch.nn.Module):
    """Predicts every token with probability 1/V: its loss is exactly ln V per token."""

    def __init__(self, vocab):
        super().__init__()
        self.vocab = vocab

    def forward(self, x, y, reduction="mean"):
        logits = torch.zeros(*x.shape, self.vocab)
        losses = torch.nn.functional.cross_entropy(logits.view(-1, self.vocab), y.view(-1), ignore_index=-100,
                                                   reduction="none").view(y.shape)
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
