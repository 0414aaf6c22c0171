"""Local text corpora: find the files, read their documents, split them into train/validation.

A corpus is one of

- ``"stdlib"``: the Python standard library's own ``*.py`` sources on this machine
  (``sysconfig.get_paths()["stdlib"]``, test folders and ``site-packages`` left out) — a small code
  corpus in the spirit of the paper's CodeParrot evaluation, present wherever Python is;
- a directory, searched recursively (hidden folders and ``__pycache__`` skipped) for files whose
  names end with one of ``extensions``;
- a single such file.

What a document is depends on the file type:

- ``.txt``, ``.py``, ``.md`` (any other plain-text extension you pass): the whole file, UTF-8;
- ``.jsonl`` / ``.jsonl.gz``: one JSON object per line, the document is the string under
  ``jsonl_key`` (default ``"text"``); blank lines are skipped;
- ``.parquet``: one row per document, the string column ``parquet_column`` (needs ``pyarrow``).

Errors (all name the path):

- a missing path, a directory without matching files, an unsupported file type, a file that cannot
  be opened (permissions, dangling link), a malformed JSON line, a missing key/column, or a
  non-string value: ``ValueError``;
- ``.parquet`` without ``pyarrow`` installed: ``ImportError`` saying to ``pip install pyarrow``;
- a plain-text file that is not valid UTF-8 (or a ``.jsonl`` line that is not): **skipped and
  counted** by default (``on_decode_error="skip"``; :class:`ReadReport` lists them and a warning
  says how many), or a ``ValueError`` with ``on_decode_error="raise"``. Skipping is the default
  because web/code dumps routinely contain a few files in legacy encodings, and one of them
  should not stop a multi-hour preparation; the count is written into the shard manifest so
  nothing is lost silently.

The train/validation split is by file (deterministic; see :func:`split_files`). A corpus of one
file holding many records (one ``.jsonl``/``.parquet``) is split by record instead
(:func:`record_in_validation`).
"""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import json
import os
import sysconfig
import warnings
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Literal

STDLIB = "stdlib"
DEFAULT_EXTENSIONS: tuple[str, ...] = (".txt", ".py", ".md", ".jsonl", ".jsonl.gz", ".parquet")
_RECORD_SUFFIXES = (".jsonl", ".jsonl.gz", ".parquet")
_STDLIB_EXCLUDED_DIRS = frozenset(
    {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__"}
)
_SKIPPED_DIRS = frozenset({"__pycache__", "node_modules"})

OnDecodeError = Literal["skip", "raise"]


@dataclasses.dataclass(frozen=True)
class CorpusFile:
    """One file of a corpus: ``path`` on disk and ``relpath`` (POSIX, relative to the corpus root;
    the key used for splitting and fingerprints, so that a moved corpus keeps its split)."""

    path: Path
    relpath: str

    @property
    def holds_records(self) -> bool:
        """True for ``.jsonl``/``.jsonl.gz``/``.parquet`` (many documents per file)."""
        return self.relpath.endswith(_RECORD_SUFFIXES)


@dataclasses.dataclass
class ReadReport:
    """What reading skipped: ``skipped`` holds ``(relpath, reason)`` for every undecodable file
    (``relpath:line`` for an undecodable ``.jsonl`` line); ``empty_documents`` counts empty ones."""

    skipped: list[tuple[str, str]] = dataclasses.field(default_factory=list)
    empty_documents: int = 0

    def warn_if_skipped(self) -> None:
        """Emit one ``UserWarning`` counting the skipped files (if any)."""
        if self.skipped:
            names = ", ".join(r for r, _ in self.skipped[:5])
            more = "" if len(self.skipped) <= 5 else f", ... ({len(self.skipped) - 5} more)"
            warnings.warn(
                f"skipped {len(self.skipped)} file(s)/line(s) that are not valid UTF-8: "
                f"{names}{more}",
                stacklevel=2,
            )


def stdlib_root() -> Path:
    """The directory of this interpreter's standard library sources."""
    return Path(sysconfig.get_paths()["stdlib"])


def _corpus_error(path: object, what: str) -> ValueError:
    return ValueError(
        f"corpus {str(path)!r}: {what}; expected 'stdlib', a directory of "
        f"{'/'.join(DEFAULT_EXTENSIONS)} files (searched recursively), or one such file"
    )


def _matches(name: str, extensions: Sequence[str]) -> bool:
    return any(name.endswith(ext) for ext in extensions)


def list_corpus_files(
    corpus: str | os.PathLike,
    *,
    extensions: Sequence[str] = DEFAULT_EXTENSIONS,
    limit: int | None = None,
) -> tuple[Path, list[CorpusFile]]:
    """Find the files of ``corpus`` (``"stdlib"``, a directory or a file).

    Returns ``(root, files)`` with ``files`` sorted by ``relpath`` (deterministic across machines
    and file systems). ``limit`` keeps the first ``limit`` files of that order (quick runs, tests).
    Raises ``ValueError`` naming the path when it does not exist, holds no matching file, or is a
    file of an unsupported type.
    """
    if str(corpus) == STDLIB:
        root = stdlib_root()
        extensions = (".py",)
        excluded = _STDLIB_EXCLUDED_DIRS
        if not root.is_dir():
            raise _corpus_error(root, "the standard library directory was not found")
    else:
        root = Path(corpus).expanduser()
        excluded = _SKIPPED_DIRS
        if not os.path.lexists(root):
            raise _corpus_error(corpus, "path does not exist")
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be a positive number of files, got {limit}")
    exts = tuple(extensions)

    if root.is_file():
        if not _matches(root.name, exts):
            raise _corpus_error(corpus, f"unsupported file type (extensions read: {exts})")
        return root.parent, [CorpusFile(root, root.name)]
    if not root.is_dir():
        raise _corpus_error(corpus, "neither a regular file nor a directory")

    files: list[CorpusFile] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in excluded and not d.startswith(".")]
        for name in filenames:
            if _matches(name, exts) and not name.startswith("."):
                p = Path(dirpath) / name
                files.append(CorpusFile(p, p.relative_to(root).as_posix()))
    if not files:
        raise _corpus_error(corpus, f"no files ending with {exts} found (searched recursively)")
    files.sort(key=lambda f: f.relpath)
    return root, files[:limit] if limit is not None else files


