"""Stage 2: both student towers trained jointly on paired data, contrastive + distillation,
with contrastive-correct large batches (see `tinyclip_ds.train.contrastive`)."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from tinyclip_ds.config import RecipeError
from tinyclip_ds.data.datasets import PairDataset
from tinyclip_ds.data.sampler import mix_seed
from tinyclip_ds.data.sources import pair_source
from tinyclip_ds.distill import layer_map
from tinyclip_ds.distill.objectives import STAGE1_TERMS, Stage1Objective, Stage2Objective, active_terms
from tinyclip_ds.models.students import build_students, describe_differences, shape_differences
from tinyclip_ds.models.summary import summarize
from tinyclip_ds.models.transformer import Request
from tinyclip_ds.train import checkpoint
from tinyclip_ds.train.contrastive import Features, backward_scale, gather_with_grad, local_rows
from tinyclip_ds.train.loop import (DataSkips, StepResult, Trainer, agree, build_engine, engine_step,
                                    evaluation, image_train_transform, start_state,
                                    training_batches)


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


def train_stage2(run) -> int:
    recipe, monitor = run.recipe, run.monitor
    teacher = run.teacher
    students = build_students(recipe, teacher.clip)
    for kind, tower in students.items():
        tower_cfg = getattr(recipe.student, kind)
        if tower_cfg.init_from:
            initialise_from_stage1(tower, kind, tower_cfg, monitor)
        else:
            monitor.print(f"{kind} tower: '{tower_cfg.init}' initialisation from the teacher"
                          if tower_cfg.init == "inherit" else f"{kind} tower: random initialisation")
    if recipe.train.freeze != "none":
        students[recipe.train.freeze].requires_grad_(False)
    monitor.print(summarize(recipe, teacher.clip, students))

    objective = Stage2Objective(recipe.loss)
    stage1 = {}
    if active_terms(recipe.loss, STAGE1_TERMS):
        for kind, tower in students.items():
            teacher_tower = teacher.clip.visual if kind == "image" else teacher.clip.text
            tower_cfg = getattr(recipe.student, kind)
            pairs = layer_map.resolve(tower_cfg.layer_map, teacher_tower.shape.depth, tower.shape.depth,
                                      tower_cfg.distill_layers, f"student.{kind}")
            stage1[kind] = Stage1Objective(recipe.loss, kind, teacher_tower.shape, tower.shape, pairs,
                                           f"student.{kind}")
    module = Stage2Student(students["image"], students["text"],
                           LogitScale(recipe.loss.logit_scale_init, recipe.loss.logit_scale_max),
                           stage1, objective.student_tokens)
    engine = build_engine(module, run.ds_config, recipe)

    state = start_state(run, engine)

    dataset = PairDataset(pair_source(recipe.data.pairs, recipe.data.image_root, recipe.data.csv_image_key,
                                      recipe.data.csv_caption_key),
                          image_train_transform(run), teacher.tokenizer)
    monitor.print(f"training data: {dataset.source.summary()}")
    batches, micro, accumulation = training_batches(run, dataset, state)
    monitor.print(f"contrastive negatives per step: micro {micro} × accumulation {accumulation} × "
                  f"{run.world} rank(s), {recipe.train.accumulation_mode} accumulation")

    step_fn = ContrastiveStep(engine, teacher, objective, run.device, accumulation,
                              mode=recipe.train.accumulation_mode, seed=recipe.seed)
    skips = DataSkips(state, recipe.train.max_unusable, "steps", run.device)

    def one_step() -> StepResult:
        while True:
            micro_batches = []
            for _ in range(accumulation):
                batch = next(batches)
                state.samples_consumed += micro * run.world
                micro_batches.append(batch)
            # Each rank's share of the loss is a mean over its rows, so every rank needs a usable
            # sample (in plain mode every micro-batch, each being a contrastive batch of its own);
            # otherwise all ranks skip the step and it is counted.
            sizes = [len(b["index"]) for b in micro_batches]
            if not skips.check(micro_batches, min(sizes) > 0 if step_fn.mode == "plain" else sum(sizes) > 0):
                continue
            result = step_fn(micro_batches, state.samples_consumed)
            if result is not None:
                state.nonfinite_in_a_row = 0
                return result
            state.skipped_batches += accumulation
            state.nonfinite_in_a_row += 1
            monitor.print(f"step {state.step + 1}: non-finite loss, step skipped ({state.nonfinite_in_a_row} in a row)")
            if state.nonfinite_in_a_row >= recipe.train.max_nonfinite:
                return StepResult(stopped=True)

    model = engine.module
    evaluate = evaluation(run, engine, image=lambda x: model.image(x).embedding,
                          text=lambda ids: model.text(model.text.fit_context(ids)).embedding)
    return Trainer(run, engine, state, batches).fit(one_step, evaluate)


class ContrastiveStep:
    """One optimizer step over ``accumulation`` micro-batches (see `tinyclip_ds.train.contrastive`).

    ``__call__`` returns the step's `StepResult`, or None when the loss was non-finite on some
    rank — then nothing was back-propagated and the engine is untouched (the step is skipped).
    """

    def __init__(self, engine, teacher, objective: Stage2Objective, device: torch.device,
                 accumulation: int, mode: str, seed: int):
        self.engine = engine
        self.teacher = teacher
        self.objective = objective
        self.device = device
        self.accumulation = accumulation
        self.mode = mode
        self.seed = seed
        self.world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1

    def teacher_features(self, images: Tensor, ids: Tensor) -> Features | None:
        if not self.objective.needs_teacher:
            return None
        tokens = self.objective.teacher_tokens
        image = self.teacher.image(images, Request(tokens=tokens))
        text = self.teacher.text(ids, Request(tokens=tokens))
        return Features(image.embedding, text.embedding, image.tokens, text.tokens,
                        text.token_mask if tokens else None)

    def teacher_intermediates(self, images: Tensor, ids: Tensor) -> dict | None:
        """Teacher outputs for the stage-1 terms kept on in stage 2 (None when there are none)."""
        stage1 = self.engine.module.stage1
        if not stage1:
            return None
        forward = {"image": (self.teacher.image, images), "text": (self.teacher.text, ids)}
        return {kind: forward[kind][0](forward[kind][1], objective.teacher_request)
                for kind, objective in stage1.items()}

    def inputs(self, batch: dict) -> tuple[Tensor, Tensor]:
        if "image" not in batch:  # every image of the micro-batch was unreadable
            size = self.teacher.image_size
            return torch.zeros(0, 3, size, size, device=self.device), torch.zeros(0, 1, dtype=torch.long, device=self.device)
        return batch["image"].to(self.device), batch["text"].to(self.device)

    def __call__(self, micro_batches: list[dict], position: int) -> StepResult | None:
        if self.mode == "plain":
            return self.plain(micro_batches, position)
        return self.feature_cache(micro_batches, position)

    def feature_cache(self, micro_batches: list[dict], position: int) -> StepResult | None:
        engine, objective = self.engine, self.objective
        # 1. Cache every micro-batch's features without grad, remembering the RNG state each
        #    one started with so the recompute draws the same dropout/masks.
        rng_states, student_parts, teacher_parts = [], [], []
        with torch.no_grad():
            for batch in micro_batches:
                images, ids = self.inputs(batch)
                rng_states.append(_rng_state())
                features, scale, _, _ = engine.module(images, ids)
                student_parts.append(features)
                teacher_parts.append(self.teacher_features(images, ids))

        # 2. The full-batch loss on the cached features; its gradient w.r.t. each local feature.
        local = Features.cat(student_parts).map(lambda x: x.detach().float().requires_grad_()
                                                if x.is_floating_point() else x)
        gathered = local.map(lambda x: gather_with_grad(x) if x.is_floating_point() else _gather(x))
        teacher_all = Features.cat(teacher_parts).map(_gather) if objective.needs_teacher else None
        scale_leaf = scale.detach().requires_grad_()
        rows = local_rows(local.image.shape[0], self.device)
        loss, terms = objective(gathered, teacher_all, scale_leaf, rows)
        finite, _ = agree(bool(torch.isfinite(loss)), 0, self.device)
        if not finite:
            return None
        loss.backward()
        feature_grads = {name: value.grad for name, value in local.tensors().items() if value.grad is not None}

        # 3. Recompute each micro-batch with grad and back-propagate its share of the gradient.
        result = StepResult(samples=local.image.shape[0])
        offset = 0
        for m, batch in enumerate(micro_batches):
            images, ids = self.inputs(batch)
            teacher_outs = self.teacher_intermediates(images, ids)
            _set_rng_state(rng_states[m])
            features, scale, stage1_loss, stage1_terms = engine(
                images, ids, teacher_outs, mix_seed(self.seed, "vit_kd", position, m))
            n = features.image.shape[0]
            surrogate = sum((getattr(features, name).float() * grad[offset:offset + n]).sum()
                            for name, grad in feature_grads.items())
            if m == 0 and scale_leaf.grad is not None:  # used once by the full-batch loss: count it once
                surrogate = surrogate + scale * scale_leaf.grad
            # Full-batch share × world undoes DeepSpeed's averaging over ranks; stage-1 terms
            # are per-sample means, averaged over the micro-batches.
            engine.backward(backward_scale(self.world) * surrogate + stage1_loss / self.accumulation,
                            scale_wrt_gas=False)
            engine_step(engine, result)
            offset += n
            result.loss += stage1_loss.item() / self.accumulation
            for name, value in stage1_terms.items():
                result.terms[name] = result.terms.get(name, 0.0) + value.item() / self.accumulation
        # Logged values are averaged over ranks; the objective's are shares that sum to the full batch.
        result.loss += loss.item() * self.world
        for name, value in terms.items():
            result.terms[name] = value.item() * self.world
        return result

    def plain(self, micro_batches: list[dict], position: int) -> StepResult | None:
        """Each micro-batch contrasted only with itself (gathered over ranks): fewer negatives.

        A non-finite loss in micro-batch 0 skips the step untouched; in a later one (whose
        predecessors are already back-propagated) that micro-batch contributes zero gradient
        (a zero surrogate on its features), which is exact when its features are finite."""
        engine, objective = self.engine, self.objective
        result = StepResult()
        for m, batch in enumerate(micro_batches):
            images, ids = self.inputs(batch)
            teacher_all = self.teacher_features(images, ids)
            features, scale, stage1_loss, stage1_terms = engine(
                images, ids, self.teacher_intermediates(images, ids), mix_seed(self.seed, "vit_kd", position, m))
            gathered = features.map(lambda x: gather_with_grad(x) if x.is_floating_point() else _gather(x))
            teacher_all = teacher_all.map(_gather) if teacher_all is not None else None
            loss, terms = objective(gathered, teacher_all, scale, local_rows(features.image.shape[0], self.device))
            total = (backward_scale(self.world) * loss + stage1_loss) / self.accumulation
            finite, _ = agree(bool(torch.isfinite(total)), 0, self.device)
            if not finite:
                if m == 0:
                    return None
                total = sum(x.float().sum() * 0.0 for x in gathered.tensors().values() if x.is_floating_point())
            engine.backward(total, scale_wrt_gas=False)
            engine_step(engine, result)
            if not finite:
                continue
            result.samples += features.image.shape[0]
            result.loss += (loss.item() * self.world + stage1_loss.item()) / self.accumulation
            for name, value in {**{k: v * self.world for k, v in terms.items()}, **stage1_terms}.items():
                result.terms[name] = result.terms.get(name, 0.0) + value.item() / self.accumulation
        return result


def _gather(x: Tensor) -> Tensor:
    """Gather without gradient (teacher features, masks)."""
    with torch.no_grad():
        return gather_with_grad(x.float()).to(x.dtype) if x.dtype == torch.bool else gather_with_grad(x)


def _rng_state() -> dict:
    return {"cpu": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None}


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["cpu"])
    if state["cuda"] is not None:
        torch.cuda.set_rng_state(state["cuda"])
