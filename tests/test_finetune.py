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


def test_a_batch_is_cut_after_its_last_target_and_scores_the_same_loss(tmp_path):
    import json

    import torch

    from llmcore.batches import sft_batches
    from llmcore.model import GPT, GPTConfig

    pairs = [{"prompt": "q" * n, "response": "r" * (3 * n)} for n in (2, 5, 9, 30, 70)]
    for split in ("train", "validation"):
        (tmp_path / f"{split}.jsonl").write_text("".join(json.dumps(p) + "\n" for p in pairs))
    (tmp_path / "manifest.json").write_text("{}")
    batches = sft_batches(tmp_path, "train", FakeTokenizer(), max_length=300, batch_size=2, seed=0)
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=300, block_size=300, n_layer=2, n_head=2, n_embd=32)).eval()
    widths = set()
    for index in range(6):
        x, y = batches.get(index)
        rows = [batches.row_in_epoch(*batches._index(2 * index + r)) for r in range(2)]
        full_x, full_y = torch.stack([r[0] for r in rows]), torch.stack([r[1] for r in rows])
        last = int((full_y != IGNORE).any(dim=0).nonzero()[-1])
        assert x.shape == y.shape and (x.shape[1] % 64 == 0 or x.shape[1] == 300) and x.shape[1] > last
        assert torch.equal(x, full_x[:, : x.shape[1]]) and torch.equal(y, full_y[:, : y.shape[1]])
        with torch.no_grad():
            trimmed, full = model(x, y, reduction="sum")[1], model(full_x, full_y, reduction="sum")[1]
        assert trimmed.item() == pytest.approx(full.item(), rel=1e-5)
        widths.add(x.shape[1])
    assert len(widths) > 1 and min(widths) < 300  # short batches run fewer positions than the longest


def test_validation_batches_run_shortest_first_with_the_loss_of_storage_order(tmp_path):
    import json

    import torch

    from llmcore.batches import sft_batches
    from llmcore.losses import token_loss
    from llmcore.model import GPT, GPTConfig

    lengths = [9, 70, 2, 30, 5, 50, 3, 64, 12, 1]
    pairs = [{"prompt": "q" * n, "response": "r" * (3 * n)} for n in lengths]
    (tmp_path / "validation.jsonl").write_text("".join(json.dumps(p) + "\n" for p in pairs))
    (tmp_path / "manifest.json").write_text("{}")
    batches = sft_batches(tmp_path, "validation", FakeTokenizer(), max_length=300, batch_size=3, seed=0)
    sorted_ = batches.in_order(3)  # the first 9 pairs, 3 batches
    stored = [batches.stack([batches.row(i) for i in range(b, b + 3)]) for b in range(0, 9, 3)]
    assert sum(x.numel() for x, _ in sorted_) < sum(x.numel() for x, _ in stored)
    widths = [x.shape[1] for x, _ in sorted_]
    assert widths == sorted(widths)

    def trained(batches):  # each row's scored targets, padding aside
        return sorted(tuple(t for t in row if t != IGNORE) for _, y in batches for row in y.tolist())

    assert trained(sorted_) == trained(stored) and len(trained(stored)) == 9
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=300, block_size=300, n_layer=2, n_head=2, n_embd=32))
    device = torch.device("cpu")
    ours, theirs = token_loss(model, sorted_, device), token_loss(model, stored, device)
    assert ours["tokens"] == theirs["tokens"] and ours["loss"] == pytest.approx(theirs["loss"], rel=1e-5)


def test_grouped_batches_hold_rows_of_like_length_and_every_row_once_an_epoch(tmp_path):
    import json

    import torch

    from llmcore.batches import sft_batches

    lengths = torch.randperm(37, generator=torch.Generator().manual_seed(0)) + 1
    pairs = [{"prompt": "q", "response": "r" * int(4 * n)} for n in lengths]  # 37 distinct lengths
    for split in ("train", "validation"):
        (tmp_path / f"{split}.jsonl").write_text("".join(json.dumps(p) + "\n" for p in pairs))
    (tmp_path / "manifest.json").write_text("{}")

    def batches(group: bool):
        return sft_batches(
            tmp_path, "train", FakeTokenizer(), max_length=256, batch_size=4, seed=3, group_by_length=group
        )

    grouped, plain = batches(True), batches(False)
    rows, size = grouped.num_rows, grouped.batch_size
    for epoch in range(4):  # 37 rows in batches of 4: epochs after the first begin mid-batch
        read = [grouped._index(s)[0] for s in range(epoch * rows, (epoch + 1) * rows)]
        assert sorted(read) == list(range(rows))
        first = -epoch * rows % size  # rows that end the previous epoch's last batch
        grouped_rows = read[first:]
        for b in range(-(-epoch * rows // size), (epoch + 1) * rows // size):
            batch = [grouped._index(s)[0] for s in range(b * size, (b + 1) * size)]
            low, high = min(lengths[batch]), max(lengths[batch])
            # a batch is a run of neighbours in length: no other row of the epoch lies between its extremes
            assert not any(low < lengths[r] < high for r in grouped_rows if r not in batch)
    fresh = batches(True)  # batch i is a pure function of (seed, i), read in any order
    for b in reversed(range(30)):
        assert all(torch.equal(u, v) for u, v in zip(fresh.get(b), grouped.get(b), strict=True))
    width = sum(grouped.get(b)[0].numel() for b in range(30))
    assert width < sum(plain.get(b)[0].numel() for b in range(30))
