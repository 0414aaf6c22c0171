"""Tokenizers for the text pipeline: a dependency-free byte tokenizer (default) and HuggingFace
``tokenizers`` JSON files (optional dependency, imported lazily).

Both implement :class:`TextTokenizer`: ``encode(str) -> int32[n]`` *without* special tokens (the
packer adds ``bos_id`` per document), ``decode(ids) -> str`` (special tokens dropped by default),
``vocab_size``, ``bos_id``/``eos_id``/``pad_id`` and ``spec()`` (a JSON-able description whose
hash identifies the tokenizer in shard manifests).

Byte tokenizer vocabulary (``vocab_size = 259``): ids ``0..255`` are the UTF-8 bytes, ``256`` is
BOS, ``257`` EOS, ``258`` PAD. Round trip is exact for every string.

Train a byte-level BPE tokenizer on a corpus (needs ``pip install tokenizers``)::

    python -m dpjax.data.tokenizer train --corpus DIR|stdlib --vocab_size 8192 --out tok.json

It is trained on the *train* split only (same ``--val_fraction``/``--seed`` as ``prepare``), so
validation text never shapes the vocabulary; its specials are ``<pad>`` (0), ``<bos>`` (1) and
``<eos>`` (2).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np

BYTES = "bytes"
# Candidate spellings of the special tokens in third-party tokenizer files, in priority order.
_BOS_CANDIDATES = ("<bos>", "<s>", "<|begin_of_text|>", "<|bos|>", "[BOS]", "<|endoftext|>")
_EOS_CANDIDATES = ("<eos>", "</s>", "<|end_of_text|>", "<|eos|>", "[EOS]", "<|endoftext|>")
_PAD_CANDIDATES = ("<pad>", "[PAD]", "<|pad|>")
BPE_SPECIAL_TOKENS = ("<pad>", "<bos>", "<eos>")


@runtime_checkable
class TextTokenizer(Protocol):
    """What the packer, the pipeline and generation need from a tokenizer."""

    vocab_size: int
    bos_id: int
    eos_id: int
    pad_id: int

    def encode(self, text: str) -> np.ndarray:
        """``str`` -> ``int32[n]`` token ids, no special tokens added."""
        ...

    def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]:
        """Several documents at once (faster for HF tokenizers); same result as ``encode``."""
        ...

    def decode(self, ids: Iterable[int] | np.ndarray, skip_special: bool = True) -> str:
        """Token ids -> text."""
        ...

    def spec(self) -> dict[str, Any]:
        """JSON-able description (kind, vocab size, special ids, file hash)."""
        ...


def _as_ids(ids: Iterable[int] | np.ndarray) -> np.ndarray:
    """Any id container (list, generator, numpy or jax array) -> flat int64 numpy array."""
    if not hasattr(ids, "__len__") and not hasattr(ids, "__array__"):
        ids = list(ids)
    return np.asarray(ids, dtype=np.int64).reshape(-1)


class ByteTokenizer:
    """UTF-8 bytes as tokens: ids 0..255, BOS 256, EOS 257, PAD 258 (``vocab_size`` 259)."""

    vocab_size = 259
    bos_id = 256
    eos_id = 257
    pad_id = 258

    def encode(self, text: str) -> np.ndarray:
        return np.frombuffer(text.encode("utf-8"), np.uint8).astype(np.int32)

    def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]:
        return [self.encode(t) for t in texts]

    def decode(self, ids: Iterable[int] | np.ndarray, skip_special: bool = True) -> str:
        arr = _as_ids(ids)
        if not skip_special:
            names = {self.bos_id: "<bos>", self.eos_id: "<eos>", self.pad_id: "<pad>"}
            parts, run = [], []
            for i in arr.tolist():
                if i in names:
                    parts.append(bytes(run).decode("utf-8", errors="replace") + names[i])
                    run = []
                else:
                    run.append(i)
            return "".join(parts) + bytes(run).decode("utf-8", errors="replace")
        keep = arr[(arr >= 0) & (arr < 256)].astype(np.uint8)
        return keep.tobytes().decode("utf-8", errors="replace")

    def spec(self) -> dict[str, Any]:
        return {
            "kind": BYTES,
            "vocab_size": self.vocab_size,
            "bos_id": self.bos_id,
            "eos_id": self.eos_id,
            "pad_id": self.pad_id,
        }


def _import_tokenizers():
    try:
        import tokenizers
    except ImportError as err:
        raise ImportError(
            "HuggingFace tokenizer files need the `tokenizers` package: "
            "run `pip install tokenizers` (or use the byte tokenizer: --tokenizer bytes)"
        ) from err
    return tokenizers


def _find_special(tok, given: str | None, candidates: Sequence[str], what: str, path) -> int:
    names = (given,) if given is not None else candidates
    for name in names:
        idx = tok.token_to_id(name)
        if idx is not None:
            return int(idx)
    raise ValueError(
        f"tokenizer {str(path)!r}: no {what} token among {list(names)}; "
        f"pass {what.lower()}_token=... naming one of its special tokens"
    )


class HFTokenizer:
    """A HuggingFace ``tokenizers`` JSON file. Specials are looked up by name (``bos_token`` etc.
    or common spellings: ``<bos>``/``<s>``/...); a missing PAD falls back to EOS. Encoding never
    adds the file's own post-processor specials (the packer adds BOS itself)."""

    def __init__(
        self,
        path: str | os.PathLike,
        *,
        bos_token: str | None = None,
        eos_token: str | None = None,
        pad_token: str | None = None,
    ):
        self.path = Path(path).expanduser().resolve()
        if not self.path.is_file():
            raise ValueError(
                f"tokenizer {str(path)!r} not found; expected 'bytes' or a HuggingFace "
                "tokenizers .json file"
            )
        tokenizers = _import_tokenizers()
        try:
            self._tok = tokenizers.Tokenizer.from_file(str(self.path))
        except Exception as err:  # tokenizers raises its own Exception type
            raise ValueError(
                f"tokenizer {str(path)!r} is not a HuggingFace tokenizers JSON file: {err}"
            ) from err
        self.vocab_size = int(self._tok.get_vocab_size(with_added_tokens=True))
        self.bos_id = _find_special(self._tok, bos_token, _BOS_CANDIDATES, "BOS", path)
        self.eos_id = _find_special(self._tok, eos_token, _EOS_CANDIDATES, "EOS", path)
        try:
            self.pad_id = _find_special(self._tok, pad_token, _PAD_CANDIDATES, "PAD", path)
        except ValueError:
            if pad_token is not None:
                raise
            self.pad_id = self.eos_id
        self._special = {self.bos_id, self.eos_id, self.pad_id}
        self._sha256 = hashlib.sha256(self.path.read_bytes()).hexdigest()

    def encode(self, text: str) -> np.ndarray:
        return np.asarray(self._tok.encode(text, add_special_tokens=False).ids, np.int32)

    def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]:
        encs = self._tok.encode_batch(list(texts), add_special_tokens=False)
        return [np.asarray(e.ids, np.int32) for e in encs]

    def decode(self, ids: Iterable[int] | np.ndarray, skip_special: bool = True) -> str:
        seq = _as_ids(ids).tolist()
        if skip_special:
            seq = [i for i in seq if i not in self._special]
        return self._tok.decode(seq, skip_special_tokens=False)

    def spec(self) -> dict[str, Any]:
        return {
            "kind": "huggingface",
            "path": str(self.path),
            "sha256": self._sha256,
            "vocab_size": self.vocab_size,
            "bos_id": self.bos_id,
            "eos_id": self.eos_id,
            "pad_id": self.pad_id,
        }


