"""The sampling stage's prompts, its Python parse rate, distinct-2 and repetition rate."""

import json

from llmcore.completions import (
    PromptConfig,
    distinct_n,
    held_out_prompts,
    is_python_corpus,
    parses_as_python,
    repetition_rate,
    row_scores,
    strategies,
    strategy_scores,
)
from llmcore.sampling import SamplingConfig


def corpus(folder, documents):
    folder.mkdir()
    for split in ("train", "validation"):
        with open(folder / f"{split}.jsonl", "w") as f:
            for i, (source, text) in enumerate(documents):
                f.write(json.dumps({"id": str(i), "source": source, "text": text}) + "\n")
    (folder / "manifest.json").write_text("{}")
    return folder


def test_prompts_end_at_the_first_definition_without_its_newline(tmp_path):
    code = '"""Module."""\nimport os\n\nX = 1\n\ndef area(r):\n    return 3.14 * r * r\n'
    prose = "line one\nline two\nline three\n"
    folder = corpus(tmp_path / "c", [("a.py", code), ("b.md", prose)])
    prompts = held_out_prompts(folder, PromptConfig(num_prompts=2, prompt_lines=3))
    assert prompts == ["X = 1\n\ndef area(r):", "line one\nline"]  # prose: at most half, at a boundary
    assert not is_python_corpus(corpus(tmp_path / "d", [("a.md", prose), ("b.md", prose), ("c.py", code)]))
    assert is_python_corpus(folder) is False  # one of two is not a majority


def test_prose_prompts_are_document_openings_that_leave_text_to_continue(tmp_path):
    notes = [
        (f"note{i}", f"Note {i}. " + "The river rose after the long rain and the mill stopped. " * (i + 1))
        for i in range(4)
    ]
    prompts = held_out_prompts(corpus(tmp_path / "c", notes), PromptConfig(num_prompts=4, prompt_chars=80))
    for prompt, (_, text) in zip(prompts, notes, strict=False):
        assert text.startswith(prompt) and prompt.strip() == prompt
        assert 0 < len(prompt) <= min(80, len(text) // 2)
        assert text[len(prompt)] in " \n"  # cut between words


def test_parse_rate_counts_only_completions_that_finish_a_line():
    assert parses_as_python("def f(x):", "\n    return x\n    y = (")
    assert not parses_as_python("def f(x):", "\nreturn x\n")  # wrong indentation
    assert not parses_as_python(
        "x = 1\n", "y = 2"
    )  # no line of its own finished: the prompt alone would pass
    assert not parses_as_python("def f(x):", "\n")


def test_four_strategies_share_length_and_seed():
    chosen = strategies(SamplingConfig(max_new_tokens=9, seed=4, temperature=0.7))
    assert chosen["greedy"].temperature == 0 and chosen["top_k"].top_k == 40 and chosen["top_p"].top_p == 0.9
    assert {c.max_new_tokens for c in chosen.values()} == {9} and {c.seed for c in chosen.values()} == {4}
    assert chosen["temperature"].temperature == 0.7 and chosen["temperature"].top_k is None


def test_distinct_2_and_repetition_rate_on_known_strings():
    assert distinct_n(["a b a b"]) == 2 / 3  # bigrams (a b) (b a) (a b)
    assert distinct_n(["a b c", "a b  d"]) == 3 / 4  # pooled: (a b) twice, (b c), (b d)
    assert distinct_n(["one"]) is None and distinct_n([]) is None
    assert repetition_rate(["x y z w x y z w x"]) == 2 / 6  # 4-grams 5 and 6 repeat 1 and 2
    assert repetition_rate(["a b c d e f", "q q q q q"]) == 1 / 5  # (q q q q) twice in the second
    assert repetition_rate(["a b c"]) is None
    assert row_scores("for i in for i in") == {"distinct_2": 3 / 5, "repetition_rate": 0.0}


def test_strategy_scores_pool_each_strategy_and_skip_what_has_no_ngram():
    rows = [
        {"strategy": "greedy", "completion": "a b a b a b"},
        {"strategy": "greedy", "completion": "a b"},
        {"strategy": "top_p", "completion": "c d e"},
        {"strategy": "top_k", "completion": ""},
    ]
    assert strategy_scores(rows) == {
        "greedy_distinct_2": 2 / 6,
        "greedy_repetition_rate": 1 / 3,
        "top_p_distinct_2": 1.0,
    }
