"""The outer training loop both stages share: optimizer steps, logging, evaluation,
checkpoints, non-finite losses and pre-emption signals. A stage supplies ``one_step`` (the
micro-batches of one optimizer step) and ``evaluate``; everything around them lives here.
"""

from __future__ import annotations

import dataclasses
import json
import math
import signal
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist
from torch import nn

from tinyclip_ds.data.sampler import GlobalBatchSampler, train_loader
from tinyclip_ds.data.transforms import train_transform
from tinyclip_ds.train import checkpoint
from tinyclip_ds.train.deepspeed_config import batch_sizes
from tinyclip_ds.train.optim import build_optimizer


@dataclass
class TrainState:
    """Progress that must survive a restart (stored in the checkpoint's client state)."""

    step: int = 0  # optimizer steps done
    samples_consumed: int = 0  # training samples drawn over all ranks (the data position)
    skipped_samples: int = 0  # unreadable samples over all ranks
    skipped_batches: int = 0  # micro-batches dropped for a non-finite loss
    nonfinite_in_a_row: int = 0

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> "TrainState":
        return cls(**{f.name: values[f.name] for f in dataclasses.fields(cls)})


@dataclass
class StepResult:
    """What one optimizer step reports for logging (per-rank values; reduced when logged)."""

    loss: float = 0.0
    terms: dict[str, float] = field(default_factory=dict)
    samples: int = 0  # samples this rank used in the step
    stopped: bool = False  # too many non-finite losses in a row: stop the run


def training_batches(run, dataset, state: TrainState) -> tuple[Iterator[dict], int, int]:
    """``(batches, micro, accumulation)``: this rank's endless micro-batches of ``dataset``,
    continuing from the data position in ``state`` (samples consumed over all ranks, so it
    holds for any world size with the same global batch)."""
    micro, accumulation, global_batch = batch_sizes(run.recipe.train, run.world)
    sampler = GlobalBatchSampler(len(dataset), micro, accumulation, run.world, run.rank, run.recipe.seed,
                                 start_position=math.ceil(state.samples_consumed / (micro * run.world)))
    run.monitor.print(f"{len(dataset)} training samples; global batch {global_batch} = micro {micro} × "
                      f"accumulation {accumulation} × {run.world} rank(s)")
    return run.samples.track(train_loader(dataset, sampler, run.recipe.data.num_workers)), micro, accumulation


def image_train_transform(run):
    """The recipe's training augmentation with the teacher's image size and normalisation."""
    data, teacher = run.recipe.data, run.teacher
    return train_transform(teacher.image_size, teacher.image_mean, teacher.image_std, data.randaugment,
                           data.randaugment_ops, data.randaugment_magnitude)


def build_engine(module: nn.Module, ds_config: dict, recipe):
    """The DeepSpeed engine around ``module`` with the recipe's AdamW and schedule."""
    import deepspeed

    optimizer, schedule = build_optimizer(module, recipe.train)
    engine, _, _, _ = deepspeed.initialize(model=module, optimizer=optimizer, lr_scheduler=schedule,
                                           config=ds_config)
    return engine


def agree(flag: bool, count: int, device: torch.device) -> tuple[bool, int]:
    """(``flag`` true on every rank, ``count`` summed over ranks) in one all-reduce."""
    value = torch.tensor([0.0 if flag else 1.0, float(count)], device=device)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(value)
    return value[0].item() == 0, int(value[1].item())


