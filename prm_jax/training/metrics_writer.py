"""Metrics to `WORKDIR/metrics.jsonl` and TensorBoard event files; only process 0 writes."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from prm_jax import jsonl
from prm_jax.files import atomic_write_lines, naming_path


class MetricsWriter:
    def __init__(self, workdir: str | Path, *, enabled: bool = True, resume_step: int | None = None):
        self.enabled = enabled
        self.jsonl_path = Path(workdir) / "metrics.jsonl"
        self._tb = None
        if not enabled:
            return
        self.jsonl_path.parent.mkdir(parents=True, exist_ok=True)
        self._drop_lines_after(resume_step)
        from tensorboardX import SummaryWriter

        self._tb = SummaryWriter(str(Path(workdir) / "tensorboard"))

    def _drop_lines_after(self, step: int | None) -> None:
        """On resume, forget metrics of steps the run is about to redo (no duplicate lines)."""
        if not self.jsonl_path.exists():
            return
        keep = []
        for line in self.jsonl_path.read_text().splitlines():
            try:
                record = jsonl.loads(line)  # bounded: a 5,000-digit number is a bad line, not a crash
            except json.JSONDecodeError:
                continue  # a line cut by a kill
            if not isinstance(record, dict):
                continue  # not a metrics line
            if step is not None and record.get("step", 0) <= step:
                keep.append(line)
        atomic_write_lines(self.jsonl_path, keep)

    def write(self, step: int, metrics: Mapping[str, Any]) -> None:
        if not self.enabled:
            return
        clean = {k: _plain(v) for k, v in metrics.items()}
        with naming_path(self.jsonl_path), self.jsonl_path.open("a") as f:  # a full disk names the file
            f.write(json.dumps({"step": step, **clean}, allow_nan=True) + "\n")
        for key, value in clean.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
                self._tb.add_scalar(key, value, step)

    def flush(self) -> None:
        if self._tb is not None:
            self._tb.flush()

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
            self._tb = None


def _plain(value: Any) -> Any:
    if hasattr(value, "item"):
        value = value.item()
    return value
