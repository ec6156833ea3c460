"""The RNG states of a process as plain data: saved with every checkpoint (one file per rank)
and replayed by the feature-cache pass of large-batch steps."""

from __future__ import annotations

import random

import numpy as np
import torch


def rng_state() -> dict:
    """This process's RNG states as tensors and plain data, so that they load weights-only."""
    kind, keys, *rest = np.random.get_state()
    return {"python": random.getstate(), "numpy": (kind, keys.tolist(), *rest),
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def set_rng_state(state: dict) -> None:
    """Restore the RNG states `rng_state` returned."""
    random.setstate(state["python"])
    kind, keys, *rest = state["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), *rest))
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
