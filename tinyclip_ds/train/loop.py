"""The outer training loop both stages share: optimizer steps, logging, evaluation,
checkpoints, non-finite losses, unusable data, pre-emption signals and stopping the data-loader
workers. A stage supplies ``one_step`` (the micro-batches of one optimizer step) and
``evaluate``; everything around them lives here.
"""

from __future__ import annotations

import dataclasses
import json
import math
import signal
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist
from torch import nn

from tinyclip_ds.config import RecipeError
from tinyclip_ds.data.sampler import GlobalBatchSampler, TrainBatches, train_loader
from tinyclip_ds.data.transforms import train_transform
from tinyclip_ds.train import checkpoint
from tinyclip_ds.train.deepspeed_config import batch_sizes
from tinyclip_ds.train.monitor import significant
from tinyclip_ds.train.optim import build_optimizer


@dataclass
class TrainState:
    """Progress that must survive a restart (stored in the checkpoint's client state)."""

    step: int = 0  # optimizer steps done
    samples_consumed: int = 0  # training samples drawn over all ranks (the data position)
    skipped_samples: int = 0  # unusable samples over all ranks
    skipped_by_reason: dict[str, int] = field(default_factory=dict)  # the same, per reason
    skipped_batches: int = 0  # micro-batches dropped for a non-finite loss
    nonfinite_in_a_row: int = 0
    unusable_in_a_row: int = 0  # batches in a row without enough usable samples

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> "TrainState":
        """The state saved in a checkpoint; fields newer than the checkpoint start at their defaults."""
        return cls(**{f.name: values[f.name] for f in dataclasses.fields(cls) if f.name in values})


@dataclass
class StepResult:
    """What one optimizer step reports for logging (per-rank values; reduced when logged)."""

    loss: float = 0.0
    terms: dict[str, float] = field(default_factory=dict)
    samples: int = 0  # samples this rank used in the step
    grad_norm: float | None = None  # measured by `engine_step` where DeepSpeed does not report it
    stopped: bool = False  # too many non-finite losses in a row: stop the run


def start_state(run, engine) -> TrainState:
    """Collective: the state training starts from — the checkpoint's (loaded into ``engine``)
    when resuming, else a fresh one — after which rank 0 writes the run's recipe.yaml and
    ds_config.json. Only then: a resume refused while loading leaves the run directory as it was."""
    state = TrainState()
    if run.resume_from:
        state = TrainState.from_dict(checkpoint.load(engine, run.resume_from))
        run.monitor.print(f"resumed at step {state.step} ({state.samples_consumed} samples consumed)")
    if run.rank == 0:
        (run.run_dir / "recipe.yaml").write_text(run.recipe.to_yaml())
        (run.run_dir / "ds_config.json").write_text(json.dumps(run.ds_config, indent=2) + "\n")
    return state


def training_batches(run, dataset, state: TrainState) -> tuple[TrainBatches, int, int]:
    """``(batches, micro, accumulation)``: this rank's endless micro-batches of ``dataset``,
    continuing from the data position in ``state`` (samples consumed over all ranks, so it
    holds for any world size with the same global batch). Give the batches to `Trainer`, which
    stops their loader workers however training ends."""
    micro, accumulation, global_batch = batch_sizes(run.recipe.train, run.world)
    sampler = GlobalBatchSampler(len(dataset), micro, accumulation, run.world, run.rank, run.recipe.seed,
                                 start_position=math.ceil(state.samples_consumed / (micro * run.world)))
    run.monitor.print(f"{len(dataset)} training samples; global batch {global_batch} = micro {micro} × "
                      f"accumulation {accumulation} × {run.world} rank(s)")
    return train_loader(dataset, sampler, run.recipe.data.num_workers, run.samples.track), micro, accumulation


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


