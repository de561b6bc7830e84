"""Baselines a model's figures are read against, computed on exactly the data the model is scored on.

- General-purpose compressors (gzip, bz2, xz) for held-out bits per byte.
- For classification: the majority class, and TF-IDF features with logistic regression (scikit-learn),
  trained on the same training texts and predicting the same held-out texts as the fine-tuned classifier.

This module does not score models and does not compute metrics from predictions (`llmcore.classify` does,
for models and baselines alike).
"""

import bz2
import gzip
import lzma
from collections import Counter


def compressor_bits_per_byte(data: bytes) -> dict[str, float]:
    """Bits per byte of gzip -9, bz2 -9 and xz -9 (preset 9) on `data`."""
    n = max(1, len(data))
    return {
        "gzip_bpb": 8 * len(gzip.compress(data, compresslevel=9, mtime=0)) / n,
        "bz2_bpb": 8 * len(bz2.compress(data, compresslevel=9)) / n,
        "xz_bpb": 8 * len(lzma.compress(data, preset=9)) / n,
    }


def majority_class(train_labels: list[int], num_test: int) -> list[int]:
    """The most frequent training label (the smallest id among ties), predicted for every test item."""
    counts = Counter(train_labels)
    top = max(counts.values())
    return [min(label for label, n in counts.items() if n == top)] * num_test


def tfidf_logistic_regression(
    train_texts: list[str],
    train_labels: list[int],
    test_texts: list[str],
    balanced: bool = False,
    seed: int = 0,
) -> list[int]:
    """Predicted labels of a TF-IDF (word 1-2 grams, identifiers and numbers as words, sublinear tf) +
    logistic regression classifier; `balanced` weights classes inversely to their frequency."""
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline

    model = make_pipeline(
        TfidfVectorizer(
            token_pattern=r"(?u)\b\w+\b", ngram_range=(1, 2), sublinear_tf=True, max_features=100_000
        ),
        LogisticRegression(max_iter=1000, class_weight="balanced" if balanced else None, random_state=seed),
    )
    model.fit(train_texts, train_labels)
    return [int(label) for label in model.predict(test_texts)]
