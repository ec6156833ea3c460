"""Monitoring: console lines, TensorBoard scalars and images, and ``metrics.jsonl``.

Only rank 0 writes; other ranks get a Monitor that does nothing, so call sites need no checks.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import torch


class Monitor:
    def __init__(self, run_dir: Path, enabled: bool):
        self.enabled = enabled
        self.run_dir = Path(run_dir)
        self._writer = None

    @property
    def writer(self):
        """The TensorBoard writer (rank 0 only), created at the first value logged, so that a run
        refused at start leaves no event file behind."""
        if self.enabled and self._writer is None:
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(str(self.run_dir / "tensorboard"))
        return self._writer

    def print(self, message: str) -> None:
        if self.enabled:
            print(message, flush=True)

    def scalars(self, step: int, values: dict[str, float]) -> None:
        """Training scalars (loss terms, lr, grad norm, throughput, skip counters)."""
        if self.writer is None:
            return
        for name, value in values.items():
            self.writer.add_scalar(name, value, step)
        self.writer.flush()

    def metrics(self, step: int, values: dict[str, float]) -> None:
        """Evaluation results: one JSON object per evaluation in metrics.jsonl, and TensorBoard."""
        if not self.enabled:
            return
        record = {"step": step, **{k: float(v) for k, v in values.items()}}
        with open(self.run_dir / "metrics.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")
        self.scalars(step, values)

    def heatmap(self, tag: str, step: int, matrix: torch.Tensor) -> None:
        """A similarity matrix as a colour image (blue = low, red = high), e.g. student vs teacher logits."""
        if self.writer is None:
            return
        self.writer.add_image(tag, similarity_image(matrix), step, dataformats="HWC")
        self.writer.flush()

    def image(self, tag: str, step: int, picture) -> None:
        """A PIL image (e.g. a retrieval grid) as it is."""
        if self.writer is None:
            return
        self.writer.add_image(tag, np.asarray(picture.convert("RGB")), step, dataformats="HWC")
        self.writer.flush()

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()


def significant(value: float, digits: int = 3) -> str:
    """``value`` to at least ``digits`` significant digits, never in exponent notation: a slow
    run's 0.0123 samples/s must not print as 0, nor a fast one's 12346 as 1.23e+04."""
    if value == 0 or not math.isfinite(value):
        return f"{value:.0f}"
    decimals = max(0, digits - 1 - math.floor(math.log10(abs(value))))
    return f"{value:.{decimals}f}"


def similarity_image(matrix: torch.Tensor, cell: int = 4) -> np.ndarray:
    """Render a 2-D matrix as an RGB uint8 image with a diverging blue-white-red colour map."""
    values = matrix.detach().float().cpu().numpy()
    low, high = float(values.min()), float(values.max())
    scaled = (values - low) / (high - low) if high > low else np.zeros_like(values)
    # Blue (0) → white (0.5) → red (1): simple piecewise-linear channels.
    red = np.clip(2 * scaled, 0, 1)
    blue = np.clip(2 - 2 * scaled, 0, 1)
    green = np.minimum(red, blue)
    image = (np.stack([red, green, blue], axis=-1) * 255).astype(np.uint8)
    return image.repeat(cell, axis=0).repeat(cell, axis=1)
