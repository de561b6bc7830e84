import hashlib

import numpy as np
import pytest

from llmcore.artifacts import atomic_write_json
from llmcore.errors import ConfigError
from llmcore.shards import ShardWriter, main, open_split, token_dtype


def write_split(folder, split, chunks, shard_tokens, dtype=np.uint16):
    with ShardWriter(folder, split, dtype, shard_tokens) as writer:
        for chunk in chunks:
            writer.write(chunk)
    return writer.close()


def write_manifest(folder, splits, dtype="uint16"):
    atomic_write_json(
        folder / "manifest.json",
        {
            "dtype": dtype,
            "vocab_size": 1000,
            "splits": {s: {"files": f, "tokens": sum(x["tokens"] for x in f)} for s, f in splits.items()},
        },
    )


def test_token_dtype_switches_above_65536():
    assert token_dtype(4096) == np.uint16
    assert token_dtype(65536) == np.uint16  # ids 0..65535 fit
    assert token_dtype(65537) == np.uint32
    with pytest.raises(ConfigError):
        token_dtype(0)


def test_writer_splits_files_at_shard_tokens_and_reads_back(tmp_path):
    chunks = [np.arange(7), list(range(7, 14)), np.arange(14, 25), []]
    files = write_split(tmp_path, "train", chunks, shard_tokens=10)
    assert [{k: f[k] for k in ("file", "tokens")} for f in files] == [
        {"file": "train_000000.bin", "tokens": 10},
        {"file": "train_000001.bin", "tokens": 10},
        {"file": "train_000002.bin", "tokens": 5},
    ]
    assert [(tmp_path / f["file"]).stat().st_size for f in files] == [20, 20, 10]
    assert [f["sha256"] for f in files] == [
        hashlib.sha256((tmp_path / f["file"]).read_bytes()).hexdigest() for f in files
    ]
    write_manifest(tmp_path, {"train": files})
    split = open_split(tmp_path, "train")
    assert split.num_tokens == 25
    assert all(s.dtype == np.uint16 for s in split.shards)
    np.testing.assert_array_equal(np.concatenate(split.shards), np.arange(25))


def test_exact_multiple_leaves_no_empty_file(tmp_path):
    files = write_split(tmp_path, "validation", [np.arange(20)], shard_tokens=10)
    assert [f["tokens"] for f in files] == [10, 10]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["validation_000000.bin", "validation_000001.bin"]


def test_empty_split_has_no_files_and_opens_empty(tmp_path):
    files = write_split(tmp_path, "validation", [], shard_tokens=10)
    assert files == []
    write_manifest(tmp_path, {"validation": files})
    split = open_split(tmp_path, "validation")
    assert split.shards == [] and split.num_tokens == 0


def test_uint32_shards_hold_large_ids(tmp_path):
    ids = [0, 65536, 100_000]
    files = write_split(tmp_path, "train", [ids], shard_tokens=10, dtype=token_dtype(100_001))
    write_manifest(tmp_path, {"train": files}, dtype="uint32")
    assert open_split(tmp_path, "train").shards[0].tolist() == ids


def test_write_rejects_ids_that_do_not_fit(tmp_path):
    with ShardWriter(tmp_path, "train", np.uint16, 10) as writer:
        with pytest.raises(ValueError, match="65535"):
            writer.write([1, 65536])
        with pytest.raises(ValueError):
            writer.write(np.array([-1]))


def test_open_split_missing_folder_names_the_stage(tmp_path):
    with pytest.raises(ConfigError, match="llmcore.tokenizer encode"):
        open_split(tmp_path / "missing", "train")


def test_open_split_unknown_split_and_truncated_file(tmp_path):
    files = write_split(tmp_path, "train", [np.arange(12)], shard_tokens=10)
    write_manifest(tmp_path, {"train": files})
    with pytest.raises(ConfigError, match="no 'validation' split"):
        open_split(tmp_path, "validation")
    (tmp_path / "train_000001.bin").write_bytes(b"\0\0")  # 1 token where the manifest says 2
    with pytest.raises(ConfigError, match="train_000001.bin"):
        open_split(tmp_path, "train")


def test_cli_prints_split_summary(tmp_path, capsys):
    files = write_split(tmp_path, "train", [np.arange(5)], shard_tokens=10)
    write_manifest(tmp_path, {"train": files})
    main([str(tmp_path), "--head", "3"])
    assert capsys.readouterr().out.strip() == "train: 5 tokens in 1 files, first ids [0, 1, 2]"
