"""Prepare packed token shards from a local corpus, once: list files -> split by file ->
tokenise (BOS per document) -> pack into ``seq_len + 1`` rows -> ``.npy`` shards + manifest.

Idempotent: the manifest records the configuration (tokenizer fingerprint, seq_len, split
fraction and seed, reader options) and the corpus fingerprint. Calling again with the same
configuration on an unchanged corpus returns the existing manifest without touching the files;
a corpus whose file stats changed (e.g. copied) is re-hashed by content before deciding. A
different configuration in the same directory is an error unless ``overwrite=True``.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from dpjax.data import shards as shards_lib
from dpjax.data.text_corpus import (
    DEFAULT_EXTENSIONS,
    CorpusFile,
    OnDecodeError,
    ReadReport,
    content_fingerprint,
    list_corpus_files,
    read_documents,
    record_in_validation,
    require_pyarrow,
    split_files,
    stat_fingerprint,
)
from dpjax.data.tokenizer import TextTokenizer, load_tokenizer, tokenizer_fingerprint

SPLITS = ("train", "validation")
DEFAULT_SEED = 2357  # the seed of the paper's length-extrapolation validation split
DEFAULT_VAL_FRACTION = 0.01
DEFAULT_SHARD_TOKENS = 1 << 25  # ~32M tokens per .npy file (64 MiB of uint16 tokens)
_ENCODE_BATCH_CHARS = 1 << 20


def _config(
    tok: TextTokenizer,
    seq_len: int,
    val_fraction: float,
    seed: int,
    jsonl_key: str,
    parquet_column: str,
    extensions: Sequence[str],
    limit_files: int | None,
    add_eos: bool,
    on_decode_error: str,
) -> dict[str, Any]:
    return {
        "tokenizer_fingerprint": tokenizer_fingerprint(tok),
        "seq_len": seq_len,
        "val_fraction": val_fraction,
        "seed": seed,
        "jsonl_key": jsonl_key,
        "parquet_column": parquet_column,
        "extensions": list(extensions),
        "limit_files": limit_files,
        "add_eos": add_eos,
        "on_decode_error": on_decode_error,
    }


def _reusable(
    out: Path, config: dict[str, Any], files: list[CorpusFile], overwrite: bool
) -> dict[str, Any] | None:
    """The existing manifest if it matches ``config`` and the corpus; else ``None`` (or raise)."""
    if not (out / shards_lib.MANIFEST).exists():
        return None
    try:
        old = shards_lib.read_manifest(out)
    except ValueError:
        if overwrite:
            return None
        raise
    diff = sorted(
        k for k in set(config) | set(old["config"]) if config.get(k) != old["config"].get(k)
    )
    if not diff:
        corpus = old["corpus"]
        if corpus["stat_fingerprint"] == stat_fingerprint(files):
            return old
        if corpus["content_sha256"] == content_fingerprint(files):
            return old
        diff = ["corpus contents"]
    if overwrite:
        return None
    raise ValueError(
        f"{str(out)!r} already holds shards of another configuration (differs in: "
        f"{', '.join(diff)}); use another --out directory or pass overwrite=True / --overwrite"
    )


def _remove_old(out: Path) -> None:
    """Delete the files a previous manifest lists (and the manifest), nothing else."""
    try:
        old = shards_lib.read_manifest(out)
    except ValueError:
        old = {"splits": {}}
    (out / shards_lib.MANIFEST).unlink(missing_ok=True)
    for split in old["splits"].values():
        for s in split.get("shards", []):
            for name in (s["tokens"], s["segments"]):
                (out / name).unlink(missing_ok=True)
    (out / "tokenizer.json").unlink(missing_ok=True)


class _SplitSink:
    """Tokenise documents in batches and pack them into one split's shards."""

    def __init__(
        self,
        tok: TextTokenizer,
        tmp: Path,
        split: str,
        row_len: int,
        shard_tokens: int,
        add_eos: bool,
    ):
        rows_per_shard = max(1, shard_tokens // row_len)
        self.writer = shards_lib.ShardWriter(
            tmp, split, row_len, shards_lib.token_dtype(tok.vocab_size), rows_per_shard
        )
        self.packer = shards_lib.RowPacker(
            row_len,
            tok.bos_id,
            self.writer.add_row,
            eos_id=tok.eos_id if add_eos else None,
            pad_id=tok.pad_id,
        )
        self.tok = tok
        self.files: list[str] = []
        self._pending: list[str] = []
        self._chars = 0

    def add(self, doc: str) -> None:
        self._pending.append(doc)
        self._chars += len(doc)
        if self._chars >= _ENCODE_BATCH_CHARS:
            self.flush()

    def flush(self) -> None:
        if self._pending:
            for ids in self.tok.encode_batch(self._pending):
                self.packer.add(ids)
        self._pending, self._chars = [], 0

    def close(self) -> dict[str, Any]:
        self.flush()
        self.packer.finish()
        p = self.packer
        return {
            "files": self.files,
            "documents": p.documents,
            "tokens": p.tokens,
            "rows": p.rows,
            "padding_tokens": p.padding,
            "shards": self.writer.close(),
        }


def prepare_text_shards(
    corpus: str | os.PathLike,
    out: str | os.PathLike,
    seq_len: int,
    *,
    tokenizer: str | os.PathLike | TextTokenizer = "bytes",
    val_fraction: float = DEFAULT_VAL_FRACTION,
    seed: int = DEFAULT_SEED,
    jsonl_key: str = "text",
    parquet_column: str = "text",
    extensions: Sequence[str] = DEFAULT_EXTENSIONS,
    limit_files: int | None = None,
    add_eos: bool = False,
    on_decode_error: OnDecodeError = "skip",
    shard_tokens: int = DEFAULT_SHARD_TOKENS,
    overwrite: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """Tokenise ``corpus`` and write packed train/validation shards to ``out``; return the
    manifest (also at ``out/manifest.json``).

    Args:
      corpus: ``"stdlib"``, a directory or a file (see :mod:`dpjax.data.text_corpus`).
      out: shard directory (created); reused when it already holds this configuration.
      seq_len: model sequence length ``T``; rows hold ``T + 1`` tokens (inputs/targets shift).
      tokenizer: ``"bytes"``, a HuggingFace tokenizer JSON path, or a tokenizer object.
      val_fraction, seed: file-level split (record-level for a one-file ``.jsonl``/``.parquet``).
      limit_files: only the first N files (sorted by path) — quick runs and tests.
      add_eos: also append EOS to every document (BOS is always prepended).
      on_decode_error: ``"skip"`` (count, warn, record in the manifest) or ``"raise"``.
      shard_tokens: approximate tokens per ``.npy`` file.
      progress: show a tqdm bar (bytes read, rate, ETA) while tokenising.

    Manifest keys: ``config``, ``seq_len``, ``row_len``, ``tokenizer`` (spec; ``file`` is the
    copied JSON for HF tokenizers), ``token_dtype``, ``corpus`` (root, number of files,
    fingerprints, ``split_unit``, skipped files), ``splits[name]`` (``files``, ``documents``,
    ``tokens`` incl. specials, ``rows``, ``padding_tokens``, ``shards``), ``created``.
    """
    if int(seq_len) < 1:
        raise ValueError(f"seq_len must be >= 1, got {seq_len}")
    seq_len, row_len = int(seq_len), int(seq_len) + 1
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    tok = tokenizer if isinstance(tokenizer, TextTokenizer) else load_tokenizer(tokenizer)
    root, files = list_corpus_files(corpus, extensions=extensions, limit=limit_files)
    for f in files:
        if f.relpath.endswith(".parquet"):
            require_pyarrow(f.path)
            break
    config = _config(
        tok, seq_len, val_fraction, seed, jsonl_key, parquet_column,
        extensions, limit_files, add_eos, on_decode_error,
    )  # fmt: skip
    out = Path(out).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    existing = _reusable(out, config, files, overwrite)
    if existing is not None:
        if progress:
            print(f"reusing shards in {out} (same configuration and corpus)")
        return existing

    # Split: by file when there are several files, else by record inside the one file.
    if len(files) >= 2:
        split_unit = "file"
        train_files, val_files = split_files(files, val_fraction, seed)
        assignment = {f.relpath: "train" for f in train_files}
        assignment.update({f.relpath: "validation" for f in val_files})
    elif files[0].holds_records:
        split_unit, assignment = "record", {}
    elif val_fraction > 0:
        raise ValueError(
            f"corpus {str(corpus)!r} is one plain-text file, i.e. one document, which cannot be "
            "split into train and validation: pass val_fraction=0 (--val_fraction 0) or give a "
            "directory of files"
        )
    else:
        split_unit, assignment = "file", {files[0].relpath: "train"}

    tmp = out / f".prepare-tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        report = ReadReport()
        sinks = {
            s: _SplitSink(tok, tmp, s, row_len, shard_tokens=shard_tokens, add_eos=add_eos)
            for s in SPLITS
        }
        _tokenise_all(files, assignment, sinks, report, val_fraction, seed, progress,
                      jsonl_key=jsonl_key, parquet_column=parquet_column,
                      on_decode_error=on_decode_error)  # fmt: skip
        splits = {s: sink.close() for s, sink in sinks.items()}
        if splits["train"]["documents"] == 0:
            raise ValueError(
                f"corpus {str(corpus)!r} yielded no non-empty training documents "
                f"({len(files)} file(s), {len(report.skipped)} skipped as undecodable, "
                f"{report.empty_documents} empty)"
            )
        report.warn_if_skipped()
        if (out / shards_lib.MANIFEST).exists():
            _remove_old(out)  # only reached with overwrite=True
        for path in tmp.iterdir():
            os.replace(path, out / path.name)
        tok_spec = dict(tok.spec())
        if "path" in tok_spec:
            shutil.copyfile(tok_spec["path"], out / "tokenizer.json")
            tok_spec["file"] = "tokenizer.json"
        manifest = {
            "format": shards_lib.FORMAT,
            "format_version": shards_lib.FORMAT_VERSION,
            "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            "config": config,
            "seq_len": seq_len,
            "row_len": row_len,
            "tokenizer": tok_spec,
            "token_dtype": np.dtype(shards_lib.token_dtype(tok.vocab_size)).name,
            "segment_dtype": np.dtype(shards_lib.segment_dtype(row_len)).name,
            "corpus": {
                "source": str(corpus),
                "root": str(root),
                "num_files": len(files),
                "stat_fingerprint": stat_fingerprint(files),
                "content_sha256": content_fingerprint(files),
                "split_unit": split_unit,
                "skipped": [{"file": r, "reason": why} for r, why in report.skipped],
                "empty_documents": report.empty_documents,
            },
            "splits": splits,
        }
        shards_lib.write_manifest(out, manifest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if progress:
        t, v = splits["train"], splits["validation"]
        print(
            f"wrote {out}: train {t['rows']} rows ({t['tokens']:,} tokens, {len(t['files'])} "
            f"files), validation {v['rows']} rows ({v['tokens']:,} tokens, {len(v['files'])} "
            f"files), seq_len {seq_len}, vocab {tok.vocab_size}"
        )
    return manifest


def _tokenise_all(
    files: list[CorpusFile],
    assignment: dict[str, str],
    sinks: dict[str, _SplitSink],
    report: ReadReport,
    val_fraction: float,
    seed: int,
    progress: bool,
    **read_kw: Any,
) -> None:
    from tqdm.auto import tqdm

    total = 0
    for f in files:
        with contextlib.suppress(OSError):  # reported clearly when the file is read
            total += f.path.stat().st_size
    with tqdm(
        total=total,
        unit="B",
        unit_scale=True,
        desc="tokenising",
        disable=not progress,
        dynamic_ncols=True,
    ) as bar:
        for n_done, f in enumerate(files):
            split = assignment.get(f.relpath)
            if split is not None:
                sinks[split].files.append(f.relpath)
            for i, doc in enumerate(
                read_documents(f, report=report, on_bytes=bar.update, **read_kw)
            ):
                if split is None:  # record-level split of a one-file corpus
                    s = (
                        "validation"
                        if record_in_validation(f.relpath, i, val_fraction, seed)
                        else "train"
                    )
                    sinks[s].add(doc)
                else:
                    sinks[split].add(doc)
            bar.set_postfix(files=f"{n_done + 1}/{len(files)}", refresh=False)
    if not assignment:  # record-level: the one file feeds both splits
        for s in sinks.values():
            s.files = [files[0].relpath]
