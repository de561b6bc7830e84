"""Contamination: planted 13-gram overlaps are found, shorter ones and clean items are not."""

import random

from llmcore.contamination import contaminated_fractions, contamination, ngram_hashes


def words(rng, k):
    return " ".join(f"w{rng.randrange(10**6)}" for _ in range(k))


def test_planted_overlaps_are_found_and_nothing_else():
    rng = random.Random(0)
    train = [words(rng, 300) for _ in range(20)]
    source = train[7].split()
    planted = " ".join(source[100:113])  # 13 words of a training document
    near_miss = " ".join(source[200:212])  # 12 words: no 13-gram in common
    held_out = [
        words(rng, 40) + " " + planted + "\n" + words(rng, 40),  # whitespace differs: still the same words
        words(rng, 40) + " " + near_miss + " " + words(rng, 40),
        words(rng, 80),
        "too short to judge",
    ]
    cloze = [planted, " ".join(source[50:80])]
    streamed = (text for text in train)  # the training text is read once, as a stream
    report = contamination({"held_out_text": held_out, "cloze": cloze, "empty": []}, streamed)
    assert report["sets"]["held_out_text"] == {
        "items": 4,
        "contaminated": 1,
        "shorter_than_n": 1,
        "contaminated_fraction": 0.25,
    }
    assert [i["index"] for i in report["items"]["held_out_text"]] == [0]
    assert report["items"]["held_out_text"][0]["overlap"] == round(1 / (40 + 13 + 40 - 12), 4)
    assert [(i["index"], i["overlap"]) for i in report["items"]["cloze"]] == [(0, 1.0), (1, 1.0)]
    assert contaminated_fractions(report) == {
        "contaminated_fraction/held_out_text": 0.25,
        "contaminated_fraction/cloze": 1.0,
        "contaminated_fraction/empty": 0.0,
    }


def test_ngram_hashes_follow_words_in_order():
    a = ngram_hashes("a b c d", n=2)
    assert len(a) == 3 and len(set(a.tolist())) == 3
    assert ngram_hashes("x  a\tb\n", n=2)[1] == a[0]
    assert ngram_hashes("b a", n=2)[0] != a[0]
    assert len(ngram_hashes("a b", n=3)) == 0
