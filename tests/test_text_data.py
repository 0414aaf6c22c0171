"""Text data: corpus reading, tokenizers, packing, shards, split, Grain pipeline, CLI."""

from __future__ import annotations

import gzip
import json
import os
import sys

import numpy as np
import pytest

from dpjax.data import shards, text, text_corpus
from dpjax.data.text_corpus import CorpusFile
from dpjax.data.tokenizer import ByteTokenizer

ROUND_TRIP_TEXTS = [
    "",
    "hello world",
    "def f(x):\n\treturn x ** 2  # tab, newline\n",
    "naïve café — ünïcödé, 中文, emoji 🚀🧪, null \x00 byte",
    "  leading and trailing spaces  \r\n",
]


def _write(path, content: str | bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(content, str):
        content = content.encode("utf-8")
    path.write_bytes(content)


def _make_corpus(root, n_files: int = 12, seed: int = 0) -> list[str]:
    """A small directory corpus: .py/.md/.txt files in subfolders; returns the file texts."""
    rng = np.random.default_rng(seed)
    texts = []
    for i in range(n_files):
        words = rng.choice(["alpha", "beta", "gamma", "δέλτα", "x = 1", "\n", "def g():"], 30)
        body = f"# file {i}\n" + " ".join(words.tolist()) * int(rng.integers(1, 6))
        ext = (".py", ".md", ".txt")[i % 3]
        _write(root / f"sub{i % 4}" / f"doc{i:02d}{ext}", body)
        texts.append(body)
    return texts


def _counter_corpus(root, n_files: int, lines: int) -> None:
    """Files of 16-byte lines holding a global counter: every 16-token window is unique."""
    for i in range(n_files):
        body = "".join(f"{i * lines + k:015d}\n" for k in range(lines))
        _write(root / f"f{i:02d}.txt", body)


def _rows(shard_dir, split: str) -> list[dict[str, np.ndarray]]:
    src = shards.PackedRows(shard_dir, split)
    return [src[i] for i in range(len(src))]


# ----------------------------------------------------------------------------- tokenizers


def test_byte_tokenizer_round_trip_and_vocab():
    tok = ByteTokenizer()
    assert (tok.vocab_size, tok.bos_id, tok.eos_id, tok.pad_id) == (259, 256, 257, 258)
    for s in ROUND_TRIP_TEXTS:
        ids = tok.encode(s)
        assert ids.dtype == np.int32 and ids.size == len(s.encode("utf-8"))
        assert ids.size == 0 or 0 <= ids.min() <= ids.max() < 256
        assert tok.decode(ids) == s
        with_specials = np.concatenate([[tok.bos_id], ids, [tok.eos_id, tok.pad_id]])
        assert tok.decode(with_specials) == s
        assert tok.decode(with_specials, skip_special=False) == f"<bos>{s}<eos><pad>"
    assert [a.tolist() for a in tok.encode_batch(["ab", "c"])] == [[97, 98], [99]]


def test_bpe_tokenizer_train_round_trip_and_shards(tmp_path):
    pytest.importorskip("tokenizers", reason="BPE needs the optional `tokenizers` package")
    from dpjax.data.tokenizer import main as tokenizer_main

    texts = _make_corpus(tmp_path / "corpus")
    out = tmp_path / "tok.json"
    assert (
        tokenizer_main(
            [
                "train",
                "--corpus",
                str(tmp_path / "corpus"),
                "--vocab_size",
                "300",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    tok = text.load_tokenizer(out)
    assert (tok.pad_id, tok.bos_id, tok.eos_id) == (0, 1, 2)
    assert 259 < tok.vocab_size <= 300
    for s in ROUND_TRIP_TEXTS + texts[:3]:
        ids = tok.encode(s)
        assert tok.bos_id not in ids.tolist()
        assert tok.decode(ids) == s
    assert len(tok.encode(texts[0])) < len(texts[0].encode())  # merges happened

    m = text.prepare_text_shards(
        tmp_path / "corpus", tmp_path / "shards", 32, tokenizer=out, progress=False
    )
    assert m["tokenizer"]["kind"] == "huggingface" and (tmp_path / "shards/tokenizer.json").exists()
    tok2 = text.tokenizer_from_shards(tmp_path / "shards")
    assert tok2.vocab_size == tok.vocab_size and tok2.bos_id == tok.bos_id
    stream = np.concatenate([r["tokens"] for r in _rows(tmp_path / "shards", "train")])
    docs = tok2.decode(stream, skip_special=False).split("<bos>")[1:]
    by_name = dict(zip([f"doc{i:02d}" for i in range(len(texts))], texts, strict=True))
    train_names = [f.rsplit("/", 1)[1].split(".")[0] for f in m["splits"]["train"]["files"]]
    assert [d.replace("<pad>", "") for d in docs] == [by_name[n] for n in train_names]


def test_hf_tokenizer_errors(tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="not found"):
        text.load_tokenizer(tmp_path / "missing.json")
    (tmp_path / "t.json").write_text("{}")
    with monkeypatch.context() as m:
        m.setitem(sys.modules, "tokenizers", None)
        with pytest.raises(ImportError, match="pip install tokenizers"):
            text.load_tokenizer(tmp_path / "t.json")
    pytest.importorskip("tokenizers")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="not a HuggingFace tokenizers JSON"):
        text.load_tokenizer(bad)


# ----------------------------------------------------------------------------- packing


def test_packer_keeps_document_boundaries():
    rng = np.random.default_rng(0)
    bos, pad, row_len = 1000, 1001, 17
    docs = [rng.integers(0, 999, int(n)) for n in rng.integers(0, 40, 25)]
    rows: list[tuple[np.ndarray, np.ndarray]] = []
    packer = shards.RowPacker(row_len, bos, lambda t, s: rows.append((t.copy(), s.copy())),
                              pad_id=pad)  # fmt: skip
    for d in docs:
        packer.add(d)
    packer.finish()

    expected = np.concatenate([np.concatenate([[bos], d]) for d in docs])
    doc_of = np.concatenate([np.full(d.size + 1, k) for k, d in enumerate(docs)])
    tokens = np.concatenate([t for t, _ in rows])
    segs = np.concatenate([s for _, s in rows])
    n = expected.size
    assert packer.tokens == n and packer.documents == len(docs) and packer.rows == len(rows)
    assert len(rows) == -(-n // row_len) and packer.padding == len(rows) * row_len - n
    np.testing.assert_array_equal(tokens[:n], expected)  # nothing lost, nothing reordered
    assert (tokens[n:] == pad).all() and (segs[n:] == 0).all() and (segs[:n] > 0).all()
    for r, (t, s) in enumerate(rows):
        real = s > 0
        change = np.zeros(row_len, bool)
        change[1:] = s[1:] != s[:-1]
        # the segment id changes exactly at BOS (padding aside) ...
        np.testing.assert_array_equal(
            change[real], (t == bos)[real] & (np.arange(row_len) > 0)[real]
        )
        assert s[0] == 1 and np.all(np.diff(s[real]) >= 0)
        # ... and every segment holds tokens of exactly one document
        owner = doc_of[r * row_len : (r + 1) * row_len]
        for seg_id in np.unique(s[real]):
            assert np.unique(owner[: real.sum()][s[real] == seg_id]).size == 1


def test_packer_add_eos_and_small_rows():
    rows: list[np.ndarray] = []
    packer = shards.RowPacker(4, 9, lambda t, s: rows.append(t.copy()), eos_id=8, pad_id=7)
    packer.add(np.array([1, 2]))
    packer.add(np.array([], np.int32))  # an empty document still gets BOS (+EOS)
    packer.finish()
    np.testing.assert_array_equal(np.concatenate(rows), [9, 1, 2, 8, 9, 8, 7, 7])
    assert packer.padding == 2 and packer.tokens == 6
    with pytest.raises(ValueError, match="row_len"):
        shards.RowPacker(1, 0, print)


def test_row_to_example_shift_positions_and_mask():
    tokens = np.array([256, 10, 11, 256, 12, 13, 256, 14, 258, 258])
    seg = np.array([1, 1, 1, 2, 2, 2, 3, 3, 0, 0])
    ex = text.row_to_example({"tokens": tokens, "segment_ids": seg})
    assert all(v.dtype == np.int32 and v.shape == (9,) for v in ex.values())
    np.testing.assert_array_equal(ex["input_ids"], tokens[:-1])
    np.testing.assert_array_equal(ex["labels"], tokens[1:])
    np.testing.assert_array_equal(ex["segment_ids"], seg[:-1])
    np.testing.assert_array_equal(ex["positions"], [0, 1, 2, 0, 1, 2, 0, 1, 0])
    np.testing.assert_array_equal(ex["loss_mask"], [1, 1, 1, 1, 1, 1, 1, 0, 0])
    # a row that starts mid-document: positions restart at the row start
    ex = text.row_to_example({"tokens": np.array([5, 6, 256, 7]), "segment_ids": [1, 1, 2, 2]})
    np.testing.assert_array_equal(ex["positions"], [0, 1, 0])


# ----------------------------------------------------------------------------- split


def test_split_by_file_is_deterministic_and_disjoint():
    files = [CorpusFile(path=None, relpath=f"d{i % 7}/f{i:03d}.py") for i in range(200)]
    train, val = text.split_files(files, 0.1, seed=3)
    train2, val2 = text.split_files(list(reversed(files)), 0.1, seed=3)
    assert [f.relpath for f in train] == [f.relpath for f in train2]
    assert [f.relpath for f in val] == [f.relpath for f in val2]
    assert len(val) == 20 and len(train) == 180
    names_t, names_v = {f.relpath for f in train}, {f.relpath for f in val}
    assert not names_t & names_v and names_t | names_v == {f.relpath for f in files}
    assert {f.relpath for f in text.split_files(files, 0.1, seed=4)[1]} != names_v
    # stability: one more file moves at most one file out of validation
    _, val_more = text.split_files(files + [CorpusFile(None, "zz/new.py")], 0.1, seed=3)
    assert len(names_v - {f.relpath for f in val_more}) <= 1
    # tiny corpora still get one validation file, and never lose all training files
    two = files[:2]
    assert [len(x) for x in text.split_files(two, 0.01, 0)] == [1, 1]
    assert [len(x) for x in text.split_files(two, 0.0, 0)] == [2, 0]
    with pytest.raises(ValueError, match="val_fraction"):
        text.split_files(files, 1.0, 0)


def test_prepare_split_idempotent_and_deterministic(tmp_path):
    _make_corpus(tmp_path / "corpus", n_files=12)
    kw = dict(val_fraction=0.25, seed=5, progress=False, shard_tokens=64)
    m = text.prepare_text_shards(tmp_path / "corpus", tmp_path / "a", 16, **kw)
    tr, va = m["splits"]["train"], m["splits"]["validation"]
    assert len(va["files"]) == 3 and len(tr["files"]) == 9
    assert not set(tr["files"]) & set(va["files"])
    assert len(tr["shards"]) > 1  # small shard_tokens -> several .npy files
    assert tr["rows"] == len(shards.PackedRows(tmp_path / "a", "train"))
    assert tr["documents"] == 9 and m["corpus"]["split_unit"] == "file"

    # same config -> reused (files untouched); same config elsewhere -> identical shards
    stamp = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "a").iterdir()}
    assert text.prepare_text_shards(tmp_path / "corpus", tmp_path / "a", 16, **kw) == m
    assert stamp == {p.name: p.stat().st_mtime_ns for p in (tmp_path / "a").iterdir()}
    m_b = text.prepare_text_shards(tmp_path / "corpus", tmp_path / "b", 16, **kw)
    assert m_b["splits"]["validation"]["files"] == va["files"]
    for split in ("train", "validation"):
        for ra, rb in zip(_rows(tmp_path / "a", split), _rows(tmp_path / "b", split), strict=True):
            np.testing.assert_array_equal(ra["tokens"], rb["tokens"])
            np.testing.assert_array_equal(ra["segment_ids"], rb["segment_ids"])

    # touched but unchanged corpus -> still reused (content hash)
    f0 = next((tmp_path / "corpus").rglob("*.py"))
    os.utime(f0, ns=(1, 1))
    assert text.prepare_text_shards(tmp_path / "corpus", tmp_path / "a", 16, **kw) == m
    # another config in the same dir -> clear error, or replaced with overwrite
    with pytest.raises(ValueError, match="seq_len"):
        text.prepare_text_shards(tmp_path / "corpus", tmp_path / "a", 32, **kw)
    m32 = text.prepare_text_shards(tmp_path / "corpus", tmp_path / "a", 32, overwrite=True, **kw)
    assert (
        m32["row_len"] == 33 and shards.PackedRows(tmp_path / "a", "train")[0]["tokens"].size == 33
    )
    listed = {"manifest.json"} | {
        n
        for s in m32["splits"].values()
        for sh in s["shards"]
        for n in (sh["tokens"], sh["segments"])
    }
    assert {p.name for p in (tmp_path / "a").iterdir()} == listed  # old shards removed
    # a changed corpus is detected
    _write(f0, "changed contents")
    with pytest.raises(ValueError, match="corpus contents"):
        text.prepare_text_shards(tmp_path / "corpus", tmp_path / "a", 32, **kw)


def test_jsonl_single_file_splits_by_record(tmp_path):
    path = tmp_path / "data.jsonl.gz"
    records = [{"content": f"record {i} " * (i % 5 + 1), "id": i} for i in range(300)]
    with gzip.open(path, "wt", encoding="utf-8") as fh:
        fh.write("\n".join(json.dumps(r) for r in records) + "\n\n")
    kw = dict(jsonl_key="content", val_fraction=0.1, progress=False)
    m = text.prepare_text_shards(path, tmp_path / "s", 64, **kw)
    tr, va = m["splits"]["train"]["documents"], m["splits"]["validation"]["documents"]
    assert m["corpus"]["split_unit"] == "record" and tr + va == 300 and 10 < va < 60
    m2 = text.prepare_text_shards(path, tmp_path / "s2", 64, **kw)
    assert m2["splits"]["validation"]["documents"] == va


# ----------------------------------------------------------------------------- pipeline


@pytest.fixture(scope="module")
def small_shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("pipe")
    _counter_corpus(root / "corpus", n_files=10, lines=25)
    text.prepare_text_shards(root / "corpus", root / "shards", 16, val_fraction=0.2,
                             progress=False)  # fmt: skip
    return root / "shards"


def test_pipeline_batches_and_exact_resume(small_shards):
    pytest.importorskip("grain")
    n_rows = len(shards.PackedRows(small_shards, "train"))
    kw = dict(batch_size=4, seed=7, process_index=0, process_count=1)
    it = text.text_iterator(small_shards, "train", **kw)
    first = next(it)
    assert set(first) == {"input_ids", "labels", "segment_ids", "positions", "loss_mask"}
    assert all(v.shape == (4, 16) and v.dtype == np.int32 for v in first.values())
    steps = 2 * n_rows // 4 + 3  # run through more than two epochs
    for _ in range(5):
        next(it)
    state = it.get_state()
    json.dumps(state)  # JSON-able
    expected = [next(it) for _ in range(steps)]
    resumed = text.text_iterator(small_shards, "train", state=state, **kw)
    for a, b in zip(expected, [next(resumed) for _ in range(steps)], strict=True):
        for k in a:
            np.testing.assert_array_equal(a[k], b[k])
    # a fresh iterator with the same seed replays the same stream; another seed does not
    again = text.text_iterator(small_shards, "train", **kw)
    np.testing.assert_array_equal(next(again)["input_ids"], first["input_ids"])
    other = text.text_iterator(small_shards, "train", **{**kw, "seed": 8})
    assert not np.array_equal(next(other)["input_ids"], first["input_ids"])


def test_pipeline_epochs_and_process_sharding(small_shards):
    pytest.importorskip("grain")
    src = shards.PackedRows(small_shards, "train")
    all_rows = {tuple(src[i]["tokens"][:-1]) for i in range(len(src))}
    seen = []
    for pi in range(3):
        ds = text.text_dataset(small_shards, "train", batch_size=1, num_epochs=1,
                               process_index=pi, process_count=3)  # fmt: skip
        seen.append([tuple(ds[i]["input_ids"][0]) for i in range(len(ds))])
    assert len({len(s) for s in seen}) == 1 and len(seen[0]) == len(src) // 3
    flat = [r for s in seen for r in s]
    assert len(set(flat)) == len(flat) and set(flat) <= all_rows  # disjoint shards
    # one unshuffled epoch of validation, in file order
    ds = text.text_dataset(small_shards, "validation", batch_size=1, num_epochs=1, shuffle=False,
                           process_index=0, process_count=1)  # fmt: skip
    val = shards.PackedRows(small_shards, "validation")
    assert len(ds) == len(val)
    np.testing.assert_array_equal(ds[len(ds) - 1]["labels"][0], val[len(val) - 1]["tokens"][1:])
    with pytest.raises(ValueError, match="too few"):
        text.text_dataset(small_shards, "validation", batch_size=10_000, process_index=0,
                          process_count=1)  # fmt: skip
    with pytest.raises(ValueError, match="no split"):
        shards.PackedRows(small_shards, "test")
    with pytest.raises(ValueError, match="manifest.json"):
        shards.PackedRows(small_shards.parent / "corpus", "train")


# ----------------------------------------------------------------------------- stdlib corpus


def test_stdlib_corpus_found_and_non_empty(tmp_path):
    root, files = text.list_corpus_files("stdlib", limit=40)
    assert root.is_dir() and len(files) == 40
    assert all(f.relpath.endswith(".py") for f in files)
    bad = {"test", "tests", "idle_test", "site-packages"}
    assert not any(bad & set(f.relpath.split("/")) for f in files)
    m = text.prepare_text_shards("stdlib", tmp_path / "std", 128, limit_files=40, progress=False)
    assert m["corpus"]["num_files"] == 40 and m["splits"]["train"]["tokens"] > 10_000
    assert m["splits"]["validation"]["rows"] > 0 and len(m["splits"]["validation"]["files"]) == 1


# ----------------------------------------------------------------------------- errors


def test_missing_and_empty_corpus_errors(tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(ValueError, match="does not exist") as e:
        text.list_corpus_files(missing)
    assert str(missing) in str(e.value)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no files ending with") as e:
        text.prepare_text_shards(tmp_path / "empty", tmp_path / "o", 8, progress=False)
    assert "empty" in str(e.value)
    _write(tmp_path / "other" / "image.png", b"\x89PNG")
    with pytest.raises(ValueError, match="no files ending with"):
        text.list_corpus_files(tmp_path / "other")
    with pytest.raises(ValueError, match="unsupported file type"):
        text.list_corpus_files(tmp_path / "other" / "image.png")
    _write(tmp_path / "blank" / "a.txt", "")
    _write(tmp_path / "blank" / "b.txt", "")
    with pytest.raises(ValueError, match="no non-empty training documents"):
        text.prepare_text_shards(tmp_path / "blank", tmp_path / "o", 8, progress=False)
    _write(tmp_path / "one.txt", "a single document")
    with pytest.raises(ValueError, match="cannot be split"):
        text.prepare_text_shards(tmp_path / "one.txt", tmp_path / "o", 8, progress=False)
    m = text.prepare_text_shards(tmp_path / "one.txt", tmp_path / "o1", 8, val_fraction=0,
                                 progress=False)  # fmt: skip
    assert m["splits"]["train"]["documents"] == 1 and m["splits"]["validation"]["rows"] == 0
    with pytest.raises(ValueError, match="seq_len"):
        text.prepare_text_shards(tmp_path / "one.txt", tmp_path / "o2", 0, progress=False)


def test_unreadable_and_undecodable_files(tmp_path):
    corpus = tmp_path / "c"
    _make_corpus(corpus, n_files=4)
    os.symlink(tmp_path / "gone.txt", corpus / "dangling.txt")  # listed, cannot be opened
    with pytest.raises(ValueError, match="cannot read corpus file") as e:
        text.prepare_text_shards(corpus, tmp_path / "o", 8, progress=False)
    assert "dangling.txt" in str(e.value)
    (corpus / "dangling.txt").unlink()

    _write(corpus / "latin1.txt", "caf\xe9".encode("latin-1"))
    with pytest.warns(UserWarning, match=r"skipped 1 file"):
        m = text.prepare_text_shards(corpus, tmp_path / "o", 8, progress=False)
    assert [s["file"] for s in m["corpus"]["skipped"]] == ["latin1.txt"]
    with pytest.raises(ValueError, match="not valid UTF-8") as e:
        text.prepare_text_shards(corpus, tmp_path / "o3", 8, on_decode_error="raise",
                                 progress=False)  # fmt: skip
    assert "latin1.txt" in str(e.value)


def test_jsonl_and_parquet_errors(tmp_path, monkeypatch):
    bad = tmp_path / "bad.jsonl"
    _write(bad, '{"text": "ok"}\n{oops\n')
    with pytest.raises(ValueError, match=r"line 2: not valid JSON"):
        list(text.read_documents(CorpusFile(bad, "bad.jsonl")))
    _write(bad, '{"text": "ok"}\n{"body": "no text key"}\n')
    with pytest.raises(ValueError, match=r"line 2: expected a JSON object with a 'text' field"):
        list(text.read_documents(CorpusFile(bad, "bad.jsonl")))
    _write(bad, '{"text": 3}\n')
    with pytest.raises(ValueError, match="expected a string"):
        list(text.read_documents(CorpusFile(bad, "bad.jsonl")))
    _write(bad, b'{"text": "ok"}\n{"text": "caf\xe9"}\n{"text": "fine"}\n')
    report = text_corpus.ReadReport()
    docs = list(text.read_documents(CorpusFile(bad, "bad.jsonl"), report=report))
    assert docs == ["ok", "fine"] and report.skipped[0][0] == "bad.jsonl:2"

    pq_path = tmp_path / "d.parquet"
    _write(pq_path, b"PAR1")
    monkeypatch.setitem(sys.modules, "pyarrow", None)
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    with pytest.raises(ImportError, match="pip install pyarrow"):
        text.prepare_text_shards(pq_path, tmp_path / "o", 8, progress=False)


def test_parquet_reading(tmp_path):
    pa = pytest.importorskip("pyarrow", reason="parquet reading needs the optional pyarrow")
    import pyarrow.parquet as pq

    table = pa.table({"text": ["first doc", "", None, "third ✓"], "n": [1, 2, 3, 4]})
    pq.write_table(table, tmp_path / "d.parquet")
    f = CorpusFile(tmp_path / "d.parquet", "d.parquet")
    assert list(text.read_documents(f)) == ["first doc", "third ✓"]
    with pytest.raises(ValueError, match="no column 'body'"):
        list(text.read_documents(f, parquet_column="body"))


# ----------------------------------------------------------------------------- CLI


def test_cli_help_and_prepare(tmp_path, capsys):
    from dpjax.data.tokenizer import main as tokenizer_main

    for argv, flags in [
        (["prepare", "--help"], ["--corpus", "--out", "--seq_len", "--tokenizer",
                                 "--val_fraction", "--seed", "--jsonl_key", "--limit_files",
                                 "--on_decode_error", "--overwrite", "--quiet"]),
        (["inspect", "--help"], ["--split", "--row"]),
    ]:  # fmt: skip
        with pytest.raises(SystemExit) as e:
            text.main(argv)
        assert e.value.code == 0
        out = capsys.readouterr().out
        assert all(flag in out for flag in flags)
    with pytest.raises(SystemExit) as e:
        tokenizer_main(["train", "--help"])
    assert e.value.code == 0 and "--vocab_size" in capsys.readouterr().out

    _make_corpus(tmp_path / "c", n_files=5)
    argv = ["prepare", "--corpus", str(tmp_path / "c"), "--out", str(tmp_path / "s"),
            "--seq_len", "32", "--val_fraction", "0.2"]  # fmt: skip
    assert text.main(argv) == 0
    assert "train" in capsys.readouterr().out
    assert text.main(["inspect", str(tmp_path / "s")]) == 0
    assert '"seq_len": 32' in capsys.readouterr().out
    with pytest.raises(SystemExit) as e:
        text.main(["prepare", "--corpus", str(tmp_path / "nope"), "--out", "x", "--seq_len", "8"])
    assert e.value.code == 2 and "does not exist" in capsys.readouterr().err