def evaluation(run, engine, image: Callable | None = None, text: Callable | None = None) -> Callable[[int], None]:
    """The ``evaluate(step)`` of a stage: the student's encoders where given (stage 1 gives one,
    stage 2 both), the teacher's for the other tower. The teacher is frozen, so its side of
    the validation sets, its metrics and its heatmap half are computed once. Logs to
    metrics.jsonl, TensorBoard (with the student-vs-teacher similarity heatmap) and the console."""
    evaluator, clip = run.evaluator, run.teacher.clip
    frozen = {}  # the teacher's sides, metrics and similarity sample, from the first evaluation

    def evaluate(step: int) -> None:
        if not evaluator.enabled:
            return
        if not frozen:
            sides = (evaluator.image_side(lambda x: clip.visual(x).embedding),
                     evaluator.text_side(lambda ids: clip.text(ids).embedding))
            frozen.update(sides=sides, metrics=evaluator.metrics(*sides),
                          similarity=evaluator.similarity_sample(*sides))
        teacher_sides, teacher = frozen["sides"], frozen["metrics"]
        engine.module.eval()
        student_sides = (evaluator.image_side(image) if image else teacher_sides[0],
                         evaluator.text_side(text) if text else teacher_sides[1])
        engine.module.train()
        student = evaluator.metrics(*student_sides)
        run.monitor.metrics(step, {**{f"student/{k}": v for k, v in student.items()},
                                   **{f"teacher/{k}": v for k, v in teacher.items()}})
        student_sim = evaluator.similarity_sample(*student_sides)
        if student_sim is not None:
            gap = torch.full((student_sim.shape[0], 1), float("nan"))
            both = torch.cat([student_sim.cpu(), gap, frozen["similarity"].cpu()], dim=1)
            run.monitor.heatmap("eval/similarity_student_vs_teacher", step, both.nan_to_num(both.nanmean().item()))
        shown = [k for k in ("zeroshot_top1", "i2t_R@1", "t2i_R@1", "mean_score") if k in student]
        run.monitor.print(f"eval step {step}: " + "  ".join(
            f"{k} student {student[k]:.4f} / teacher {teacher[k]:.4f}" for k in shown))

    return evaluate


def all_ranks(flag: bool, device: torch.device) -> bool:
    """True when ``flag`` holds on every rank (one tiny all-reduce)."""
    value = torch.tensor([1.0 if flag else 0.0], device=device)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(value, op=dist.ReduceOp.MIN)
    return bool(value.item())


def rank_sum(values: list[float], device: torch.device) -> list[float]:
    """Element-wise sum over ranks."""
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(tensor)
    return tensor.tolist()


class SampleLog:
    """Opt-in record (``train.log_samples``) of which samples every optimizer step used.

    The stage passes its batches through `track`; after each step `flush` gathers the
    indices drawn on every rank, and rank 0 appends ``{"step", "samples"}`` to
    ``<run_dir>/samples.jsonl`` in the sampler's global order (micro-step m of rank r is slice
    m·world + r), so runs on different numbers of ranks can be compared line by line."""

    def __init__(self, path: Path, enabled: bool, rank: int, world: int):
        self.path = path
        self.enabled = enabled
        self.rank = rank
        self.world = world
        self.pending: list[list[int]] = []  # this rank's micro-batches of the current step

    def track(self, batches: Iterable[dict]) -> Iterator[dict]:
        """``batches`` as they are, remembering each one's sample indices when enabled."""
        for batch in batches:
            if self.enabled:
                self.pending.append(batch["index"].tolist())
            yield batch

    def flush(self, step: int) -> None:
        """Collective: write the samples of ``step`` (every rank must call it)."""
        if not self.enabled:
            return
        gathered = [self.pending]
        if dist.is_initialized() and self.world > 1:
            gathered = [None] * self.world
            dist.all_gather_object(gathered, self.pending)
        self.pending = []
        if self.rank == 0:
            samples = [index for micro in zip(*gathered) for rank_batch in micro for index in rank_batch]
            with open(self.path, "a") as f:
                f.write(json.dumps({"step": step, "samples": samples}) + "\n")


class Preemption:
    """Remembers SIGTERM/SIGINT (how schedulers pre-empt jobs) so the loop can save and exit."""

    def __init__(self):
        self.requested = False
        self._previous = {sig: signal.signal(sig, self._handle) for sig in (signal.SIGTERM, signal.SIGINT)}

    def _handle(self, signum, frame):
        self.requested = True

    def restore(self):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


