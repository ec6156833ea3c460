"""What a stage is to the `Trainer`: a task that builds what it trains and does one step.

A new stage is one new file with a class of this shape plus one row in `tinyclip_ds.stages.STAGES`
(its towers, data list, checkpoint prefixes, launcher, and this class as its ``task``).
A task takes what it uses as explicit inputs, so it can be built and tested without a run;
`for_recipe` is how the training loop builds it.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Callable, Protocol

import torch
from torch import Tensor, nn
from torch.utils.data import Dataset

from tinyclip_ds.data.config import DataConfig
from tinyclip_ds.data.transforms import train_transform
from tinyclip_ds.models.students import Student
from tinyclip_ds.models.teachers import Teacher
from tinyclip_ds.recipe import Recipe
from tinyclip_ds.stages import Stage
from tinyclip_ds.train.engine import OptimizerStep
from tinyclip_ds.train.resume import InitSource

Encoder = Callable[[Tensor], Tensor]  # a batch of images or token ids → embeddings
Log = Callable[[str], None]  # a console line (rank 0 prints, the others ignore it)


@dataclass
class StepResult:
    """What one optimizer step reports: per-rank values, averaged over ranks when logged."""

    applied: bool = True  # False: the gradients were not finite and nothing changed
    loss: float = 0.0
    terms: dict[str, float] = field(default_factory=dict)
    samples: int = 0  # samples this rank trained on in the step
    grad_norm: float | None = None  # measured by `engine_step` where DeepSpeed does not report it

    def finish(self, boundary: OptimizerStep | None) -> None:
        """Take what the optimizer step at the accumulation boundary did."""
        if boundary is not None:
            self.applied = boundary.applied
            self.grad_norm = boundary.grad_norm


class Task(Protocol):
    """A training stage. The `Trainer` owns everything around the step (data order, resume,
    logging, evaluation, checkpoints, pre-emption); the task owns what is trained and how."""

    module: nn.Module  # what DeepSpeed trains (built with the task)
    students: dict[str, Student]  # the student towers it trains, by kind (for the summary)

    @classmethod
    def for_recipe(cls, recipe: Recipe, teacher: Teacher, device: torch.device, rank: int, log: Log,
                   init_from: dict[str, InitSource]) -> Task:
        """The task of ``recipe``'s stage; ``init_from`` names the checkpoints towers start from."""

    def dataset(self) -> Dataset:
        """The training samples (built after a resume was accepted)."""

    def usable(self, micro_batches: list[dict]) -> bool:
        """Whether this rank's micro-batches of one step hold enough usable samples to train on."""

    def step(self, engine, micro_batches: list[dict]) -> StepResult:
        """Forward, backward and optimizer step over the micro-batches of one optimizer step."""

    def encoders(self, model: nn.Module) -> tuple[Encoder | None, Encoder | None]:
        """The student's (image, text) encoders for evaluation; None where the teacher's is used."""


def task_class(stage: Stage) -> type[Task]:
    """The task class a row of the stage table names (imported now: tasks need torch, the table
    does not)."""
    module, _, name = stage.task.partition(":")
    return getattr(importlib.import_module(module), name)


def image_train_transform(data: DataConfig, teacher: Teacher):
    """The recipe's training augmentation with the teacher's image size and normalisation."""
    return train_transform(teacher.image_size, teacher.image_mean, teacher.image_std, data.randaugment,
                           data.randaugment_ops, data.randaugment_magnitude)