def engine_step(engine, result: StepResult) -> None:
    """``engine.step()``. Where DeepSpeed does not report the gradient norm of an optimizer step
    (its optimizer keeps none: ZeRO-0 without bf16 clips with it but drops it), it is measured
    here into ``result``, before the step clips: by then the gradients are averaged over ranks."""
    if (engine.is_gradient_accumulation_boundary() and not hasattr(engine.optimizer, "_global_grad_norm")
            and not engine.fp16_enabled()):  # fp16 gradients carry the loss scale
        norms = [torch.linalg.vector_norm(p.grad.detach().float()) for p in engine.module.parameters()
                 if p.grad is not None]
        if norms:
            result.grad_norm = torch.linalg.vector_norm(torch.stack(norms)).item()
    engine.step()


class UnusableData(RecipeError):
    """Too many batches in a row without enough usable samples (see `DataSkips`)."""


class DataSkips:
    """What training could not use. Counts the samples collate skipped, over all ranks, in total
    and per reason (into the `TrainState`), and the batches in a row left with too few usable
    samples; after ``limit`` of those in a row it raises `UnusableData` naming their sources.
    ``unit`` names such a batch in that message ("micro-batches", "steps")."""

    def __init__(self, state: TrainState, limit: int, unit: str, device: torch.device):
        self.state = state
        self.limit = limit
        self.unit = unit
        self.device = device
        self.streak_reasons: Counter[str] = Counter()  # skips since the last usable batch, per reason
        self.streak_sources: Counter[str] = Counter()  # ... and per source

    def check(self, batches: list[dict], usable: bool) -> bool:
        """Collective: count the skips of this rank's ``batches``; True when ``usable`` holds on
        every rank (the batches are used), False when all ranks drop them."""
        state = self.state
        usable, skipped = agree(usable, sum(b["skipped"] for b in batches), self.device)
        reasons, sources = Counter(), Counter()
        if skipped:  # rare: only then a second collective, for the per-reason and per-source counts
            for batch in batches:
                reasons.update(batch.get("skip_reasons", {}))
                sources.update(batch.get("skip_sources", {}))
            reasons, sources = rank_counters(reasons, sources)
            state.skipped_samples += skipped
            for reason, count in reasons.items():
                state.skipped_by_reason[reason] = state.skipped_by_reason.get(reason, 0) + count
        if usable:
            state.unusable_in_a_row = 0
            self.streak_reasons.clear()
            self.streak_sources.clear()
            return True
        state.unusable_in_a_row += 1
        self.streak_reasons.update(reasons)
        self.streak_sources.update(sources)
        if state.unusable_in_a_row >= self.limit:
            problem = f"{state.unusable_in_a_row} {self.unit} in a row had too few usable samples " \
                      f"(train.max_unusable = {self.limit})"
            if not self.streak_reasons:
                raise UnusableData(f"{problem}, although no sample was skipped; raise train.micro_batch")
            raise UnusableData(
                f"{problem}; their {sum(self.streak_reasons.values())} skipped samples came from "
                f"{counted(self.streak_sources) or 'unnamed sources'} ({counted(self.streak_reasons)}): fix "
                f"or remove those files, or drop the source from the recipe")
        return False


def counted(counts: dict[str, int]) -> str:
    """``"b 3, a 1, c 1"``: counts largest first, ties by name."""
    return ", ".join(f"{name} {count}" for name, count in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))


def rank_counters(*counters: Counter) -> list[Counter]:
    """Each counter summed over ranks (one all_gather of small objects)."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return list(counters)
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, list(counters))
    return [sum((rank[i] for rank in gathered), Counter()) for i in range(len(counters))]


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

    def track(self, batch: dict) -> None:
        """Remember the batch's sample indices when enabled (every training batch comes here)."""
        if self.enabled:
            self.pending.append(batch["index"].tolist())

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
        """Put the previous handlers back, unless a stop was requested: then the rank is on its
        way out with its checkpoint saved, and a late copy of the signal (schedulers signal every
        process, and `bash launch/...` forwards the signal to the ranks too) must not turn that
        clean exit into death by signal. Ignored rather than handled: Python puts the default
        action back while it shuts down."""
        for sig, handler in self._previous.items():
            signal.signal(sig, signal.SIG_IGN if self.requested else handler)


