"""Stage 2: both student towers trained jointly on paired data, contrastive + distillation,
with contrastive-correct large batches (see `tinyclip_ds.train.contrastive`)."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn
from torch.utils.data import Dataset

from tinyclip_ds import distributed
from tinyclip_ds.data.config import DataConfig
from tinyclip_ds.data.datasets import PairDataset
from tinyclip_ds.data.mixture import training_mixture
from tinyclip_ds.data.order import mix_seed
from tinyclip_ds.distill.config import LossConfig, active_terms
from tinyclip_ds.distill.objectives import Stage1Objective, Stage2Objective
from tinyclip_ds.models.config import StudentConfig
from tinyclip_ds.models.students import build_students
from tinyclip_ds.models.teachers import Teacher
from tinyclip_ds.models.transformer import Request, TextTower
from tinyclip_ds.recipe import Recipe
from tinyclip_ds.train.contrastive import Features, contrastive_step
from tinyclip_ds.train.resume import InitSource, load_tower
from tinyclip_ds.train.task import Encoder, Log, StepResult, image_train_transform


class LogitScale(nn.Module):
    """CLIP's learnable temperature: a log-scale parameter, clamped to [1, max] when used.

    A module of its own so that ZeRO-3 gathers the parameter whenever it is used; shape (1,)
    because DeepSpeed cannot broadcast 0-dim parameters."""

    def __init__(self, initial: float, maximum: float):
        super().__init__()
        self.log_scale = nn.Parameter(torch.tensor([math.log(initial)]))
        self.log_max = math.log(maximum)

    def forward(self) -> Tensor:
        return self.log_scale.clamp(0.0, self.log_max).exp().float()[0]


class Stage2Student(nn.Module):
    """What DeepSpeed trains in stage 2: both student towers, the logit scale, and the learned
    parts of any stage-1 terms kept on (one `Stage1Objective` per tower)."""

    def __init__(self, image: nn.Module, text: nn.Module, logit_scale: LogitScale,
                 stage1: dict[str, Stage1Objective], tokens: bool):
        super().__init__()
        self.image = image
        self.text = text
        self.logit_scale = logit_scale
        self.stage1 = nn.ModuleDict(stage1)
        self.tokens = tokens

    def forward(self, images: Tensor, ids: Tensor, teacher_outs: dict | None = None,
                mask_seed: int = 0) -> tuple[Features, Tensor, Tensor, dict[str, Tensor]]:
        """Student features, the logit scale, and the stage-1 terms' local loss (0 when no
        ``teacher_outs`` are given, e.g. in the feature-cache pass)."""
        ids = self.text.fit_context(ids)
        stage1 = self.stage1 if teacher_outs is not None else {}
        outs = {}
        for kind, tower, inputs in (("image", self.image, images), ("text", self.text, ids)):
            request = Request(tokens=self.tokens)
            if kind in stage1:
                request = request.merge(self.stage1[kind].student_request)
            outs[kind] = tower(inputs, request)
        features = Features(outs["image"].embedding, outs["text"].embedding, outs["image"].tokens,
                            outs["text"].tokens, outs["text"].token_mask if self.tokens else None)
        local = features.image.new_zeros(()).float()
        terms: dict[str, Tensor] = {}
        for kind, objective in stage1.items():
            loss, values = objective(outs[kind], teacher_outs[kind], mask_seed)
            local = local + loss
            terms.update({f"{kind}_{name}": value for name, value in values.items()})
        return features, self.logit_scale(), local, terms


def step_text_length(ids: list[Tensor], teacher_text: TextTower, objective: Stage2Objective,
                     device: torch.device) -> int | None:
    """Collective when a token-wise term is on: the length the token ids of every micro-batch of
    the step, on every rank, are cut to — after the step's longest text over all of them
    (``ids``: this rank's, on the CPU), since those terms gather token features over micro-batches
    and ranks, which takes one length. None when no such term is on: each micro-batch is then cut
    after its own longest text."""
    if not objective.student_tokens:
        return None
    longest = max((teacher_text.trim_padding(batch).shape[1] for batch in ids if batch.numel()), default=1)
    return distributed.max_over_ranks(longest, device)


def tower_ids(ids: Tensor, teacher_text: TextTower, length: int | None) -> Tensor:
    """A micro-batch's token ids (on the CPU) as both text towers get them: cut after ``length``
    tokens (`step_text_length`) or, for None, after its own longest text
    (`TextTower.trim_padding`). Either way nothing a term reads changes: the towers are causal
    and every text ends within the cut."""
    return teacher_text.trim_padding(ids) if length is None else ids[:, :length]


class Stage2Task:
    """Stage 2: both student towers, their logit scale and any stage-1 terms kept on, trained on
    pairs with the recipe's stage-2 terms over the whole gathered batch."""

    def __init__(self, student: StudentConfig, loss: LossConfig, data: DataConfig, freeze: str, seed: int,
                 teacher: Teacher, device: torch.device, rank: int, log: Log,
                 init_from: dict[str, InitSource]):
        self.data, self.seed = data, seed
        self.teacher, self.device, self.rank, self.log = teacher, device, rank, log
        students = self.students = build_students(student, teacher.clip, ("image", "text"), seed)
        for kind, built in students.items():
            if kind in init_from:
                load_tower(built.tower, init_from[kind], log)
            else:
                init = getattr(student, kind).init
                log(f"{kind} tower: '{init}' initialisation from the teacher" if init == "inherit"
                    else f"{kind} tower: random initialisation")
        if freeze != "none":
            students[freeze].tower.requires_grad_(False)

        self.objective = Stage2Objective(loss)
        stage1 = {}
        if active_terms(loss, "stage1"):
            stage1 = {kind: Stage1Objective(loss, kind, s.teacher.shape, s.tower.shape, s.layer_pairs, s.key)
                      for kind, s in students.items()}
        self.module = Stage2Student(students["image"].tower, students["text"].tower,
                                    LogitScale(loss.logit_scale_init, loss.logit_scale_max),
                                    stage1, self.objective.student_tokens)

    @classmethod
    def for_recipe(cls, recipe: Recipe, teacher: Teacher, device: torch.device, rank: int, log: Log,
                   init_from: dict[str, InitSource]) -> Stage2Task:
        """Both towers, from the recipe; ``init_from``: the stage-1 checkpoints they start from."""
        return cls(recipe.student, recipe.loss, recipe.data, recipe.train.freeze, recipe.seed, teacher, device,
                   rank, log, init_from)

    def dataset(self) -> Dataset:
        """The recipe's image–caption pairs, with the training augmentation, tokenized."""
        dataset = PairDataset(training_mixture("pairs", self.data), image_train_transform(self.data, self.teacher),
                              self.teacher.tokenizer)
        self.log(f"training data: {dataset.source.summary()}")
        return dataset

    def usable(self, micro_batches: list[dict]) -> bool:
        """The rank holds a usable sample: its share of the loss is a mean over its rows."""
        return sum(len(batch["index"]) for batch in micro_batches) > 0

    def step(self, engine, micro_batches: list[dict]) -> StepResult:
        """One contrastive step over all micro-batches of all ranks (`contrastive_step`)."""
        length = step_text_length([batch["text"] for batch in micro_batches if "image" in batch],
                                  self.teacher.clip.text, self.objective, self.device)
        inputs = [self.inputs(batch, length) for batch in micro_batches]
        seeds = [mix_seed(self.seed, "vit_kd", batch["position"], self.rank)
                 for batch in micro_batches]
        teacher = [self.teacher_features(images, ids) for images, ids in inputs]

        def forward(m: int, cache: bool):
            images, ids = inputs[m]
            if cache:  # features only: no teacher outputs, no per-sample terms
                return engine.module(images, ids)
            return engine(images, ids, self.teacher_intermediates(images, ids), seeds[m])

        return contrastive_step(engine, forward, self.objective, teacher, self.device)

    def encoders(self, model: Stage2Student) -> tuple[Encoder | None, Encoder | None]:
        """Both student towers."""
        return (lambda images: model.image(images).embedding,
                lambda ids: model.text(model.text.fit_context(ids)).embedding)

    def inputs(self, batch: dict, length: int | None) -> tuple[Tensor, Tensor]:
        """A micro-batch's images and token ids (cut as `tower_ids` says) on the device (empty
        when none was usable)."""
        device = self.device
        if "image" not in batch:  # every image of the micro-batch was unreadable
            size = self.teacher.image_size
            return (torch.zeros(0, 3, size, size, device=device),
                    torch.zeros(0, length or 1, dtype=torch.long, device=device))
        ids = tower_ids(batch["text"], self.teacher.clip.text, length)
        return batch["image"].to(device), ids.to(device)

    def teacher_features(self, images: Tensor, ids: Tensor) -> Features | None:
        """The teacher's features for the batch-coupled terms (None when no term needs them)."""
        if not self.objective.needs_teacher:
            return None
        tokens = self.objective.teacher_tokens
        teacher = self.teacher
        image = teacher.image(images, Request(tokens=tokens))
        text = teacher.text(ids, Request(tokens=tokens))
        return Features(image.embedding, text.embedding, image.tokens, text.tokens,
                        text.token_mask if tokens else None)

    def teacher_intermediates(self, images: Tensor, ids: Tensor) -> dict | None:
        """The teacher's tower outputs for the stage-1 terms kept on (None when there are none)."""
        stage1 = self.module.stage1
        if not stage1:
            return None
        teacher = self.teacher
        forward = {"image": (teacher.image, images), "text": (teacher.text, ids)}
        return {kind: forward[kind][0](forward[kind][1], objective.teacher_request)
                for kind, objective in stage1.items()}