def _open_error(f: CorpusFile, err: OSError) -> ValueError:
    return ValueError(f"cannot read corpus file {str(f.path)!r}: {err.strerror or err}")


def _read_bytes(f: CorpusFile) -> bytes:
    try:
        return f.path.read_bytes()
    except OSError as err:
        raise _open_error(f, err) from err


def _jsonl_documents(
    f: CorpusFile,
    key: str,
    on_decode_error: OnDecodeError,
    report: ReadReport,
    on_bytes: Callable[[int], None],
) -> Iterator[str]:
    """Stream a ``.jsonl``/``.jsonl.gz`` file line by line (constant memory)."""
    try:
        raw = open(f.path, "rb")  # noqa: SIM115 -- closed below, generator-scoped
    except OSError as err:
        raise _open_error(f, err) from err
    with raw:
        stream = gzip.GzipFile(fileobj=raw) if f.relpath.endswith(".gz") else raw
        done = 0
        try:
            for lineno, line_bytes in enumerate(stream, start=1):
                if raw.tell() - done >= 1 << 20:
                    on_bytes(raw.tell() - done)
                    done = raw.tell()
                try:
                    line = line_bytes.decode("utf-8")
                except UnicodeDecodeError as err:
                    where = f"line {lineno} is not valid UTF-8 (byte {err.start})"
                    if on_decode_error == "raise":
                        raise ValueError(
                            f"corpus file {str(f.path)!r}: {where}; expected UTF-8 JSON lines "
                            "(on_decode_error='skip' / --on_decode_error skip skips such lines)"
                        ) from err
                    report.skipped.append((f"{f.relpath}:{lineno}", where))
                    continue
                if line.strip():
                    yield _jsonl_text(f, lineno, line, key)
        except (OSError, EOFError) as err:  # truncated / not gzip
            raise ValueError(f"cannot read corpus file {str(f.path)!r}: {err}") from err
        on_bytes(raw.tell() - done)


def _jsonl_text(f: CorpusFile, lineno: int, line: str, key: str) -> str:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as err:
        raise ValueError(
            f"corpus file {str(f.path)!r} line {lineno}: not valid JSON ({err.msg}); "
            "expected one JSON object per line"
        ) from err
    if not isinstance(record, dict) or key not in record:
        keys = sorted(record) if isinstance(record, dict) else type(record).__name__
        raise ValueError(
            f"corpus file {str(f.path)!r} line {lineno}: expected a JSON object with a "
            f"{key!r} field (set jsonl_key / --jsonl_key); found {keys}"
        )
    value = record[key]
    if not isinstance(value, str):
        raise ValueError(
            f"corpus file {str(f.path)!r} line {lineno}: field {key!r} is "
            f"{type(value).__name__}, expected a string"
        )
    return value


def require_pyarrow(path: object) -> None:
    """Raise a clear ``ImportError`` if ``.parquet`` reading is impossible here."""
    try:
        import pyarrow.parquet  # noqa: F401
    except ImportError as err:
        raise ImportError(
            f"reading {str(path)!r} needs pyarrow, which is not installed: "
            "run `pip install pyarrow` (or convert the data to .jsonl)"
        ) from err


def _parquet_documents(f: CorpusFile, column: str) -> Iterator[str]:
    require_pyarrow(f.path)
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(f.path)
    except OSError as err:
        raise _open_error(f, err) from err
    except Exception as err:  # pyarrow raises ArrowInvalid for non-parquet bytes
        raise ValueError(
            f"corpus file {str(f.path)!r} is not a readable parquet file: {err}"
        ) from err
    names = pf.schema_arrow.names
    if column not in names:
        raise ValueError(
            f"corpus file {str(f.path)!r}: no column {column!r} (set parquet_column / "
            f"--parquet_column); columns are {names}"
        )
    for batch in pf.iter_batches(columns=[column], batch_size=1024):
        for value in batch.column(0).to_pylist():
            if value is None:
                continue
            if not isinstance(value, str):
                raise ValueError(
                    f"corpus file {str(f.path)!r}: column {column!r} holds "
                    f"{type(value).__name__}, expected strings"
                )
            yield value


