"""Stage 1: distil one tower (image or text) alone, on unpaired data.

The student tower and the objective's learned projections form the DeepSpeed engine; the
frozen teacher tower runs outside it under no_grad. Evaluation pairs the student tower with
the teacher's other tower.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from tinyclip_ds.data.datasets import ImageDataset, TextDataset
from tinyclip_ds.data.sampler import mix_seed
from tinyclip_ds.data.sources import caption_source, image_source
from tinyclip_ds.distill import layer_map
from tinyclip_ds.distill.objectives import Stage1Objective
from tinyclip_ds.models.students import build_students
from tinyclip_ds.models.summary import summarize
from tinyclip_ds.models.transformer import TowerOutput
from tinyclip_ds.train.loop import (DataSkips, StepResult, Trainer, agree, build_engine, engine_step,
                                    evaluation, image_train_transform, start_state,
                                    training_batches)


class Stage1Student(nn.Module):
    """What DeepSpeed trains in stage 1: one student tower plus the objective's learned parts."""

    def __init__(self, tower: nn.Module, objective: Stage1Objective):
        super().__init__()
        self.tower = tower
        self.objective = objective

    def forward(self, inputs: Tensor, teacher_out: TowerOutput, mask_seed: int) -> tuple[Tensor, dict]:
        student_out = self.tower(inputs, self.objective.student_request)
        return self.objective(student_out, teacher_out, mask_seed)

    def encode(self, inputs: Tensor) -> Tensor:
        """The student tower's embedding (evaluation)."""
        return self.tower(inputs).embedding


def train_stage1(run) -> int:
    recipe, monitor = run.recipe, run.monitor
    kind = recipe.towers[0]
    key = f"student.{kind}"
    teacher_clip = run.teacher.clip
    teacher_tower = teacher_clip.visual if kind == "image" else teacher_clip.text
    student = build_students(recipe, teacher_clip)[kind]
    monitor.print(summarize(recipe, teacher_clip, {kind: student}))
    tower_cfg = getattr(recipe.student, kind)
    pairs = layer_map.resolve(tower_cfg.layer_map, teacher_tower.shape.depth, student.shape.depth,
                              tower_cfg.distill_layers, key)
    objective = Stage1Objective(recipe.loss, kind, teacher_tower.shape, student.shape, pairs, key)
    engine = build_engine(Stage1Student(student, objective), run.ds_config, recipe)

    state = start_state(run, engine)

    if kind == "image":
        dataset = ImageDataset(image_source(recipe.data.images), image_train_transform(run))
        monitor.print(f"training data: {dataset.source.summary()}")
    else:
        dataset = TextDataset(caption_source(recipe.data.captions), run.teacher.tokenizer)
    batches, micro, accumulation = training_batches(run, dataset, state)

    teacher_forward = run.teacher.image if kind == "image" else run.teacher.text
    smallest_batch = 2 if "rep_relation" in objective.terms else 1
    skips = DataSkips(state, recipe.train.max_unusable, "micro-batches", run.device)

    def one_step() -> StepResult:
        result = StepResult()
        done = 0
        while done < accumulation:
            batch = next(batches)
            state.samples_consumed += micro * run.world
            # Unusable images are dropped by collate; a micro-batch left too small on any rank
            # (empty; one sample for the in-batch rep_relation) is skipped by all ranks before
            # any forward, since ZeRO-3 forwards are collective.
            if not skips.check([batch], len(batch["index"]) >= smallest_batch):
                continue
            inputs = batch[kind].to(run.device)
            teacher_out = teacher_forward(inputs, objective.teacher_request)
            loss, terms = engine(inputs if kind == "image" else student.fit_context(inputs), teacher_out,
                                 mix_seed(recipe.seed, "vit_kd", state.samples_consumed, run.rank))
            finite, _ = agree(bool(torch.isfinite(loss)), 0, run.device)
            if not finite:
                # Dropped on every rank alike, so DeepSpeed's collectives stay in step; the next
                # micro-batch takes its place.
                state.skipped_batches += 1
                state.nonfinite_in_a_row += 1
                monitor.print(f"step {state.step + 1}: non-finite loss, micro-batch dropped "
                              f"({state.nonfinite_in_a_row} in a row)")
                if state.nonfinite_in_a_row >= recipe.train.max_nonfinite:
                    result.stopped = True
                    return result
                continue
            engine.backward(loss)
            engine_step(engine, result)
            state.nonfinite_in_a_row = 0
            done += 1
            result.loss += loss.item() / accumulation
            for name, value in terms.items():
                result.terms[name] = result.terms.get(name, 0.0) + value.item() / accumulation
            result.samples += len(inputs)
        return result

    if kind == "image":
        evaluate = evaluation(run, engine, image=engine.module.encode)
    else:
        evaluate = evaluation(run, engine, text=lambda ids: engine.module.encode(student.fit_context(ids)))
    return Trainer(run, engine, state, batches).fit(one_step, evaluate)