class Trainer:
    """Runs optimizer steps until ``train.steps``, with logging, evaluation and checkpoints.
    ``batches`` are the stage's training batches: their loader workers are stopped however
    training ends."""

    def __init__(self, run, engine, state: TrainState, batches: TrainBatches):
        self.run = run
        self.engine = engine
        self.state = state
        self.batches = batches
        self.recipe = run.recipe
        self.saved_step = state.step  # the newest checkpoint's step (0: none, or nothing to save)

    def save(self) -> None:
        """Collective: checkpoint the current step, unless it already is."""
        if self.state.step == self.saved_step:
            return
        path = checkpoint.save(self.engine, self.run.run_dir, self.state.step, self.state.to_dict(),
                               self.recipe.checkpoint.keep_last)
        self.saved_step = self.state.step
        self.run.monitor.print(f"step {self.state.step}: checkpoint {path}")

    def fit(self, one_step: Callable[[], StepResult], evaluate: Callable[[int], None]) -> int:
        recipe, run, state = self.recipe, self.run, self.state
        preemption = Preemption()
        window = {"loss": 0.0, "terms": {}, "samples": 0, "steps": 0, "grad_norm": None, "start": time.time()}
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
                last = state.step == recipe.train.steps
                if state.step % recipe.train.log_every == 0 or last:
                    self._log(window)
                stop = not all_ranks(not preemption.requested, run.device)
                if last or stop or (recipe.checkpoint.every and state.step % recipe.checkpoint.every == 0):
                    self.save()
                # After the save, so that an evaluation that fails (and ends the run) never costs
                # the step's checkpoint. Not saving after a failure instead: the save is collective
                # and the other ranks may be elsewhere.
                if last or (recipe.eval.every and state.step % recipe.eval.every == 0):
                    evaluate(state.step)
                if stop:
                    run.monitor.print(f"pre-empted (SIGTERM/SIGINT) at step {state.step}; the checkpoint "
                                      f"is saved, continue with --resume auto")
                    return 0
        except UnusableData as error:
            # Every rank raises it at the same batch (the decision is collective), so all can save.
            self.save()
            progress = (f"steps up to {state.step} are saved: continue with --resume auto" if state.step
                        else "no step was trained")
            raise UnusableData(f"stopping at step {state.step}: {error}; {progress}") from None
        finally:
            preemption.restore()
            self.batches.close()
        run.monitor.print(f"done: {state.step} steps; run directory {run.run_dir.resolve()}")
        run.monitor.close()
        return 0

    def _accumulate(self, window: dict, result: StepResult) -> None:
        window["loss"] += result.loss
        for name, value in result.terms.items():
            window["terms"][name] = window["terms"].get(name, 0.0) + value
        window["samples"] += result.samples
        window["steps"] += 1
        if result.grad_norm is not None:
            window["grad_norm"] = result.grad_norm

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
                   "train/skipped_steps": state.skipped_batches,
                   **{f"data/skipped/{reason}": n for reason, n in state.skipped_by_reason.items()}}
        grad_norm = self.engine.get_global_grad_norm()
        if grad_norm is None:
            grad_norm = window["grad_norm"]
        if grad_norm is not None:
            scalars["train/grad_norm"] = float(grad_norm)
        run.monitor.scalars(state.step, scalars)
        terms = " ".join(f"{n} {scalars['loss/' + n]:.4f}" for n in names)
        skipped = f" skipped {state.skipped_samples}" if state.skipped_samples else ""
        if state.skipped_by_reason:
            skipped += f" ({counted(state.skipped_by_reason)})"
        run.monitor.print(f"step {state.step}/{self.recipe.train.steps} loss {scalars['loss/total']:.4f} "
                          f"({terms}) lr {scalars['train/lr']:.2e} "
                          f"{significant(scalars['train/samples_per_s'])} samples/s{skipped}")
        window.update(loss=0.0, terms={}, samples=0, steps=0, grad_norm=None, start=time.time())
