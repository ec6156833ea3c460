"""DeepSpeed checkpoints with client state, completion markers and retention."""

from __future__ import annotations

from dataclasses import dataclass

from tinyclip_ds.config import option


@dataclass
class CheckpointConfig:
    every: int = option(1000, "save a checkpoint every this many optimizer steps (and at the end); 0 = end only")
    keep_last: int = option(3, "complete checkpoints to keep (older ones are deleted); 0 = keep all")