class Trainer:
    """Runs optimizer steps until ``train.steps``, with logging, evaluation and checkpoints."""

    def __init__(self, run, engine, state: TrainState):
        self.run = run
        self.engine = engine
        self.state = state
        self.recipe = run.recipe

    def save(self) -> None:
        path = checkpoint.save(self.engine, self.run.run_dir, self.state.step, self.state.to_dict(),
                               self.recipe.checkpoint.keep_last)
        self.run.monitor.print(f"step {self.state.step}: checkpoint {path}")

    def fit(self, one_step: Callable[[], StepResult], evaluate: Callable[[int], None]) -> int:
        recipe, run, state = self.recipe, self.run, self.state
        preemption = Preemption()
        window = {"loss": 0.0, "terms": {}, "samples": 0, "steps": 0, "start": time.time()}
        try:
            while state.step < recipe.train.steps:
                result = one_step()
                if result.stopped:
                    self.save()
                    run.monitor.print(
                        f"stopping: {state.nonfinite_in_a_row} non-finite losses in a row "
                        f"(train.max_nonfinite = {recipe.train.max_nonfinite}); lower train.lr, check "
                        f"the data, or use fp32/bf16. Progress is saved: fix the cause, then --resume auto")
                    return 1
                state.step += 1
                run.samples.flush(state.step)
                self._accumulate(window, result)
                if state.step % recipe.train.log_every == 0 or state.step == recipe.train.steps:
                    self._log(window)
                last = state.step == recipe.train.steps
                if last or (recipe.eval.every and state.step % recipe.eval.every == 0):
                    evaluate(state.step)
                stop = not all_ranks(not preemption.requested, run.device)
                if last or stop or (recipe.checkpoint.every and state.step % recipe.checkpoint.every == 0):
                    self.save()
                if stop:
                    run.monitor.print(f"pre-empted (SIGTERM/SIGINT) at step {state.step}; the checkpoint "
                                      f"is saved, continue with --resume auto")
                    return 0
        finally:
            preemption.restore()
        run.monitor.print(f"done: {state.step} steps; run directory {run.run_dir.resolve()}")
        run.monitor.close()
        return 0

    def _accumulate(self, window: dict, result: StepResult) -> None:
        window["loss"] += result.loss
        for name, value in result.terms.items():
            window["terms"][name] = window["terms"].get(name, 0.0) + value
        window["samples"] += result.samples
        window["steps"] += 1

    def _log(self, window: dict) -> None:
        """Scalars averaged over the window's steps and over ranks."""
        run, state = self.run, self.state
        names = sorted(window["terms"])
        sums = rank_sum([window["loss"], window["samples"], *[window["terms"][n] for n in names]], run.device)
        per_step = window["steps"] * run.world
        elapsed = max(time.time() - window["start"], 1e-9)
        scalars = {"loss/total": sums[0] / per_step,
                   **{f"loss/{n}": v / per_step for n, v in zip(names, sums[2:])},
                   "train/lr": self.engine.get_lr()[0],
                   "train/samples_per_s": sums[1] / elapsed,
                   "train/skipped_samples": state.skipped_samples,
                   "train/skipped_steps": state.skipped_batches}
        grad_norm = self.engine.get_global_grad_norm()
        if grad_norm is not None:
            scalars["train/grad_norm"] = float(grad_norm)
        run.monitor.scalars(state.step, scalars)
        terms = " ".join(f"{n} {scalars['loss/' + n]:.4f}" for n in names)
        run.monitor.print(f"step {state.step}/{self.recipe.train.steps} loss {scalars['loss/total']:.4f} "
                          f"({terms}) lr {scalars['train/lr']:.2e} {scalars['train/samples_per_s']:.0f} samples/s")
        window.update(loss=0.0, terms={}, samples=0, steps=0, start=time.time())
