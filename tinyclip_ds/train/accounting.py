"""What training could not use, and which samples it used: counted over all ranks."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import torch

from tinyclip_ds import distributed
from tinyclip_ds.config import RecipeError


class UnusableData(RecipeError):
    """Too many steps in a row without enough usable samples (see `DataSkips`)."""


class DataSkips:
    """Counts the samples collate skipped, over all ranks, in total and per reason (into the
    `TrainState`), and the steps in a row whose micro-batches had too few usable samples;
    after ``limit`` of those in a row it raises `UnusableData` naming their sources."""

    def __init__(self, state, limit: int, device: torch.device):
        self.state = state
        self.limit = limit
        self.device = device
        self.streak_reasons: Counter[str] = Counter()  # skips since the last usable step, per reason
        self.streak_sources: Counter[str] = Counter()  # ... and per source

    def check(self, batches: list[dict], usable: bool) -> bool:
        """Collective: count the skips of this rank's ``batches``; True when ``usable`` holds on
        every rank (the batches are trained on), False when all ranks drop them."""
        state = self.state
        usable, skipped = distributed.all_true_and_sum(usable, sum(b["skipped"] for b in batches), self.device)
        reasons, sources = Counter(), Counter()
        if skipped:  # rare: only then a second collective, for the per-reason and per-source counts
            for batch in batches:
                reasons.update(batch.get("skip_reasons", {}))
                sources.update(batch.get("skip_sources", {}))
            reasons, sources = distributed.sum_counters(reasons, sources)
            state.skipped_samples += skipped
            for reason, count in reasons.items():
                state.skipped_by_reason[reason] = state.skipped_by_reason.get(reason, 0) + count
        if usable:
            state.unusable_in_a_row = 0
            self.streak_reasons.clear()
            self.streak_sources.clear()
            return True
        state.unusable_in_a_row += 1
        self.streak_reasons.update(reasons)
        self.streak_sources.update(sources)
        if state.unusable_in_a_row >= self.limit:
            problem = f"{state.unusable_in_a_row} steps in a row had too few usable samples " \
                      f"(train.max_unusable = {self.limit})"
            if not self.streak_reasons:
                raise UnusableData(f"{problem}, although no sample was skipped; raise train.micro_batch")
            raise UnusableData(
                f"{problem}; their {sum(self.streak_reasons.values())} skipped samples came from "
                f"{counted(self.streak_sources) or 'unnamed sources'} ({counted(self.streak_reasons)}): fix "
                f"or remove those files, or drop the source from the recipe")
        return False


def counted(counts: dict[str, int]) -> str:
    """``"b 3, a 1, c 1"``: counts largest first, ties by name."""
    return ", ".join(f"{name} {count}" for name, count in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))


class SampleLog:
    """Opt-in record (``train.log_samples``) of which samples every optimizer step used.

    Every training batch passes through `track`; after each try at a step `flush` gathers the
    indices drawn on every rank, and rank 0 appends ``{"step", "samples"}`` to
    ``<run_dir>/samples.jsonl`` in the sampler's global order (micro-step m of rank r is slice
    m·world + r), so runs on different numbers of ranks can be compared line by line. A try that
    was not applied (too few usable samples, non-finite gradients) is written too, before the
    step's applied line, as ``{"step", "applied": false, "reason", "samples"}``."""

    def __init__(self, path: Path, enabled: bool):
        self.path = path
        self.enabled = enabled
        self.pending: list[list[int]] = []  # this rank's micro-batches of the current try

    def track(self, batch: dict) -> None:
        """Remember the batch's sample indices when enabled."""
        if self.enabled:
            self.pending.append(batch["index"].tolist())

    def flush(self, step: int, skipped: str = "") -> None:
        """Collective: write the samples of the try at ``step`` (every rank must call it);
        ``skipped``: why the try was not applied ('' = it was)."""
        if not self.enabled:
            return
        gathered = distributed.gather_objects(self.pending)
        self.pending = []
        if distributed.rank() == 0:
            samples = [index for micro in zip(*gathered) for rank_batch in micro for index in rank_batch]
            record = {"step": step, "applied": False, "reason": skipped} if skipped else {"step": step}
            with open(self.path, "a") as f:
                f.write(json.dumps({**record, "samples": samples}) + "\n")
