"""The table of training stages: each stage declared once, read by recipe validation, path
checks, the training loop, checkpoints and the launchers.

A row says what a stage trains and on what: the student towers, the `DataConfig` list it reads,
the loss-term stages a recipe of it may switch on, whether its towers start from stage-1
checkpoints (``student.<kind>.init_from``), where its engine module keeps each tower
(the parameter-name prefix checkpoints are read by), its launcher and its task. Adding a stage =
one task file in ``train/`` (a class of the `train.task.Task` shape), one row in `STAGES`, one
launcher in ``launch/`` and one demo recipe in ``recipes/demo/``; ``tests/test_stages.py`` fails
while any of them is missing.

This module imports neither torch nor any other layer: recipes are validated without torch, so
the task is named by its import path and imported only when the stage runs (`train.loop`).
"""

from __future__ import annotations

from dataclasses import dataclass
from types import MappingProxyType
from typing import Mapping


@dataclass(frozen=True)
class Stage:
    """One training stage; ``name`` is the recipe's ``stage`` value."""

    name: str
    help: str  # one line for ``tinyclip-ds recipe`` and errors
    towers: tuple[str, ...]  # the student towers it trains: "image", "text"
    data: str  # the `DataConfig` list of training sources it reads: images, captions or pairs
    term_stages: tuple[str, ...]  # the `distill.config.Term` stages a recipe of it may switch on
    reads_init_from: bool  # its towers start from stage-1 checkpoints named by student.<kind>.init_from
    # Where its engine module keeps each student tower: tower kind → parameter-name prefix.
    checkpoint_prefixes: Mapping[str, str]
    task: str  # "module:Class" of its `train.task.Task`, imported when the stage runs
    launcher: str  # its launcher, relative to the project root

    def __post_init__(self):
        object.__setattr__(self, "checkpoint_prefixes", MappingProxyType(dict(self.checkpoint_prefixes)))


STAGES: dict[str, Stage] = {stage.name: stage for stage in (
    Stage("stage1_image", "the image tower alone, on images", towers=("image",), data="images",
          term_stages=("stage1",), reads_init_from=False, checkpoint_prefixes={"image": "tower."},
          task="tinyclip_ds.train.stage1:Stage1Task", launcher="launch/stage1_image.sh"),
    Stage("stage1_text", "the text tower alone, on captions", towers=("text",), data="captions",
          term_stages=("stage1",), reads_init_from=False, checkpoint_prefixes={"text": "tower."},
          task="tinyclip_ds.train.stage1:Stage1Task", launcher="launch/stage1_text.sh"),
    Stage("stage2", "both towers jointly, on image-caption pairs", towers=("image", "text"), data="pairs",
          term_stages=("stage1", "stage2"), reads_init_from=True,
          checkpoint_prefixes={"image": "image.", "text": "text."},
          task="tinyclip_ds.train.stage2:Stage2Task", launcher="launch/stage2.sh"),
)}
"""Every training stage, in the order the method runs them."""
