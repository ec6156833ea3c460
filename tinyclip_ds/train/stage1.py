"""Stage 1: distil one tower (image or text) alone, on unpaired data.

The student tower and the objective's learned projections form what DeepSpeed trains; the
frozen teacher tower runs outside it under no_grad. Evaluation pairs the student tower with
the teacher's other tower.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.utils.data import Dataset

from tinyclip_ds.data.config import DataConfig
from tinyclip_ds.data.datasets import ImageDataset, TextDataset
from tinyclip_ds.data.mixture import training_mixture
from tinyclip_ds.data.order import mix_seed
from tinyclip_ds.distill.config import TERMS, LossConfig
from tinyclip_ds.distill.objectives import Stage1Objective
from tinyclip_ds.models.config import StudentConfig
from tinyclip_ds.models.students import build_students
from tinyclip_ds.models.teachers import Teacher
from tinyclip_ds.models.transformer import TowerOutput
from tinyclip_ds.recipe import Recipe
from tinyclip_ds.stages import STAGES
from tinyclip_ds.train.engine import engine_step
from tinyclip_ds.train.resume import InitSource
from tinyclip_ds.train.task import Encoder, Log, StepResult, image_train_transform


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
    """Stage 1 for one tower (``kind``): the teacher's tower outputs are the targets."""

    def __init__(self, kind: str, student: StudentConfig, loss: LossConfig, data: DataConfig, seed: int,
                 teacher: Teacher, device: torch.device, rank: int, log: Log):
        self.kind, self.data, self.seed = kind, data, seed
        self.teacher, self.device, self.rank, self.log = teacher, device, rank, log
        built = build_students(student, teacher.clip, (kind,), seed)[kind]
        self.students = {kind: built}
        self.objective = Stage1Objective(loss, kind, built.teacher.shape, built.tower.shape,
                                         built.layer_pairs, built.key)
        self.module = Stage1Student(built.tower, self.objective)
        self.teacher_forward = teacher.image if kind == "image" else teacher.text
        # a term that compares the samples of a micro-batch with each other needs two of them
        self.smallest_batch = 2 if any(TERMS[name].in_batch for name in self.objective.terms) else 1

    @classmethod
    def for_recipe(cls, recipe: Recipe, teacher: Teacher, device: torch.device, rank: int, log: Log,
                   init_from: dict[str, InitSource]) -> Stage1Task:
        """The stage's one tower, from the recipe (stage 1 starts from ``student.<kind>.init``)."""
        kind, = STAGES[recipe.stage].towers
        return cls(kind, recipe.student, recipe.loss, recipe.data, recipe.seed, teacher, device, rank, log)

    def dataset(self) -> Dataset:
        """The recipe's images (with the training augmentation) or captions (tokenized)."""
        if self.kind == "text":
            dataset = TextDataset(training_mixture("captions", self.data), self.teacher.tokenizer)
        else:
            transform = image_train_transform(self.data, self.teacher)
            dataset = ImageDataset(training_mixture("images", self.data), transform)
        self.log(f"training data: {dataset.source.summary()}")
        return dataset

    def usable(self, micro_batches: list[dict]) -> bool:
        """Every micro-batch holds enough samples: each is a forward of its own."""
        return all(len(batch["index"]) >= self.smallest_batch for batch in micro_batches)

    def step(self, engine, micro_batches: list[dict]) -> StepResult:
        """Each micro-batch: teacher targets, student loss, backward; the boundary steps."""
        result = StepResult()
        total = torch.zeros((), device=self.device)
        sums: dict[str, Tensor] = {}
        for batch in micro_batches:
            inputs = batch[self.kind]
            if self.kind == "text":
                inputs = self.teacher.clip.text.trim_padding(inputs)  # nothing the terms read changes
            inputs = inputs.to(self.device)
            teacher_out = self.teacher_forward(inputs, self.objective.teacher_request)
            seed = mix_seed(self.seed, "vit_kd", batch["position"], self.rank)
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