def read_documents(
    f: CorpusFile,
    *,
    jsonl_key: str = "text",
    parquet_column: str = "text",
    on_decode_error: OnDecodeError = "skip",
    report: ReadReport | None = None,
    on_bytes: Callable[[int], None] | None = None,
) -> Iterator[str]:
    """Yield the documents (``str``) of one corpus file, in file order.

    See the module docstring for the file types and the error policy: a plain-text file that is
    not UTF-8 is skipped whole, a ``.jsonl`` line that is not UTF-8 is skipped alone (both
    recorded in ``report.skipped``) unless ``on_decode_error="raise"``. Empty documents are
    dropped and counted. ``on_bytes(n)`` is called as the file's bytes are consumed (progress).
    """
    if on_decode_error not in ("skip", "raise"):
        raise ValueError(f"on_decode_error must be 'skip' or 'raise', got {on_decode_error!r}")
    report = report if report is not None else ReadReport()
    on_bytes = on_bytes or (lambda n: None)
    if f.relpath.endswith(".parquet"):
        docs: Iterator[str] = _parquet_documents(f, parquet_column)
    elif f.relpath.endswith((".jsonl", ".jsonl.gz")):
        docs = _jsonl_documents(f, jsonl_key, on_decode_error, report, on_bytes)
    else:
        data = _read_bytes(f)
        on_bytes(len(data))
        try:
            docs = iter((data.decode("utf-8"),))
        except UnicodeDecodeError as err:
            reason = f"not valid UTF-8 at byte {err.start}"
            if on_decode_error == "raise":
                raise ValueError(
                    f"corpus file {str(f.path)!r} is {reason}; expected UTF-8 text "
                    "(on_decode_error='skip' / --on_decode_error skip skips such files)"
                ) from err
            report.skipped.append((f.relpath, reason))
            return
    for doc in docs:
        if doc:
            yield doc
        else:
            report.empty_documents += 1
    if f.relpath.endswith(".parquet"):
        on_bytes(f.path.stat().st_size)


# ----------------------------------------------------------------------------- split


def _unit_hash(seed: int, key: str) -> str:
    return hashlib.sha256(f"{seed}:{key}".encode()).hexdigest()


def split_files(
    files: Sequence[CorpusFile], val_fraction: float, seed: int
) -> tuple[list[CorpusFile], list[CorpusFile]]:
    """Split files into ``(train, validation)``, both sorted by ``relpath``.

    Files are ranked by ``sha256(f"{seed}:{relpath}")``; the first ``round(val_fraction * n)``
    (at least 1 and at most ``n - 1`` when ``0 < val_fraction < 1`` and ``n >= 2``) go to
    validation. Deterministic for a given seed, independent of file order, disjoint, and stable:
    adding one file to the corpus moves at most one other file between the splits.
    """
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    n = len(files)
    n_val = round(val_fraction * n)
    if val_fraction > 0 and n >= 2:
        n_val = min(max(n_val, 1), n - 1)
    ranked = sorted(files, key=lambda f: _unit_hash(seed, f.relpath))
    val = {f.relpath for f in ranked[:n_val]}
    train = sorted((f for f in files if f.relpath not in val), key=lambda f: f.relpath)
    validation = sorted((f for f in files if f.relpath in val), key=lambda f: f.relpath)
    return train, validation


def record_in_validation(relpath: str, index: int, val_fraction: float, seed: int) -> bool:
    """Record-level split for a one-file corpus: record ``index`` of ``relpath`` is in validation
    iff its hash falls below ``val_fraction`` (deterministic; the fraction holds on average)."""
    if val_fraction <= 0:
        return False
    h = int(_unit_hash(seed, f"{relpath}#{index}")[:16], 16)
    return h < val_fraction * 2**64


# ----------------------------------------------------------------------------- fingerprints


def stat_fingerprint(files: Sequence[CorpusFile]) -> str:
    """Cheap fingerprint of the file list: sha256 over ``(relpath, size, mtime_ns)``."""
    h = hashlib.sha256()
    for f in files:
        try:
            st = f.path.stat()
        except OSError as err:
            raise _open_error(f, err) from err
        h.update(f"{f.relpath}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def content_fingerprint(files: Sequence[CorpusFile]) -> str:
    """Fingerprint of the file contents: sha256 over ``(relpath, sha256(bytes))`` (reads every
    file; used to recognise a corpus that was copied or touched but not changed)."""
    h = hashlib.sha256()
    for f in files:
        h.update(f"{f.relpath}\0{file_sha256(f.path)}\n".encode())
    return h.hexdigest()


def file_sha256(path: Path) -> str:
    """sha256 of a file's bytes, read in 1 MiB blocks."""
    h = hashlib.sha256()
    try:
        with open(path, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
    except OSError as err:
        raise ValueError(f"cannot read {str(path)!r}: {err.strerror or err}") from err
    return h.hexdigest()