def load_tokenizer(name_or_path: str | os.PathLike = BYTES, **special_tokens) -> TextTokenizer:
    """``"bytes"`` -> :class:`ByteTokenizer`; a path -> :class:`HFTokenizer` (``special_tokens``:
    ``bos_token=``, ``eos_token=``, ``pad_token=`` overrides)."""
    if str(name_or_path) == BYTES:
        return ByteTokenizer()
    return HFTokenizer(name_or_path, **special_tokens)


def tokenizer_fingerprint(tok: TextTokenizer) -> str:
    """sha256 of the tokenizer's ``spec()`` without its path (a moved file keeps its identity)."""
    spec = {k: v for k, v in tok.spec().items() if k != "path"}
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()


# ----------------------------------------------------------------------------- BPE training


def train_bpe(
    documents: Iterable[str],
    vocab_size: int,
    out: str | os.PathLike,
    *,
    min_frequency: int = 2,
    num_documents: int | None = None,
    show_progress: bool = True,
) -> HFTokenizer:
    """Train a byte-level BPE tokenizer (GPT-2 style: lossless for any text) on ``documents`` and
    save it as a HuggingFace JSON file at ``out``. Specials: ``<pad>`` 0, ``<bos>`` 1, ``<eos>`` 2.
    ``vocab_size`` must exceed 256 + 3 (the byte alphabet and the specials)."""
    tokenizers = _import_tokenizers()
    from tokenizers import decoders, models, pre_tokenizers, trainers

    minimum = 256 + len(BPE_SPECIAL_TOKENS)
    if vocab_size <= minimum:
        raise ValueError(f"vocab_size must be > {minimum} (bytes + specials), got {vocab_size}")
    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=list(BPE_SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=show_progress,
    )
    tok.train_from_iterator(iter(documents), trainer=trainer, length=num_documents)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tok.save(str(out))
    return HFTokenizer(out)


