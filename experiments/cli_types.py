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
