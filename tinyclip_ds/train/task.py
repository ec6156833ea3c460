"""What a stage is to the `Trainer`: a task that builds what it trains and does one step.

A new stage is one new file with a class of this shape, registered in `train.loop.TASKS`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Protocol

from torch import Tensor, nn
from torch.utils.data import Dataset

from tinyclip_ds.train.engine import OptimizerStep

Encoder = Callable[[Tensor], Tensor]  # a batch of images or token ids → embeddings


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

    def dataset(self) -> Dataset:
        """The training samples (built after a resume was accepted)."""

    def usable(self, micro_batches: list[dict]) -> bool:
        """Whether this rank's micro-batches of one step hold enough usable samples to train on."""

    def step(self, engine, micro_batches: list[dict]) -> StepResult:
        """Forward, backward and optimizer step over the micro-batches of one optimizer step."""

    def encoders(self, model: nn.Module) -> tuple[Encoder | None, Encoder | None]:
        """The student's (image, text) encoders for evaluation; None where the teacher's is used."""
