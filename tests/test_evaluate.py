"""Held-out metrics: bits per byte from token losses, and the compressor baselines."""

import math

import pytest
import torch

from llmcore.baselines import compressor_bits_per_byte
from llmcore.evaluate import stream_loss, window_batches
from llmcore.losses import token_loss
from llmcore.model import GPTConfig


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


@pytest.mark.parametrize("shard_tokens", [2**27, 1000])  # one validation shard, or several
def test_model_and_compressors_are_scored_on_the_same_bytes(tmp_path, shard_tokens):
    """The compressors get exactly the text whose bytes the model's bits per byte divide by."""
    from llmcore.checkpoint import load_model, save_model
    from llmcore.evaluate import EvalConfig, evaluate_model, held_out_batches
    from llmcore.model import GPT
    from llmcore.tokenizer import Tokenizer, TokenizerConfig, encode_corpus, train_tokenizer
    from tests.test_tokenizer import source_documents, write_corpus

    docs = source_documents()
    corpus = write_corpus(tmp_path / "corpus", docs[1:], docs[:1] + docs[-3:])
    train_tokenizer(corpus, tmp_path / "tok", TokenizerConfig(vocab_size=512))
    tokens = encode_corpus(corpus, tmp_path / "tok", tmp_path / "tokens", shard_tokens=shard_tokens)
    assert (len(tokens["splits"]["validation"]["files"]) > 1) == (shard_tokens == 1000)
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
    assert result["bpb_stride"] == 32 and result["bpb_strided"] != result["bpb"]
    # the first way, read off the strided pass, is the score of the held-out windows on their own
    batches = held_out_batches(tmp_path / "tokens", 64, EvalConfig(max_tokens=4096, batch_size=4))
    token_bytes = torch.from_numpy(Tokenizer.load(tmp_path / "tok").token_byte_lengths())
    alone = token_loss(load_model(tmp_path / "model.pt"), batches, torch.device("cpu"), token_bytes)
    assert alone["tokens"] == result["tokens"] and alone["bpb"] == pytest.approx(result["bpb"], rel=1e-6)
    # with the stride equal to the context, the sliding window scores the same tokens the same way
    whole = EvalConfig(max_tokens=4096, batch_size=4, device="cpu", bpb_stride=64)
    same = evaluate_model(tmp_path / "model.pt", tmp_path / "tok", tmp_path / "tokens", whole)
    assert same["bpb_stride"] == 64 and same["bpb_strided"] == pytest.approx(result["bpb"], rel=1e-6)


class PositionModel(torch.nn.Module):
    """A model whose loss at window position t is 1 / (t + 1) nats: more context, lower loss."""

    def __init__(self, block_size):
        super().__init__()
        self.config = GPTConfig(vocab_size=64, block_size=block_size, n_layer=1, n_head=1, n_embd=8)

    def forward(self, x, y, reduction="none"):
        losses = (1 / torch.arange(1, x.size(1) + 1)).expand(x.shape).clone()
        return None, losses * (y != -100)


@pytest.mark.parametrize("stride", [1, 3, 8])
def test_windows_score_every_target_once_each_way_strided_with_more_context(stride):
    block, n = 8, 32  # n - block divisible by every stride: the later windows are whole
    ids = torch.arange(n + 1)
    batches = window_batches(ids, block, stride, batch_size=3)
    for way in (1, 2):  # non-overlapping, strided
        scored = torch.cat([b[way][b[way] != -100] for b in batches])
        assert sorted(scored.tolist()) == list(range(1, n + 1))  # each target exactly once
        for x, *views in batches:  # targets are the inputs shifted by one
            assert torch.equal(views[way - 1][views[way - 1] != -100], x[views[way - 1] != -100] + 1)
    # windows that start at a multiple of the context score every target of theirs the first way
    starts = [int(x[0]) for x, _, _ in batches for x in x]
    assert {s for s in starts if s % block == 0} == set(range(0, n, block))
    assert len(starts) == len(set(range(0, n - block + 1, stride)) | set(range(0, n, block)))
    bytes_one = torch.ones(n + 1, dtype=torch.long)
    plain, strided = stream_loss(PositionModel(block), [ids], stride, 3, torch.device("cpu"), bytes_one)
    harmonic = [sum(1 / t for t in range(1, k + 1)) for k in range(block + 1)]  # H_k
    assert plain["bpb"] == pytest.approx(n / block * harmonic[block] / n / math.log(2))
    # first window: positions 0..7; each later one scores its last `stride` positions
    later = (n - block) // stride * (harmonic[block] - harmonic[block - stride])
    assert strided["bpb"] == pytest.approx((harmonic[block] + later) / n / math.log(2))
    assert strided["bpb"] < plain["bpb"] or stride == block
