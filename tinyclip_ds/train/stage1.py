"""Stage 1: distil one tower (image or text) alone, on unpaired data.

The student tower and the objective's learned projections form what DeepSpeed trains; the
frozen teacher tower runs outside it under no_grad. Evaluation pairs the student tower with
the teacher's other tower.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn
from torch.utils.data import Dataset

from tinyclip_ds import distributed
from tinyclip_ds.data.datasets import ImageDataset, TextDataset
from tinyclip_ds.data.mixture import training_mixture
from tinyclip_ds.data.order import mix_seed
from tinyclip_ds.distill.objectives import Stage1Objective
from tinyclip_ds.distill.terms import TERMS
from tinyclip_ds.models.students import build_students
from tinyclip_ds.models.transformer import TowerOutput
from tinyclip_ds.summary import summarize
from tinyclip_ds.train.engine import engine_step
from tinyclip_ds.train.task import Encoder, StepResult

if TYPE_CHECKING:
    from tinyclip_ds.train.run import Run


class Stage1Student(nn.Module):
    """What DeepSpeed trains in stage 1: one student tower plus the objective's learned parts."""

    def __init__(self, tower: nn.Module, objective: Stage1Objective):
        super().__init__()
        self.tower = tower
        self.objective = objective

    def forward(self, inputs: Tensor, teacher_out: TowerOutput, mask_seed: int) -> tuple[Tensor, dict]:
        """The stage-1 loss of a batch and its terms (unweighted)."""
        student_out = self.tower(self._fit(inputs), self.objective.student_request)
        return self.objective(student_out, teacher_out, mask_seed)

    def encode(self, inputs: Tensor) -> Tensor:
        """The student tower's embedding (evaluation)."""
        return self.tower(self._fit(inputs)).embedding

    def _fit(self, inputs: Tensor) -> Tensor:
        # Token ids come at the teacher's context length; a student text tower may be shorter.
        return self.tower.fit_context(inputs) if self.objective.kind == "text" else inputs


class Stage1Task:
    """Stage 1 for the recipe's one tower: the teacher's tower outputs are the targets."""

    def __init__(self, run: Run):
        recipe = run.recipe
        self.run = run
        self.kind = recipe.towers[0]
        student = build_students(recipe.student, run.teacher.clip, (self.kind,), recipe.seed)[self.kind]
        run.monitor.print(summarize(recipe, run.teacher.clip, {self.kind: student}))
        self.objective = Stage1Objective(recipe.loss, self.kind, student.teacher.shape, student.tower.shape,
                                         student.layer_pairs, student.key)
        self.module = Stage1Student(student.tower, self.objective)
        self.teacher_forward = run.teacher.image if self.kind == "image" else run.teacher.text
        # a term that compares the samples of a micro-batch with each other needs two of them
        self.smallest_batch = 2 if any(TERMS[name].in_batch for name in self.objective.terms) else 1

    def dataset(self) -> Dataset:
        """The recipe's images (with the training augmentation) or captions (tokenized)."""
        run, data = self.run, self.run.recipe.data
        if self.kind == "text":
            dataset = TextDataset(training_mixture("captions", data), run.teacher.tokenizer)
        else:
            dataset = ImageDataset(training_mixture("images", data), run.image_train_transform())
        run.monitor.print(f"training data: {dataset.source.summary()}")
        return dataset

    def usable(self, micro_batches: list[dict]) -> bool:
        """Every micro-batch holds enough samples: each is a forward of its own."""
        return all(len(batch["index"]) >= self.smallest_batch for batch in micro_batches)

    def step(self, engine, micro_batches: list[dict]) -> StepResult:
        """Each micro-batch: teacher targets, student loss, backward; the boundary steps."""
        run = self.run
        result = StepResult()
        total = torch.zeros((), device=run.device)
        sums: dict[str, Tensor] = {}
        for batch in micro_batches:
            inputs = batch[self.kind]
            if self.kind == "text":
                inputs = run.teacher.clip.text.trim_padding(inputs)  # nothing the terms read changes
            inputs = inputs.to(run.device)
            teacher_out = self.teacher_forward(inputs, self.objective.teacher_request)
            seed = mix_seed(run.recipe.seed, "vit_kd", batch["position"], distributed.rank())
            loss, terms = engine(inputs, teacher_out, seed)
            engine.backward(loss)
            result.finish(engine_step(engine))
            total = total + loss.detach() / len(micro_batches)
            for name, value in terms.items():
                sums[name] = sums.get(name, 0.0) + value.detach() / len(micro_batches)
            result.samples += len(inputs)
        result.loss = total.item()
        result.terms = {name: value.item() for name, value in sums.items()}
        return result

    def encoders(self, model: Stage1Student) -> tuple[Encoder | None, Encoder | None]:
        """The student tower for its side; the teacher's for the other."""
        return (model.encode, None) if self.kind == "image" else (None, model.encode)
