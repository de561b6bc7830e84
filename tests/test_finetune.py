"""The SFT loss mask: the prompt is context only; the response and its end token are learned."""

import pytest

from llmcore.chat import IGNORE, encode_pair


class FakeTokenizer:
    """Byte-level stand-in with the control ids of the real tokenizer."""

    eot_id, user_id, assistant_id, end_id = 0, 1, 2, 3

    def encode(self, text):
        return [10 + b for b in text.encode()]


def test_loss_is_on_response_tokens_and_end_only():
    ids, labels, _ = encode_pair(FakeTokenizer(), "hi", "yes", max_length=64)
    assert ids == [1, 10 + ord("h"), 10 + ord("i"), 2, 10 + ord("y"), 10 + ord("e"), 10 + ord("s"), 3]
    assert labels == [IGNORE] * 4 + ids[4:]


def test_long_pairs_are_cut_keeping_some_response_and_the_end_token():
    ids, labels, cut = encode_pair(FakeTokenizer(), "p" * 100, "r" * 100, max_length=32)
    assert cut and len(ids) == len(labels) == 33
    assert sum(label != IGNORE for label in labels) >= 15
    assert ids[-1] == labels[-1] == FakeTokenizer.end_id  # a cut answer still ends: the model learns to stop


@pytest.mark.parametrize(
    ("prompt", "response", "length", "cut"),
    [
        ("hi", "yes", 12, False),
        ("hi", "y" * 10, 12, True),
        ("hi", "y" * 8, 12, False),
        ("hello", "y", 12, True),
        ("hell", "y", 12, False),
    ],
)
def test_cut_is_reported_exactly_when_tokens_are_lost(prompt, response, length, cut):
    turn = encode_pair(FakeTokenizer(), prompt, response, max_length=length)
    whole = [1, *FakeTokenizer().encode(prompt), 2, *FakeTokenizer().encode(response), 3]
    assert turn.cut == cut and (turn.ids == whole) != cut


@pytest.mark.parametrize("length", [8, 9, 20])
def test_ids_and_labels_always_align(length):
    ids, labels, _ = encode_pair(FakeTokenizer(), "abc", "defghijklmnop", max_length=length)
    assert len(ids) == len(labels) <= length + 1
    assert all(label in (IGNORE, i) for i, label in zip(ids, labels, strict=True))


def test_batches_shift_targets_and_ignore_padding(tmp_path):
    import json

    from llmcore.batches import sft_batches

    for split in ("train", "validation"):
        (tmp_path / f"{split}.jsonl").write_text(json.dumps({"prompt": "hi", "response": "yes"}) + "\n")
    (tmp_path / "manifest.json").write_text("{}")
    x, y = sft_batches(tmp_path, "train", FakeTokenizer(), max_length=12, batch_size=1, seed=0).get(0)
    ids, labels, _ = encode_pair(FakeTokenizer(), "hi", "yes", max_length=12)
    assert x[0, : len(ids) - 1].tolist() == ids[:-1]
    assert y[0, : len(ids) - 1].tolist() == labels[1:]  # position t is trained to predict token t + 1
    assert (
        y[0, 3].item() == ids[4]
    )  # the first learned target is the first response token, after <|assistant|>
    assert (y[0, len(ids) - 1 :] == IGNORE).all() and (x[0, len(ids) - 1 :] == FakeTokenizer.eot_id).all()
