"""Progress bar (tqdm: rate and ETA) and metric sinks (JSONL, TensorBoard via tensorboardX).

Example::

    log = MetricsLogger(out_dir)                 # out_dir/metrics.jsonl + out_dir/tb/
    log.write(step, {"train/loss": 0.3, "lr": 1e-3})
    bar = Progress(total=1000, initial=0)
    bar.update(1, {"loss": 0.3}); bar.close(); log.close()
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Mapping

import numpy as np

__all__ = ["MetricsLogger", "Progress", "scalars"]


def scalars(metrics: Mapping[str, object]) -> dict[str, float]:
    """Keep the scalar entries of ``metrics`` as Python floats (arrays of size 1 included)."""
    out = {}
    for k, v in metrics.items():
        a = np.asarray(v)
        if a.size == 1 and np.issubdtype(a.dtype, np.number):
            out[k] = float(a.reshape(()))
    return out


class MetricsLogger:
    """Append scalar metrics to ``<out_dir>/metrics.jsonl`` and TensorBoard (``<out_dir>/tb``).

    TensorBoard is optional: without ``tensorboardX`` only the JSONL file is written. Only
    process 0 writes (pass ``enabled=False`` elsewhere).
    """

    def __init__(
        self,
        out_dir: str | os.PathLike | None,
        *,
        tensorboard: bool = True,
        enabled: bool = True,
        filename: str = "metrics.jsonl",
    ):
        self.enabled = enabled and out_dir is not None
        self._file = None
        self._tb = None
        if not self.enabled:
            return
        os.makedirs(out_dir, exist_ok=True)
        self.path = os.path.join(out_dir, filename)
        self._file = open(self.path, "a")  # noqa: SIM115 (closed in close())
        if tensorboard:
            try:
                from tensorboardX import SummaryWriter
            except ImportError:  # pragma: no cover - optional dependency
                SummaryWriter = None
            if SummaryWriter is not None:
                self._tb = SummaryWriter(os.path.join(out_dir, "tb"))

    def write(self, step: int, metrics: Mapping[str, object]) -> None:
        """Log the scalar entries of ``metrics`` at ``step``."""
        if not self.enabled:
            return
        vals = scalars(metrics)
        record = {"step": int(step), "time": time.time()}
        record.update({k: (v if math.isfinite(v) else str(v)) for k, v in vals.items()})
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        if self._tb is not None:
            for k, v in vals.items():
                self._tb.add_scalar(k, v, int(step))

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None


class Progress:
    """A tqdm bar over training steps showing rate, ETA and a few metrics."""

    def __init__(self, total: int, initial: int = 0, *, enabled: bool = True, desc: str = "train"):
        self._bar = None
        if enabled:
            from tqdm.auto import tqdm

            self._bar = tqdm(
                total=total,
                initial=initial,
                desc=desc,
                unit="step",
                dynamic_ncols=True,
                smoothing=0.1,
            )

    def update(self, n: int = 1, metrics: Mapping[str, object] | None = None) -> None:
        if self._bar is None:
            return
        if metrics:
            self._bar.set_postfix(
                {k: f"{v:.4g}" for k, v in scalars(metrics).items()}, refresh=False
            )
        self._bar.update(n)

    def write(self, message: str) -> None:
        """Print a line without breaking the bar."""
        if self._bar is None:
            print(message, flush=True)
        else:
            self._bar.write(message)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