def _train_documents(args: argparse.Namespace) -> tuple[Iterator[str], int]:
    """The documents of the train split, exactly as ``prepare`` would split them."""
    from dpjax.data.text_corpus import (
        ReadReport,
        list_corpus_files,
        read_documents,
        record_in_validation,
        split_files,
    )

    _, files = list_corpus_files(args.corpus, limit=args.limit_files)
    by_record = len(files) == 1 and files[0].holds_records
    if len(files) >= 2:
        files, _ = split_files(files, args.val_fraction, args.seed)
    report = ReadReport()

    def docs() -> Iterator[str]:
        for f in files:
            for i, doc in enumerate(read_documents(f, jsonl_key=args.jsonl_key, report=report)):
                if not (
                    by_record and record_in_validation(f.relpath, i, args.val_fraction, args.seed)
                ):
                    yield doc
        report.warn_if_skipped()

    return docs(), len(files)


def main(argv: Sequence[str] | None = None) -> int:
    """CLI: ``python -m dpjax.data.tokenizer train ...`` (see ``--help``)."""
    parser = argparse.ArgumentParser(
        prog="python -m dpjax.data.tokenizer", description="Tokenizer utilities."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    t = sub.add_parser(
        "train",
        help="train a byte-level BPE tokenizer on a local corpus (needs `tokenizers`)",
        description="Train a byte-level BPE tokenizer on the train split of a local corpus and "
        "save it as a HuggingFace tokenizers JSON file (specials <pad>=0, <bos>=1, <eos>=2).",
    )
    t.add_argument(
        "--corpus",
        required=True,
        help="'stdlib' (Python's own sources), a directory (recursive .txt/.py/.md/.jsonl/"
        ".parquet) or one such file",
    )
    t.add_argument("--vocab_size", type=int, required=True, help="vocabulary size (> 259)")
    t.add_argument("--out", required=True, help="output tokenizer JSON path, e.g. tok.json")
    t.add_argument(
        "--val_fraction",
        type=float,
        default=0.01,
        help="fraction of files held out (not trained on); use the same value for `prepare`",
    )
    t.add_argument("--seed", type=int, default=2357, help="split seed (same as `prepare`)")
    t.add_argument("--jsonl_key", default="text", help="text field of .jsonl records")
    t.add_argument("--min_frequency", type=int, default=2, help="min pair count to merge")
    t.add_argument(
        "--limit_files", type=int, default=None, help="use only the first N files (quick runs)"
    )
    args = parser.parse_args(argv)
    docs, n_files = _train_documents(args)
    tok = train_bpe(docs, args.vocab_size, args.out, min_frequency=args.min_frequency)
    print(
        f"trained BPE on {n_files} file(s): vocab_size={tok.vocab_size} "
        f"bos={tok.bos_id} eos={tok.eos_id} pad={tok.pad_id} -> {args.out}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
