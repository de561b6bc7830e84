"""Training batches: deterministic, resumable sampling of fixed-length rows.

`Batches` turns any indexable set of (input, target) rows into batches whose content is a pure function
of (seed, batch index): one seeded permutation per epoch. A run's data position is therefore just its
batch index, which is what makes resumed training bit-identical. `token_windows` makes the rows of
pretraining and evaluation: non-overlapping windows of a token split; `sft_batches` those of fine-tuning:
padded chat turns. `Prefetcher` reads a run's batches ahead on a background thread (pinned for a
non-blocking copy to CUDA), without changing what batch i holds. This module does not train and does not
move data to a device.
"""

import bisect
import functools
import queue
import threading
import weakref
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from llmcore.chat import IGNORE, encode_pair
from llmcore.errors import ConfigError
from llmcore.sft_data import read_pairs
from llmcore.shards import TokenSplit
from llmcore.tokenizer import Tokenizer


class Batches:
    """Deterministic batches over `num_rows` rows: a seeded permutation per epoch, so batch i is a pure
    function of (seed, i) and the data position of a run is just its batch index."""

    def __init__(
        self,
        num_rows: int,
        row: Callable[[int], tuple[torch.Tensor, torch.Tensor]],
        batch_size: int,
        seed: int,
        info: dict[str, float] | None = None,
    ):
        self.num_rows, self.row, self.batch_size, self.seed = num_rows, row, batch_size, seed
        self.info = info or {}  # facts about the rows, for logs and metrics
        self._epoch, self._order = -1, None

    def _index(self, sample: int) -> tuple[int, int]:
        """The row that sample `sample` reads, and its epoch."""
        epoch, position = divmod(sample, self.num_rows)
        if epoch != self._epoch:
            self._epoch, self._order = epoch, self.epoch_order(epoch)
        return int(self._order[position]), epoch

    def epoch_order(self, epoch: int) -> torch.Tensor:
        """The rows in the order `epoch` reads them: a permutation seeded by (seed, epoch)."""
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        return torch.randperm(self.num_rows, generator=generator)

    def row_in_epoch(self, index: int, epoch: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Row `index` as read in `epoch`: the same row in every epoch (token windows may shift)."""
        return self.row(index)

    def get(self, batch_index: int, part: slice = slice(None)) -> tuple[torch.Tensor, torch.Tensor]:
        """Batch `batch_index`, or only its rows in `part` (one process's share of a global batch)."""
        first = batch_index * self.batch_size
        return self.stack(
            [self.row_in_epoch(*self._index(s)) for s in range(first, first + self.batch_size)[part]]
        )

    def in_order(self, num_batches: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """The first rows in storage order, unshuffled, in `fixed_order`: a fixed validation set."""
        rows = self.fixed_order(min(self.num_rows, num_batches * self.batch_size))
        return [
            self.stack([self.row(i) for i in rows[b : b + self.batch_size]])
            for b in range(0, len(rows), self.batch_size)
        ]

    def fixed_order(self, num_rows: int) -> list[int]:
        """The order in which `in_order` batches the first `num_rows` rows: storage order."""
        return list(range(num_rows))

    def stack(self, rows: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
        """One batch (inputs, targets) from its rows."""
        return torch.stack([x for x, _ in rows]), torch.stack([y for _, y in rows])


class Prefetcher:
    """Batches start, start + 1, ... of `batches`, read `depth` ahead on a background thread, so the
    training thread does not wait for rows to be gathered. Batch i is still `batches.get(i)` (the data
    position stays a batch index, and resume stays exact); an error reading it is raised by `get(i)`.
    `pin_memory` pins each batch so that its copy to CUDA can be non-blocking; `part` keeps one process's
    rows of each batch (`Batches.get`). The thread stops on
    `close()` or when the prefetcher is garbage-collected (a training loop that raised). While it runs,
    the thread is the only reader of `batches` (whose epoch order is cached state, not safe to share)."""

    def __init__(
        self,
        batches: Batches,
        start: int,
        pin_memory: bool = False,
        part: slice = slice(None),
        depth: int = 4,
    ) -> None:
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._next = start
        self._stop = threading.Event()
        # The thread holds the queue and the event, not self, so that dropping self stops it.
        self._thread = threading.Thread(
            target=_prefetch,
            args=(batches, start, pin_memory, part, self._queue, self._stop),
            name="prefetch-batches",
            daemon=True,
        )
        weakref.finalize(self, self._stop.set)
        self._thread.start()

    def get(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Batch `index`, which must be the one after the last (batches are read in order)."""
        if index != self._next:
            raise ValueError(f"batch {index} asked for but the prefetcher is at batch {self._next}")
        item = self._queue.get()
        if isinstance(item, BaseException):
            raise item
        self._next += 1
        return item

    def close(self) -> None:
        self._stop.set()
        self._thread.join()


def _prefetch(
    batches: Batches, index: int, pin_memory: bool, part: slice, out: queue.Queue, stop: threading.Event
) -> None:
    """Put batches index, index + 1, ... (or the error reading one, then stop) into `out` until `stop`."""
    while not stop.is_set():
        try:
            x, y = batches.get(index, part)
            item: object = (x.pin_memory(), y.pin_memory()) if pin_memory else (x, y)
        except BaseException as error:  # handed to the training thread, raised there
            item = error
        while not stop.is_set():
            try:
                out.put(item, timeout=0.1)
                break
            except queue.Full:
                continue
        if isinstance(item, BaseException):
            return
        index += 1


class _TokenWindows(Batches):
    """Token windows, read at epoch 0's positions in every epoch or, with `shift`, shifted per epoch."""

    def __init__(self, num_rows: int, row: Callable, batch_size: int, seed: int, shift: bool) -> None:
        super().__init__(num_rows, lambda i: row(i, 0), batch_size, seed)
        self._row, self._shift = row, shift

    def row_in_epoch(self, index: int, epoch: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self._row(index, epoch if self._shift else 0)


def token_windows(
    split: TokenSplit, block_size: int, batch_size: int, seed: int, name: str, shift: bool = False
) -> Batches:
    """Non-overlapping windows of block_size + 1 tokens (input and shifted target) across the shards.

    With `shift`, each epoch after the first starts every shard's windows a seeded number of tokens later,
    up to the tokens they leave over at the shard's end (fewer than block_size), so that text read again
    is read at other positions in its window, after other context. The number of windows stays put;
    epoch 0 and `in_order` read the unshifted windows.
    """
    counts = [max(0, (len(shard) - 1) // block_size) for shard in split.shards]
    if sum(counts) == 0:
        raise ConfigError(
            f"the {name} split has {split.num_tokens} tokens, fewer than one context of {block_size + 1}: "
            "pass a larger corpus or a smaller --block-size"
        )
    ends = np.cumsum(counts).tolist()
    spare = [len(shard) - 1 - count * block_size for shard, count in zip(split.shards, counts, strict=True)]

    def row(i: int, epoch: int) -> tuple[torch.Tensor, torch.Tensor]:
        shard = bisect.bisect_right(ends, i)
        offset = _shift(seed, epoch, shard, spare[shard])
        start = (i - (ends[shard - 1] if shard else 0)) * block_size + offset
        window = torch.from_numpy(split.shards[shard][start : start + block_size + 1].astype(np.int64))
        return window[:-1], window[1:]

    return _TokenWindows(ends[-1], row, batch_size, seed, shift)


@functools.lru_cache(maxsize=1024)
def _shift(seed: int, epoch: int, shard: int, spare: int) -> int:
    """Tokens by which `shard`'s windows start later in `epoch`: 0 in the first, else seeded in [0, spare]."""
    return int(np.random.default_rng((seed, epoch, shard)).integers(spare + 1)) if epoch and spare else 0


def sft_batches(
    sft_dir: Path,
    split: str,
    tokenizer: Tokenizer,
    max_length: int,
    batch_size: int,
    seed: int,
    group_by_length: bool = False,
) -> Batches:
    """Padded (input, target) rows of every pair in a split; padding targets are ignored by the loss.
    Rows are held as int32 (half the memory) and widened per row when a batch is read; a batch is cut after
    its last trained target (`_ChatTurns`), and with `group_by_length` its rows are of like length, so
    that it holds less padding. `info` counts the pairs cut to fit (`rows_cut`) and the share of positions
    that train (`trained_fraction`)."""
    pairs = read_pairs(sft_dir, split)
    inputs = torch.full((len(pairs), max_length), tokenizer.eot_id, dtype=torch.int32)
    targets = torch.full((len(pairs), max_length), IGNORE, dtype=torch.int32)
    cut = 0
    for row, pair in enumerate(pairs):
        ids, labels, was_cut = encode_pair(tokenizer, pair["prompt"], pair["response"], max_length)
        inputs[row, : len(ids) - 1] = torch.tensor(ids[:-1])
        targets[row, : len(labels) - 1] = torch.tensor(labels[1:])
        cut += was_cut
    info = {
        "rows_cut": cut,
        "trained_fraction": float((targets != IGNORE).float().mean()) if len(pairs) else 0.0,
    }
    return _ChatTurns(
        len(pairs),
        lambda i: (inputs[i].long(), targets[i].long()),
        batch_size,
        seed,
        info,
        _trained_lengths(targets),
        group_by_length,
    )


def _trained_lengths(targets: torch.Tensor) -> torch.Tensor:
    """Each row's width up to and including its last trained target (0 for a row that trains nothing)."""
    return ((targets != IGNORE) * torch.arange(1, targets.shape[1] + 1)).amax(dim=1)


class _ChatTurns(Batches):
    """Padded chat turns, each batch cut after its last trained target, rounded up to a multiple of
    `WIDTH_STEP` columns. The loss is the same: positions after a row's last target are never attended to
    from an earlier one (causal attention) and score nothing. The rounding bounds the shapes a compiled
    model sees to max_length / WIDTH_STEP.

    Given each row's length, an epoch groups rows of like length into batches, as `transformers`'
    `group_by_length` does: its seeded permutation is cut into spans of `GROUP_BATCHES` batches, each
    span sorted by length and cut into batches, and the epoch's batches are then shuffled (seeded), so
    that batch lengths do not follow a pattern. Batch i is still a pure function of (seed, i). `in_order`
    batches its rows shortest first (`fixed_order`), grouped or not."""

    WIDTH_STEP = 64
    GROUP_BATCHES = 64

    def __init__(
        self,
        num_rows: int,
        row: Callable,
        batch_size: int,
        seed: int,
        info: dict[str, float],
        lengths: torch.Tensor,
        group_by_length: bool,
    ) -> None:
        super().__init__(num_rows, row, batch_size, seed, info)
        self.lengths, self.group_by_length = lengths, group_by_length

    def epoch_order(self, epoch: int) -> torch.Tensor:
        order = super().epoch_order(epoch)
        if not self.group_by_length:
            return order
        # when the rows do not fill a whole number of batches, this epoch's first rows end a batch that
        # the last epoch began: they stay as drawn, and the batches are grouped from the row after them
        first = -epoch * self.num_rows % self.batch_size
        rest = order[first:]
        span = torch.arange(len(rest)) // (self.batch_size * self.GROUP_BATCHES)
        grouped = rest[torch.sort((span << 32) + self.lengths[rest], stable=True).indices]  # by span, length
        whole = len(grouped) // self.batch_size * self.batch_size
        # the batches' shuffle: a stream apart from the rows' permutation of the same epoch
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch + 500_009)
        shuffled = grouped[:whole].view(-1, self.batch_size)[
            torch.randperm(whole // self.batch_size, generator=generator)
        ]
        return torch.cat([order[:first], shuffled.flatten(), grouped[whole:]])

    def fixed_order(self, num_rows: int) -> list[int]:
        """Shortest first: the same rows, and so the same loss over them (a row's loss does not depend on
        the rows beside it), in narrower batches."""
        return torch.sort(self.lengths[:num_rows], stable=True).indices.tolist()

    def stack(self, rows: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = super().stack(rows)
        trained = (y != IGNORE).any(dim=0).nonzero()
        last = int(trained[-1]) + 1 if len(trained) else 1
        width = min(y.shape[1], -(-last // self.WIDTH_STEP) * self.WIDTH_STEP)
        return x[:, :width].contiguous(), y[:, :width].contiguous()
