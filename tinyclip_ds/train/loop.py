"""The training loop, for every stage: `train` sets up the run, builds the task the stage table
names for the recipe's stage and hands both to the `Trainer`.

The Trainer is the only place that draws micro-batches and counts the data position, resumes,
logs, evaluates, checkpoints and handles pre-emption. A stage task (`train.task.Task`) builds
what DeepSpeed trains and does one optimizer step over the micro-batches it is given.

One policy for a non-finite loss: the step is not applied on any rank (`train.engine`), it is
counted in ``train/skipped_steps``, and the step is tried again on the next micro-batches;
``train.max_nonfinite`` such steps in a row stop the run with a checkpoint.
"""

from __future__ import annotations

import dataclasses
import json
import math
import signal
import time
from dataclasses import dataclass, field

from tinyclip_ds import distributed
from tinyclip_ds.data.order import GlobalOrder
from tinyclip_ds.data.sampler import GlobalBatchSampler, TrainBatches, train_loader
from tinyclip_ds.recipe import Recipe
from tinyclip_ds.stages import STAGES
from tinyclip_ds.summary import summarize
from tinyclip_ds.train import checkpoint, resume
from tinyclip_ds.train.accounting import DataSkips, UnusableData, counted
from tinyclip_ds.train.deepspeed_config import batch_sizes
from tinyclip_ds.train.engine import build_engine
from tinyclip_ds.train.evaluation import StudentEvaluation
from tinyclip_ds.train.monitor import significant
from tinyclip_ds.train.run import Run, prepare
from tinyclip_ds.train.task import StepResult, Task, task_class


def train(recipe: Recipe, resume: str | None = None) -> int:
    """Run the recipe's stage on this rank; returns the process exit code."""
    run = prepare(recipe, resume)
    code = Trainer(run, build_task(run)).fit()
    distributed.shutdown()  # only after a normal end: ranks that failed may be inside a collective
    return code


def build_task(run: Run) -> Task:
    """The task of the run's stage, its student summary printed."""
    recipe = run.recipe
    task = task_class(STAGES[recipe.stage]).for_recipe(recipe, run.teacher, run.device, run.rank,
                                                       run.monitor.print, run.plan.init_from)
    run.monitor.print(summarize(recipe, run.teacher.clip, task.students))
    return task


