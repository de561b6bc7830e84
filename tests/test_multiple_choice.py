"""The multiple-choice (cloze) scorer: a forced answer, byte normalization, the default task, bad input."""

import json
import math
import types

import pytest
import torch

from llmcore.errors import ConfigError
from llmcore.evaluate import EvalConfig, cloze_set
from llmcore.model import GPT, GPTConfig
from llmcore.multiple_choice import NUM_CHOICES, accuracy, choice_scores, default_items, read_items
from llmcore.tokenizer import Tokenizer, TokenizerConfig, train_tokenizer
from tests.test_tokenizer import source_documents, write_corpus

SENTENCE = "the quick brown fox jumps over the lazy dog and naps in the warm sun. "
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    root = tmp_path_factory.mktemp("cloze")
    docs = source_documents()[:2] + [SENTENCE * 20]
    corpus = write_corpus(root / "corpus", docs, docs[-1:])
    train_tokenizer(corpus, root / "tok", TokenizerConfig(vocab_size=400, num_threads=1))
    return Tokenizer.load(root / "tok")


def sentence_model(tokenizer):
    """A tiny GPT trained for a few steps on SENTENCE repeated: it knows which word comes next."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=tokenizer.vocab_size, block_size=32, n_layer=1, n_head=2, n_embd=64))
    ids = torch.tensor(tokenizer.encode(SENTENCE * 30))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(30):
        starts = torch.randint(0, len(ids) - 33, (8,))
        x = torch.stack([ids[s : s + 32] for s in starts])
        y = torch.stack([ids[s + 1 : s + 33] for s in starts])
        _, loss = model(x, y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model


def test_a_model_that_knows_the_sentence_picks_its_true_continuation(tokenizer):
    words = SENTENCE.split()
    items = []
    for cut, wrong in (
        (2, ("lazy", "warm", "naps")),
        (5, ("fox", "sun.", "brown")),
        (9, ("over", "jumps", "in")),
    ):
        context = " ".join(words[:cut])
        choices = [" " + w for w in wrong]
        answer = cut % NUM_CHOICES
        choices.insert(answer, " " + words[cut])
        items.append({"context": SENTENCE + context, "choices": choices, "answer": answer})
    trained = sentence_model(tokenizer)
    scores = choice_scores(trained, tokenizer, items, CPU, batch_size=5)
    assert [len(s) for s in scores] == [4, 4, 4]
    assert accuracy(items, scores) == {"accuracy": 1.0, "chance": 0.25, "items": 3.0}
    flipped = [[-v for v in s] for s in scores]  # a scorer that preferred the least likely would fail
    assert accuracy(items, flipped)["accuracy"] == 0.0


class UniformModel(torch.nn.Module):
    """Every token has probability 1/V, whatever the context."""

    def __init__(self, vocab, block_size):
        super().__init__()
        self.vocab, self.config = vocab, types.SimpleNamespace(block_size=block_size)

    def forward(self, x, y, reduction="mean"):
        logits = torch.zeros(*x.shape, self.vocab)
        losses = torch.nn.functional.cross_entropy(
            logits.view(-1, self.vocab), y.view(-1), ignore_index=-100, reduction="none"
        )
        return logits, losses.view(y.shape)


def test_scores_are_log_likelihood_per_byte_of_the_choice(tokenizer):
    item = {"context": "def f(x):\n", "choices": ["    return x", "pass", "    é"], "answer": 0}
    scores = choice_scores(UniformModel(tokenizer.vocab_size, 64), tokenizer, [item], CPU)[0]
    context = tokenizer.encode(item["context"])
    for choice, score in zip(item["choices"], scores, strict=True):
        whole = tokenizer.encode(item["context"] + choice)
        shared = next(i for i, (a, b) in enumerate(zip(context + [-1], whole, strict=False)) if a != b)
        tokens = len(whole) - shared  # the tokens after what the context encodes to on its own
        assert 0 < tokens <= len(tokenizer.encode(choice)) + 1
        assert score == pytest.approx(-tokens * math.log(tokenizer.vocab_size) / len(choice.encode()))


def test_default_task_asks_for_the_true_next_line_among_lines_of_the_same_document(tmp_path):
    code = source_documents()[0]
    prose = "".join(f"Day {i}: the river rose {i} inches and the mill stopped at noon.\n" for i in range(40))
    corpus = write_corpus(tmp_path / "corpus", ["unused\n"], [code, prose, "too\nfew\nlines\n"])
    items = default_items(corpus, 30, seed=3)
    assert len(items) == 30 and items == default_items(corpus, 30, seed=3)
    assert items != default_items(corpus, 30, seed=4)
    sources = {code: 0, prose: 0}
    for item in items:
        choices = item["choices"]
        assert len(choices) == NUM_CHOICES and len({c.strip() for c in choices}) == NUM_CHOICES
        document = next(d for d in sources if item["context"] + choices[item["answer"]] + "\n" in d)
        sources[document] += 1
        assert all(c in document.splitlines() for c in choices)
    assert sources[code] and sources[prose]  # spread over the documents, prose included
    assert {item["answer"] for item in items} == set(range(NUM_CHOICES))


def test_a_corpus_without_usable_held_out_lines_is_a_one_line_error(tmp_path):
    corpus = write_corpus(tmp_path / "corpus", ["a\nb\n"], ["a\nb\nc\n", "x\n"])
    with pytest.raises(ConfigError, match="--cloze-data"):
        default_items(corpus, 10)
    # the evaluate stage and the pipeline's pre-training check skip the default task instead of failing
    assert cloze_set(EvalConfig(), corpus, block_size=64) == []


@pytest.mark.parametrize(
    "lines, problem",
    [
        ([], "empty evaluation set"),
        (['{"context": "a", "choices": ["b", "c"], "answer": 2}'], "answer 2 is not an index"),
        (['{"context": "a", "choices": ["b", "c"], "answer": true}'], "answer True is not an index"),
        (
            [
                '{"context": "a", "choices": ["b", "c"], "answer": 0}',
                '{"context": "a", "choices": ["b"], "answer": 0}',
            ],
            "line 2 lacks",
        ),
        (
            [
                '{"context": "a", "choices": ["b", "c"], "answer": 0}',
                '{"context": "a", "choices": ["b", "c", "d"], "answer": 0}',
            ],
            "line 2 has 3 choices but earlier items have 2",
        ),
        (["not json"], "line 1 is not JSON"),
    ],
)
def test_bad_cloze_data_is_a_one_line_error_naming_the_file(tmp_path, lines, problem):
    path = tmp_path / "items.jsonl"
    path.write_text("".join(line + "\n" for line in lines))
    with pytest.raises(ConfigError, match=problem) as error:
        read_items(path)
    assert str(path) in str(error.value) and "\n" not in str(error.value)


def test_cloze_data_is_read_as_given(tmp_path):
    rows = [{"context": "2 + 2 =", "choices": [" 4", " 5", " 22"], "answer": 0, "id": "x"}]
    (tmp_path / "items.jsonl").write_text(json.dumps(rows[0]) + "\n\n")
    assert read_items(tmp_path / "items.jsonl") == [{k: rows[0][k] for k in ("context", "choices", "answer")}]
    with pytest.raises(ConfigError, match="does not exist"):
        read_items(tmp_path / "missing.jsonl")
