"""Packed token shards on disk: pack documents into fixed-length rows, write them as ``.npy``
files, and read them back by row (a random-access source for Grain).

Layout of a shard directory (one per tokenizer/seq_len/split config)::

    manifest.json                      written last: its presence means the shards are complete
    tokenizer.json                     copy of the HF tokenizer file (absent for bytes)
    train-00000.tokens.npy             uint16 [rows, seq_len + 1]  (int32 when vocab > 65536)
    train-00000.segments.npy           uint16 [rows, seq_len + 1]  (int32 when seq_len >= 65535)
    validation-00000.tokens.npy ...

Packing (:class:`RowPacker`): every document becomes ``[BOS] + tokens (+ [EOS])``; documents are
concatenated in order and cut into consecutive, non-overlapping rows of ``row_len = seq_len + 1``
tokens (the remainder carries over into the next row, as in the paper's length-extrapolation
evaluation). A row's inputs are ``row[:-1]`` and its targets ``row[1:]``. ``segments`` numbers
the document fragments of each row ``1, 2, 3, ...`` (restarting every row), so the id changes
exactly where a document starts (at its BOS) and nowhere else; the last row is padded with
``pad_id`` and segment id ``0``.
"""

from __future__ import annotations

import bisect
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

MANIFEST = "manifest.json"
FORMAT = "dpjax.text_shards"
FORMAT_VERSION = 1


def token_dtype(vocab_size: int) -> np.dtype:
    """Smallest storage dtype for token ids: uint16 up to 65536 ids, else int32."""
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.int32)


def segment_dtype(row_len: int) -> np.dtype:
    """Storage dtype for per-row segment ids (at most ``row_len`` fragments per row)."""
    return np.dtype(np.uint16) if row_len < (1 << 16) else np.dtype(np.int32)


Row = tuple[np.ndarray, np.ndarray]  # (tokens int32[row_len], segment ids int32[row_len])


class RowPacker:
    """Concatenate documents and cut them into rows of ``row_len`` tokens.

    ``add(ids)`` takes one document's token ids (``int[n]``, no specials) and calls ``emit(tokens,
    segments)`` for every row it completes (arrays are reused: copy them if you keep them);
    ``finish()`` pads and emits the last partial row. Counters: ``documents``, ``tokens``
    (including BOS/EOS), ``rows``, ``padding``.
    """

    def __init__(
        self,
        row_len: int,
        bos_id: int,
        emit: Callable[[np.ndarray, np.ndarray], None],
        *,
        eos_id: int | None = None,
        pad_id: int = 0,
    ):
        if row_len < 2:
            raise ValueError(f"row_len must be >= 2 (seq_len >= 1), got {row_len}")
        self.row_len, self.bos_id, self.eos_id, self.pad_id = row_len, bos_id, eos_id, pad_id
        self._emit = emit
        self._tokens = np.zeros(row_len, np.int32)
        self._segments = np.zeros(row_len, np.int32)
        self._fill = 0
        self._segment = 0
        self.documents = self.tokens = self.rows = self.padding = 0

    def add(self, ids: np.ndarray) -> None:
        parts = [np.array([self.bos_id], np.int32), np.asarray(ids, np.int32).reshape(-1)]
        if self.eos_id is not None:
            parts.append(np.array([self.eos_id], np.int32))
        doc = np.concatenate(parts)
        self.documents += 1
        self.tokens += doc.size
        start, L = 0, self.row_len
        while start < doc.size:
            take = min(doc.size - start, L - self._fill)
            self._segment += 1
            self._tokens[self._fill : self._fill + take] = doc[start : start + take]
            self._segments[self._fill : self._fill + take] = self._segment
            self._fill += take
            start += take
            if self._fill == L:
                self._flush()

    def _flush(self) -> None:
        self._emit(self._tokens, self._segments)
        self.rows += 1
        self._fill = 0
        self._segment = 0

    def finish(self) -> None:
        """Pad the last partial row (``pad_id``, segment 0) and emit it."""
        if self._fill:
            self.padding += self.row_len - self._fill
            self._tokens[self._fill :] = self.pad_id
            self._segments[self._fill :] = 0
            self._flush()


