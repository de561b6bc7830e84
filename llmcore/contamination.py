"""Contamination: how much of each evaluation set the pretraining text already contains.

An evaluation item is contaminated when any of its 13-grams also occurs in the training text (the test
GPT-3 used). Words are whitespace-separated, as `str.split` gives them, with case and punctuation kept
(code distinguishes both), so the figure does not depend on the tokenizer. Items of fewer than 13 words
have no 13-gram: they are counted, never flagged.

Memory stays bounded: only the evaluation sets' n-grams are held, as 64-bit hashes in one sorted array;
the training text is streamed one document at a time and each document's n-gram hashes are looked up in
that array. A hash collision would flag a clean item, with odds of about (evaluation n-grams x training
n-grams) / 2**64. This module does not read corpora or models: callers pass texts.
"""

from collections.abc import Iterable, Mapping, Sequence

import numpy as np

N = 13  # words per n-gram
_MULTIPLIER = np.uint64(0x100000001B3)  # FNV-1a's 64-bit prime: mixes word hashes into an n-gram hash
EXCERPT_CHARS = 200  # characters of each contaminated item kept in the report


def ngram_hashes(text: str, n: int = N) -> np.ndarray:
    """64-bit hashes of the text's word n-grams, in order (empty when it has fewer than n words).

    Word hashes are Python's string hashes: stable within a process, which is all a comparison needs.
    """
    words = text.split()
    if len(words) < n:
        return np.empty(0, dtype=np.uint64)
    word = np.fromiter((hash(w) for w in words), dtype=np.int64, count=len(words)).view(np.uint64)
    out = np.zeros(len(words) - n + 1, dtype=np.uint64)
    for j in range(n):  # sum_j word[i + j] * M^(n - 1 - j), modulo 2**64 (uint64 arithmetic wraps)
        out = out * _MULTIPLIER + word[j : j + len(out)]
    return out


def contamination(eval_sets: Mapping[str, Sequence[str]], train_texts: Iterable[str], n: int = N) -> dict:
    """Which items of each evaluation set share an n-gram with the training texts.

    Returns a JSON-ready report: `n` and the word rule; per set the number of items, of contaminated
    items, of items too short to judge, and `contaminated_fraction` (contaminated / items); and per set
    the contaminated items (index, share of their n-grams found in training, text excerpt).
    """
    items = {name: [np.unique(ngram_hashes(text, n)) for text in texts] for name, texts in eval_sets.items()}
    wanted = np.unique(np.concatenate([h for hashes in items.values() for h in hashes] or [np.empty(0)]))
    wanted = wanted.astype(np.uint64)
    seen = np.zeros(len(wanted), dtype=bool)
    if len(wanted):
        for text in train_texts:
            hashes = ngram_hashes(text, n)
            where = np.minimum(np.searchsorted(wanted, hashes), len(wanted) - 1)
            seen[where[wanted[where] == hashes]] = True
    found = wanted[seen]
    report = {"n": n, "words": "whitespace-separated (str.split), case kept", "sets": {}, "items": {}}
    for name, hashes in items.items():
        dirty = []
        for index, h in enumerate(hashes):
            if len(h) and (hit := np.isin(h, found, assume_unique=True)).any():
                dirty.append(
                    {
                        "index": index,
                        "overlap": round(float(hit.mean()), 4),
                        "text": eval_sets[name][index][:EXCERPT_CHARS],
                    }
                )
        report["sets"][name] = {
            "items": len(hashes),
            "contaminated": len(dirty),
            "shorter_than_n": sum(len(h) == 0 for h in hashes),
            "contaminated_fraction": len(dirty) / len(hashes) if hashes else 0.0,
        }
        report["items"][name] = dirty
    return report


def contaminated_fractions(report: dict) -> dict[str, float]:
    """`contaminated_fraction/<set>` for every set of a report: the metric keys."""
    return {f"contaminated_fraction/{name}": s["contaminated_fraction"] for name, s in report["sets"].items()}