@dataclass
class TrainState:
    """Progress that must survive a restart (stored in the checkpoint's client state)."""

    step: int = 0  # optimizer steps applied
    samples_consumed: int = 0  # training samples drawn over all ranks (the data position)
    skipped_samples: int = 0  # unusable samples over all ranks
    skipped_by_reason: dict[str, int] = field(default_factory=dict)  # the same, per reason
    skipped_steps: int = 0  # steps not applied because of a non-finite loss
    nonfinite_in_a_row: int = 0  # such steps since the last applied one
    unusable_in_a_row: int = 0  # steps in a row without enough usable samples
    data_sizes: list[int] = field(default_factory=list)  # samples of each training source: what the position counts in
    data_weights: list[float] = field(default_factory=list)  # their data.weights ([] = by size)
    data_seed: int | None = None  # the seed of their order (None: saved before it was recorded)

    def to_dict(self) -> dict:
        """The state as plain data (the checkpoint's client state)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> TrainState:
        """The state saved in a checkpoint; fields newer than the checkpoint start at their defaults."""
        return cls(**{f.name: values[f.name] for f in dataclasses.fields(cls) if f.name in values})


class Trainer:
    """Runs the task's optimizer steps until ``train.steps``, with logging, evaluation,
    checkpoints and pre-emption."""

    def __init__(self, run: Run, task: Task):
        self.run = run
        self.task = task
        self.recipe = run.recipe
        self.micro, self.accumulation, self.global_batch = batch_sizes(self.recipe.train, run.world)

    def fit(self) -> int:
        """Train; returns the process exit code (0 done or pre-empted, 1 stopped by non-finite losses)."""
        run, recipe, task = self.run, self.recipe, self.task
        engine = self.engine = build_engine(task.module, run.ds_config, recipe.train)
        dataset = task.dataset()
        state = self.state = self.start(dataset)
        self.saved_step = state.step  # the newest checkpoint's step (0: none, or nothing to save)
        batches = self.batches(dataset)
        evaluate = StudentEvaluation(run.evaluator, run.teacher.clip, run.monitor, run.rank, engine.module,
                                     *task.encoders(engine.module))
        skips = DataSkips(state, recipe.train.max_unusable, run.device)
        preemption = Preemption()
        window = LogWindow()
        try:
            while state.step < recipe.train.steps:
                micro_batches = [self.draw(batches) for _ in range(self.accumulation)]
                # Too few usable samples on some rank: all ranks skip, before any forward (ZeRO-3
                # forwards are collective).
                if not skips.check(micro_batches, task.usable(micro_batches)):
                    run.samples.flush(state.step + 1, skipped="unusable")
                    continue
                result = task.step(engine, micro_batches)
                if not result.applied:
                    run.samples.flush(state.step + 1, skipped="nonfinite")
                    state.skipped_steps += 1
                    state.nonfinite_in_a_row += 1
                    run.monitor.print(f"step {state.step + 1}: non-finite loss, step skipped "
                                      f"({state.nonfinite_in_a_row} in a row)")
                    if state.nonfinite_in_a_row >= recipe.train.max_nonfinite:
                        self.save()
                        run.monitor.print(
                            f"stopping: {state.nonfinite_in_a_row} non-finite losses in a row "
                            f"(train.max_nonfinite = {recipe.train.max_nonfinite}); lower train.lr, check "
                            f"the data, or use fp32/bf16. Progress is saved: fix the cause, then --resume auto")
                        return 1
                    continue
                state.nonfinite_in_a_row = 0
                state.step += 1
                run.samples.flush(state.step)
                window.add(result)
                last = state.step == recipe.train.steps
                if state.step % recipe.train.log_every == 0 or last:
                    self.log(window)
                stop = not distributed.all_true(not preemption.requested, run.device)
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
            # Every rank raises it at the same step (the decision is collective), so all can save.
            self.save()
            progress = (f"steps up to {state.step} are saved: continue with --resume auto" if state.step
                        else "no step was trained")
            raise UnusableData(f"stopping at step {state.step}: {error}; {progress}") from None
        finally:
            preemption.restore()
            batches.close()
            # On every way out (pre-emption included): the launchers end a successful rank
            # without the interpreter's teardown (cli.exit_process), which would close it too late.
            run.monitor.close()
        run.monitor.print(f"done: {state.step} steps; run directory {run.run_dir.resolve()}")
        return 0

    def start(self, dataset) -> TrainState:
        """Collective: the state training starts from — the checkpoint's (loaded into the engine,
        its data position checked against ``dataset``, a `Mixture` as its ``source``) when
        resuming, else a fresh one — after which rank 0 writes the run's recipe.yaml and
        ds_config.json. Only then: a resume refused while loading leaves the run directory as it was."""
        run = self.run
        sizes, weights, seed = list(dataset.source.sizes), list(self.recipe.data.weights), self.recipe.seed
        state = TrainState()
        if run.plan.checkpoint:
            state = TrainState.from_dict(resume.load(self.engine, run.plan))
            if state.data_sizes:  # recorded since the data position counts over the sources
                saved_seed = seed if state.data_seed is None else state.data_seed
                resume.check_data(state.data_sizes, state.data_weights, saved_seed, sizes, weights, seed)
            run.monitor.print(f"resumed at step {state.step} ({state.samples_consumed} samples consumed)")
        state.data_sizes, state.data_weights, state.data_seed = sizes, weights, seed
        if run.rank == 0:
            (run.run_dir / "recipe.yaml").write_text(self.recipe.to_yaml())
            (run.run_dir / "ds_config.json").write_text(json.dumps(run.ds_config, indent=2) + "\n")
        return state

    def batches(self, dataset) -> TrainBatches:
        """This rank's endless micro-batches of ``dataset`` (its ``source`` a `Mixture`) in the
        global order, continuing from the data position (samples consumed over all ranks, so it
        holds for any world size with the same global batch)."""
        run, state = self.run, self.state
        order = GlobalOrder(state.data_sizes, self.recipe.seed, state.data_weights or None)
        sampler = GlobalBatchSampler(
            order, self.micro, self.accumulation, run.world, run.rank,
            start_position=math.ceil(state.samples_consumed / (self.micro * run.world)))
        run.monitor.print(f"training order: {order.describe()}; global batch {self.global_batch} = micro "
                          f"{self.micro} × accumulation {self.accumulation} × {run.world} rank(s)")
        return train_loader(dataset, sampler, self.recipe.data.num_workers, run.samples.track)

    def draw(self, batches: TrainBatches) -> dict:
        """The next micro-batch, tagged with the data position after it (every rank's share counted)."""
        batch = next(batches)
        self.state.samples_consumed += self.micro * self.run.world
        batch["position"] = self.state.samples_consumed
        return batch

    def save(self) -> None:
        """Collective: checkpoint the current step, unless it already is."""
        if self.state.step == self.saved_step:
            return
        path = checkpoint.save(self.engine, self.run.run_dir, self.state.step, self.state.to_dict(),
                               self.recipe.checkpoint.keep_last)
        self.saved_step = self.state.step
        self.run.monitor.print(f"step {self.state.step}: checkpoint {path}")

    def log(self, window: LogWindow) -> None:
        """Collective: the window's scalars, averaged over its steps and over ranks."""
        run, state = self.run, self.state
        names = sorted(window.terms)
        sums = distributed.sum_over_ranks([window.loss, window.samples, *[window.terms[n] for n in names]],
                                          run.device)
        per_step = window.steps * run.world
        elapsed = max(time.time() - window.start, 1e-9)
        scalars = {"loss/total": sums[0] / per_step,
                   **{f"loss/{n}": v / per_step for n, v in zip(names, sums[2:])},
                   "train/lr": self.engine.get_lr()[0],
                   "train/samples_per_s": sums[1] / elapsed,
                   "train/skipped_samples": state.skipped_samples,
                   "train/skipped_steps": state.skipped_steps,
                   **{f"data/skipped/{reason}": n for reason, n in state.skipped_by_reason.items()}}
        grad_norm = self.engine.get_global_grad_norm()
        if grad_norm is None:
            grad_norm = window.grad_norm
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
        window.reset()


@dataclass
class LogWindow:
    """This rank's sums over the steps since the last log line."""

    loss: float = 0.0
    terms: dict[str, float] = field(default_factory=dict)
    samples: int = 0
    steps: int = 0
    grad_norm: float | None = None  # the latest measured one
    start: float = field(default_factory=time.time)

    def add(self, result: StepResult) -> None:
        """Count an applied step."""
        self.loss += result.loss
        for name, value in result.terms.items():
            self.terms[name] = self.terms.get(name, 0.0) + value
        self.samples += result.samples
        self.steps += 1
        if result.grad_norm is not None:
            self.grad_norm = result.grad_norm

    def reset(self) -> None:
        """Start the next window now."""
        self.__init__()


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