class ShardWriter:
    """Collect rows and write them as ``{split}-{k:05d}.{tokens,segments}.npy`` in ``directory``,
    ``rows_per_shard`` rows per file. ``close()`` returns the shard list for the manifest."""

    def __init__(
        self,
        directory: Path,
        split: str,
        row_len: int,
        tok_dtype: np.dtype,
        rows_per_shard: int,
    ):
        self.directory, self.split, self.row_len = Path(directory), split, row_len
        self.rows_per_shard = max(1, int(rows_per_shard))
        self._tok = np.zeros((self.rows_per_shard, row_len), tok_dtype)
        self._seg = np.zeros((self.rows_per_shard, row_len), segment_dtype(row_len))
        self._n = 0
        self.shards: list[dict[str, Any]] = []

    def add_row(self, tokens: np.ndarray, segments: np.ndarray) -> None:
        self._tok[self._n] = tokens
        self._seg[self._n] = segments
        self._n += 1
        if self._n == self.rows_per_shard:
            self._write()

    def _write(self) -> None:
        if not self._n:
            return
        stem = f"{self.split}-{len(self.shards):05d}"
        names = {"tokens": f"{stem}.tokens.npy", "segments": f"{stem}.segments.npy"}
        np.save(self.directory / names["tokens"], self._tok[: self._n])
        np.save(self.directory / names["segments"], self._seg[: self._n])
        self.shards.append({**names, "rows": self._n})
        self._n = 0

    def close(self) -> list[dict[str, Any]]:
        self._write()
        return self.shards


# ----------------------------------------------------------------------------- manifest


def write_manifest(directory: Path, manifest: dict[str, Any]) -> None:
    """Write ``manifest.json`` atomically (temp file + rename)."""
    tmp = Path(directory) / f".{MANIFEST}.tmp"
    tmp.write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, Path(directory) / MANIFEST)


def read_manifest(directory: str | os.PathLike) -> dict[str, Any]:
    """Load and check ``DIR/manifest.json``; ``ValueError`` naming the path if absent/invalid."""
    path = Path(directory) / MANIFEST
    if not path.is_file():
        raise ValueError(
            f"no {MANIFEST} in {str(directory)!r}: not a prepared shard directory (run "
            "`python -m dpjax.data.text prepare --corpus ... --out DIR --seq_len N` first)"
        )
    try:
        manifest = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ValueError(f"cannot read shard manifest {str(path)!r}: {err}") from err
    if manifest.get("format") != FORMAT or manifest.get("format_version") != FORMAT_VERSION:
        raise ValueError(
            f"{str(path)!r} is not a {FORMAT} v{FORMAT_VERSION} manifest "
            f"(format={manifest.get('format')!r}, version={manifest.get('format_version')!r})"
        )
    return manifest


# ----------------------------------------------------------------------------- reading


class PackedRows:
    """Random-access view of one split's packed rows (a Grain ``RandomAccessDataSource``).

    ``len(src)`` is the number of rows; ``src[i]`` is ``{"tokens": int32[seq_len + 1],
    "segment_ids": int32[seq_len + 1]}``. Shards are memory-mapped lazily per process, so the
    object pickles cheaply into Grain worker processes.
    """

    def __init__(self, directory: str | os.PathLike, split: str = "train"):
        self.directory = Path(directory)
        self.split = split
        manifest = read_manifest(self.directory)
        splits = manifest["splits"]
        if split not in splits:
            raise ValueError(f"{str(directory)!r} has no split {split!r}; has {sorted(splits)}")
        self.row_len: int = manifest["row_len"]
        self._shards = splits[split]["shards"]
        self._ends = np.cumsum([s["rows"] for s in self._shards]).tolist()
        self._maps: dict[int, tuple[np.ndarray, np.ndarray]] = {}

    def __len__(self) -> int:
        return int(self._ends[-1]) if self._ends else 0

    def _shard(self, k: int) -> tuple[np.ndarray, np.ndarray]:
        if k not in self._maps:
            s = self._shards[k]
            tok = np.load(self.directory / s["tokens"], mmap_mode="r")
            seg = np.load(self.directory / s["segments"], mmap_mode="r")
            if tok.shape != (s["rows"], self.row_len) or seg.shape != tok.shape:
                raise ValueError(
                    f"shard {s['tokens']!r} in {str(self.directory)!r} has shape {tok.shape}/"
                    f"{seg.shape}, manifest says ({s['rows']}, {self.row_len}): re-run prepare"
                )
            self._maps[k] = (tok, seg)
        return self._maps[k]

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        n = len(self)
        i = int(index)
        if i < 0:
            i += n
        if not 0 <= i < n:
            raise IndexError(f"row {index} out of range for {n} rows")
        k = bisect.bisect_right(self._ends, i)
        offset = i - (self._ends[k - 1] if k else 0)
        tok, seg = self._shard(k)
        return {
            "tokens": np.asarray(tok[offset], np.int32),
            "segment_ids": np.asarray(seg[offset], np.int32),
        }

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_maps"] = {}
        return state

    def __repr__(self) -> str:
        return f"PackedRows({str(self.directory)!r}, split={self.split!r}, rows={len(self)})"
