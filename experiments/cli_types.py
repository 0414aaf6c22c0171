"""argparse value types shared by the experiment CLIs."""

from __future__ import annotations

import argparse


def str2bool(value: str | bool) -> bool:
    """argparse type for ``True/False`` (also ``1/0``, ``yes/no``, any case)."""
    if isinstance(value, bool):
        return value
    v = value.strip().lower()
    if v in ("true", "1", "yes", "y", "t"):
        return True
    if v in ("false", "0", "no", "n", "f"):
        return False
    raise argparse.ArgumentTypeError(f"expected True or False, got {value!r}")


def float_or_none(value: str) -> float | None:
    """argparse type: a float, or ``None``/``none``/``off`` to disable."""
    if value.strip().lower() in ("none", "off", ""):
        return None
    try:
        return float(value)
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"expected a number or None, got {value!r}") from err


def int_or_none(value: str) -> int | None:
    if value.strip().lower() in ("none", "off", ""):
        return None
    try:
        return int(value)
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"expected an integer or None, got {value!r}") from err


def str_or_none(value: str) -> str | None:
    """argparse type: a string, or ``None``/``none``/``off`` to disable."""
    return None if value.strip().lower() in ("none", "off", "") else value


def add_case_arguments(parser: argparse.ArgumentParser, example_field: str) -> None:
    """``--case``, ``--gated`` and ``--bwd-variant``: one op shape and the backward variant of a
    tool that looks at the op's kernels (experiments/ncu_kernels.py, offline_compile.py)."""
    parser.add_argument(
        "--case",
        default="4,4096,8,128,128,2",
        help="B,T,H,K,V,N_H of the op, bf16 (default: the issues' target at n_h = 2)",
    )
    parser.add_argument("--gated", action="store_true", help="with a log-space forget gate")
    parser.add_argument(
        "--bwd-variant",
        metavar="FIELD=VALUE[,FIELD=VALUE]",
        help=f"BackwardConfig fields changed from the default (e.g. {example_field})",
    )
