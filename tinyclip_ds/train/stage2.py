"""Stage 2: both student towers trained jointly on paired data, contrastive + distillation,
with contrastive-correct large batches (see `tinyclip_ds.train.contrastive`)."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn
from torch.utils.data import Dataset

from tinyclip_ds import distributed
from tinyclip_ds.config import RecipeError
from tinyclip_ds.data.datasets import PairDataset
from tinyclip_ds.data.mixture import training_mixture
from tinyclip_ds.data.order import mix_seed
from tinyclip_ds.distill.objectives import Stage1Objective, Stage2Objective, active_terms
from tinyclip_ds.models.students import describe_differences, build_students, shape_differences
from tinyclip_ds.models.transformer import Request
from tinyclip_ds.summary import summarize
from tinyclip_ds.train import checkpoint
from tinyclip_ds.train.contrastive import Features, contrastive_step
from tinyclip_ds.train.task import Encoder, StepResult

if TYPE_CHECKING:
    from tinyclip_ds.train.run import Run


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


def tower_ids(ids: Tensor, teacher_text: nn.Module, objective: Stage2Objective) -> Tensor:
    """A micro-batch's token ids (on the CPU) as both text towers get them: without the padding
    after its longest text (`TextTower.trim_padding`), unless a token-wise term is on — those
    gather token features over micro-batches and ranks, which takes one length everywhere."""
    if objective.teacher_tokens or objective.student_tokens:
        return ids
    return teacher_text.trim_padding(ids)


def initialise_from_stage1(tower: nn.Module, kind: str, cfg, monitor) -> None:
    """Load a tower from a stage-1 run directory or checkpoint (``student.<kind>.init_from``)."""
    key = f"student.{kind}.init_from"
    path = checkpoint.find_checkpoint(cfg.init_from)
    if path is None:
        if cfg.init_from_missing == "init":
            monitor.print(f"{kind} tower: no complete stage-1 checkpoint at {cfg.init_from}; "
                          f"starting from '{cfg.init}' initialisation instead")
            return
        raise RecipeError(f"'{key}' = {cfg.init_from}: no complete checkpoint there; run stage 1 "
                          f"first, or set {key}='' to start from student.{kind}.init")
    saved = checkpoint.saved_record(path)
    if saved["stage"] not in (None, f"stage1_{kind}"):
        raise RecipeError(f"'{key}' = {cfg.init_from}: {path} was saved by a {saved['stage']} run; it takes "
                          f"a stage1_{kind} run (or set {key}='' to start from student.{kind}.init)")
    if saved["towers"]:
        # Head count and activation change no parameter shape: only the record can tell them.
        if differences := shape_differences(kind, saved["towers"][kind], tower.shape):
            was, now = describe_differences(differences)
            raise RecipeError(f"'{key}': the stage-1 checkpoint {path} was saved with {was}; this recipe "
                              f"has {now}: give student.{kind} the stage-1 run's shape (its recipe: "
                              f"{checkpoint.recipe_of(path)}) or change {key}")
    else:
        monitor.print(f"{kind} tower: {path} records no student shape (saved by an older version); only "
                      f"parameter shapes are checked: head count and activation assumed to be this recipe's "
                      f"(student.{kind}.heads={tower.shape.heads}, act={tower.shape.act})")
    state = checkpoint.consolidated_state_dict(path)
    weights = {name[len("tower."):]: value for name, value in state.items() if name.startswith("tower.")}
    try:
        tower.load_state_dict(weights, strict=True)
    except RuntimeError as err:  # missing, unexpected or other-shaped parameters
        problems = " ".join(line.strip() for line in str(err).splitlines()[1:])
        raise RecipeError(f"'{key}': {path} does not hold a student.{kind} tower of this recipe's shape "
                          f"({problems[:600]}); was it a stage1_{kind} run with the same student.{kind}?") from None
    monitor.print(f"{kind} tower: loaded from stage-1 checkpoint {path}")


class Stage2Task:
    """Stage 2: both student towers, their logit scale and any stage-1 terms kept on, trained on
    pairs with the recipe's stage-2 terms over the whole gathered batch."""

    def __init__(self, run: Run):
        recipe, monitor, teacher = run.recipe, run.monitor, run.teacher
        self.run = run
        students = build_students(recipe.student, teacher.clip, ("image", "text"), recipe.seed)
        for kind, student in students.items():
            tower_cfg = getattr(recipe.student, kind)
            if tower_cfg.init_from:
                initialise_from_stage1(student.tower, kind, tower_cfg, monitor)
            else:
                monitor.print(f"{kind} tower: '{tower_cfg.init}' initialisation from the teacher"
                              if tower_cfg.init == "inherit" else f"{kind} tower: random initialisation")
        if recipe.train.freeze != "none":
            students[recipe.train.freeze].tower.requires_grad_(False)
        monitor.print(summarize(recipe, teacher.clip, students))

        self.objective = Stage2Objective(recipe.loss)
        stage1 = {}
        if active_terms(recipe.loss, "stage1"):
            stage1 = {kind: Stage1Objective(recipe.loss, kind, s.teacher.shape, s.tower.shape, s.layer_pairs, s.key)
                      for kind, s in students.items()}
        self.module = Stage2Student(students["image"].tower, students["text"].tower,
                                    LogitScale(recipe.loss.logit_scale_init, recipe.loss.logit_scale_max),
                                    stage1, self.objective.student_tokens)

    def dataset(self) -> Dataset:
        """The recipe's image–caption pairs, with the training augmentation, tokenized."""
        run, data = self.run, self.run.recipe.data
        dataset = PairDataset(training_mixture("pairs", data), run.image_train_transform(), run.teacher.tokenizer)
        run.monitor.print(f"training data: {dataset.source.summary()}")
        return dataset

    def usable(self, micro_batches: list[dict]) -> bool:
        """The rank holds a usable sample: its share of the loss is a mean over its rows."""
        return sum(len(batch["index"]) for batch in micro_batches) > 0

    def step(self, engine, micro_batches: list[dict]) -> StepResult:
        """One contrastive step over all micro-batches of all ranks (`contrastive_step`)."""
        run = self.run
        inputs = [self.inputs(batch) for batch in micro_batches]
        seeds = [mix_seed(run.recipe.seed, "vit_kd", batch["position"], distributed.rank())
                 for batch in micro_batches]
        teacher = [self.teacher_features(images, ids) for images, ids in inputs]

        def forward(m: int, cache: bool):
            images, ids = inputs[m]
            if cache:  # features only: no teacher outputs, no per-sample terms
                return engine.module(images, ids)
            return engine(images, ids, self.teacher_intermediates(images, ids), seeds[m])

        return contrastive_step(engine, forward, self.objective, teacher, run.device)

    def encoders(self, model: Stage2Student) -> tuple[Encoder | None, Encoder | None]:
        """Both student towers."""
        return (lambda images: model.image(images).embedding,
                lambda ids: model.text(model.text.fit_context(ids)).embedding)

    def inputs(self, batch: dict) -> tuple[Tensor, Tensor]:
        """A micro-batch's images and token ids on the device (empty when none was usable)."""
        device = self.run.device
        if "image" not in batch:  # every image of the micro-batch was unreadable
            size = self.run.teacher.image_size
            return (torch.zeros(0, 3, size, size, device=device),
                    torch.zeros(0, 1, dtype=torch.long, device=device))
        ids = tower_ids(batch["text"], self.run.teacher.clip.text, self.objective)
        return batch["image"].to(device), ids.to(device)

    def teacher_features(self, images: Tensor, ids: Tensor) -> Features | None:
        """The teacher's features for the batch-coupled terms (None when no term needs them)."""
        if not self.objective.needs_teacher:
            return None
        tokens = self.objective.teacher_tokens
        teacher = self.run.teacher
        image = teacher.image(images, Request(tokens=tokens))
        text = teacher.text(ids, Request(tokens=tokens))
        return Features(image.embedding, text.embedding, image.tokens, text.tokens,
                        text.token_mask if tokens else None)

    def teacher_intermediates(self, images: Tensor, ids: Tensor) -> dict | None:
        """The teacher's tower outputs for the stage-1 terms kept on (None when there are none)."""
        stage1 = self.module.stage1
        if not stage1:
            return None
        teacher = self.run.teacher
        forward = {"image": (teacher.image, images), "text": (teacher.text, ids)}
        return {kind: forward[kind][0](forward[kind][1], objective.teacher_request)
                for kind, objective in stage1.items()}
