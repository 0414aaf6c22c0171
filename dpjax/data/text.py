"""Text data for language modelling: the public entry points and the ``prepare`` CLI.

Pipeline (each step its own module)::

    text_corpus   find files ('stdlib' | dir | file), read documents, split train/validation
    tokenizer     ByteTokenizer (default, vocab 259) or a HuggingFace tokenizers JSON file
    text_prepare  tokenise (BOS per document), pack into seq_len+1 rows, write .npy shards
    shards        RowPacker, ShardWriter, PackedRows (random access), manifest.json
    text_pipeline Grain MapDataset -> batches {input_ids, labels, segment_ids, positions,
                  loss_mask} [B, T] int32, checkpointable iterator

Typical use::

    from dpjax.data import text
    m = text.prepare_text_shards("stdlib", "data/stdlib-bytes-512", seq_len=512)
    it = text.text_iterator("data/stdlib-bytes-512", "train", batch_size=8, seed=0)
    batch = next(it); state = it.get_state()            # checkpoint with the model
    tok = text.tokenizer_from_shards("data/stdlib-bytes-512")  # vocab_size, decode()

CLI::

    python -m dpjax.data.text prepare --corpus stdlib --out data/stdlib-bytes-512 --seq_len 512
    python -m dpjax.data.text inspect data/stdlib-bytes-512
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from dpjax.data.shards import PackedRows, read_manifest
from dpjax.data.text_corpus import STDLIB, list_corpus_files, read_documents, split_files
from dpjax.data.text_pipeline import row_to_example, text_dataset, text_iterator
from dpjax.data.text_prepare import (
    DEFAULT_SEED,
    DEFAULT_SHARD_TOKENS,
    DEFAULT_VAL_FRACTION,
    prepare_text_shards,
)
from dpjax.data.tokenizer import (
    ByteTokenizer,
    HFTokenizer,
    TextTokenizer,
    load_tokenizer,
)

__all__ = [
    "STDLIB",
    "ByteTokenizer",
    "HFTokenizer",
    "PackedRows",
    "TextTokenizer",
    "list_corpus_files",
    "load_tokenizer",
    "prepare_text_shards",
    "read_documents",
    "read_manifest",
    "row_to_example",
    "split_files",
    "text_dataset",
    "text_iterator",
    "tokenizer_from_shards",
]


def tokenizer_from_shards(shard_dir: str | os.PathLike) -> TextTokenizer:
    """The tokenizer a shard directory was prepared with (bytes, or its copied
    ``tokenizer.json``), for ``vocab_size`` and ``decode`` at training/generation time."""
    manifest = read_manifest(shard_dir)
    spec = manifest["tokenizer"]
    if spec["kind"] == "bytes":
        return ByteTokenizer()
    tok = HFTokenizer(Path(shard_dir) / spec["file"])
    for key in ("bos_id", "eos_id", "pad_id"):
        setattr(tok, key, spec[key])
    return tok


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m dpjax.data.text",
        description="Prepare and inspect packed token shards for language-model training.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser(
        "prepare",
        help="tokenise a local corpus into packed train/validation shards",
        description="Tokenise a local corpus (BOS per document), pack it into rows of "
        "seq_len+1 tokens with per-token segment ids, split train/validation by file, and "
        "write .npy shards + manifest.json. Re-running with the same configuration reuses them.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument(
        "--corpus",
        required=True,
        help="'stdlib' (this Python's standard-library sources, tests excluded), a directory "
        "searched recursively for .txt/.py/.md/.jsonl/.jsonl.gz/.parquet files, or one such file",
    )
    p.add_argument("--out", required=True, help="output shard directory (created)")
    p.add_argument(
        "--seq_len", type=int, required=True, help="model sequence length T (rows hold T+1)"
    )
    p.add_argument(
        "--tokenizer",
        default="bytes",
        help="'bytes' (UTF-8 bytes + BOS/EOS/PAD, vocab 259) or a HuggingFace tokenizers "
        ".json path (train one: python -m dpjax.data.tokenizer train)",
    )
    p.add_argument(
        "--val_fraction",
        type=float,
        default=DEFAULT_VAL_FRACTION,
        help="fraction of files for validation (of records, for a one-file .jsonl/.parquet)",
    )
    p.add_argument("--seed", type=int, default=DEFAULT_SEED, help="train/validation split seed")
    p.add_argument("--jsonl_key", default="text", help="text field of .jsonl records")
    p.add_argument("--parquet_column", default="text", help="text column of .parquet files")
    p.add_argument(
        "--limit_files",
        type=int,
        default=None,
        help="only the first N files in path order (quick runs)",
    )
    p.add_argument(
        "--add_eos", action="store_true", help="also append EOS to every document (BOS always)"
    )
    p.add_argument(
        "--on_decode_error",
        choices=("skip", "raise"),
        default="skip",
        help="non-UTF-8 files (jsonl: lines): skip and count them, or stop with an error",
    )
    p.add_argument(
        "--shard_tokens",
        type=int,
        default=DEFAULT_SHARD_TOKENS,
        help="approximate tokens per .npy shard file",
    )
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace shards of a different configuration in --out",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bar or summary")

    i = sub.add_parser(
        "inspect",
        help="summarise a shard directory and decode a row",
        description="Print a shard directory's manifest summary and decode one row.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    i.add_argument("shard_dir", help="directory written by `prepare`")
    i.add_argument("--split", default="train", help="split to show a row of")
    i.add_argument("--row", type=int, default=0, help="row index to decode")
    i.add_argument("--chars", type=int, default=400, help="characters of the row to print")
    return parser


def _inspect(args: argparse.Namespace) -> None:
    m = read_manifest(args.shard_dir)
    summary = {
        "seq_len": m["seq_len"],
        "tokenizer": m["tokenizer"],
        "corpus": {k: v for k, v in m["corpus"].items() if k != "skipped"},
        "skipped_files": len(m["corpus"]["skipped"]),
        "splits": {
            s: {k: v for k, v in d.items() if k not in ("files", "shards")}
            | {"files": len(d["files"])}
            for s, d in m["splits"].items()
        },
    }
    print(json.dumps(summary, indent=2))
    rows = PackedRows(args.shard_dir, args.split)
    if len(rows):
        row = rows[args.row]
        tok = tokenizer_from_shards(args.shard_dir)
        text = tok.decode(row["tokens"], skip_special=False)
        print(f"--- {args.split} row {args.row}: {int(row['segment_ids'].max())} segment(s)")
        print(text[: args.chars])


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point; see ``python -m dpjax.data.text --help``."""
    parser = _build_parser()
    args = parser.parse_args(argv)
    try:
        if args.command == "inspect":
            _inspect(args)
        else:
            _prepare(args)
    except (ValueError, ImportError) as err:
        parser.exit(2, f"error: {err}\n")
    return 0


def _prepare(args: argparse.Namespace) -> None:
    prepare_text_shards(
        args.corpus,
        args.out,
        args.seq_len,
        tokenizer=args.tokenizer,
        val_fraction=args.val_fraction,
        seed=args.seed,
        jsonl_key=args.jsonl_key,
        parquet_column=args.parquet_column,
        limit_files=args.limit_files,
        add_eos=args.add_eos,
        on_decode_error=args.on_decode_error,
        shard_tokens=args.shard_tokens,
        overwrite=args.overwrite,
        progress=not args.quiet,
    )


if __name__ == "__main__":
    sys.exit(main())
