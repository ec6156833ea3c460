"""A resumable sampler whose global batches do not depend on the number of ranks.

The sample order is defined once for the whole run by a `GlobalOrder` (weighted mixing of the
sources, a fresh order each epoch, computed on demand), cut into global batches of
``G = micro_batch * accumulation * world_size`` positions (an epoch's incomplete tail is
dropped). Global step ``b`` of the epoch is positions ``b*G .. (b+1)*G - 1``, split into
``G / micro_batch`` slices; micro-step ``m`` of rank ``r`` takes slice ``k = m * world_size + r``.
A run can therefore stop and resume at any global step, on any number of ranks with the same
global batch, and see exactly the same samples, each with the same augmentation (its sample
seed depends on ``(seed, epoch, position)`` only). Data-loader workers receive whole
micro-batches, so the workers of a rank read disjoint samples.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Callable, Iterator

import torch
from torch.utils.data import DataLoader, Dataset

from tinyclip_ds.config import RecipeError
from tinyclip_ds.data.datasets import collate
from tinyclip_ds.data.order import GlobalOrder, mix_seed

SampleKey = tuple[int, int]
"""``(index, sample_seed)``: what a dataset's ``__getitem__`` receives."""


def sample_seed(seed: int, epoch: int, position: int) -> int:
    """The seed of the randomness (augmentation, caption choice) of the sample at ``position``
    of ``epoch``: an up-sampled source's repeats of one sample are augmented differently."""
    return mix_seed(seed, "sample", epoch, position)


class GlobalBatchSampler:
    """Yields this rank's ``(index, sample_seed)`` keys, one list per micro-step, forever,
    starting after ``start_position`` micro-steps (see the module docstring for the order).

    The position counts micro-steps, not optimizer steps, because a step skipped (too few usable
    samples, or a non-finite loss) is tried again on the next micro-batches: step s micro-step m
    is position s·A + m only until the first skip."""

    def __init__(self, order: GlobalOrder, micro_batch: int, accumulation: int, world_size: int,
                 rank: int, start_position: int = 0) -> None:
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world size {world_size}")
        self.order = order
        self.micro_batch = micro_batch
        self.accumulation = accumulation
        self.world_size = world_size
        self.rank = rank
        self.start_position = start_position
        self.global_batch = micro_batch * accumulation * world_size
        self.steps_per_epoch = order.epoch_length // self.global_batch
        if self.steps_per_epoch == 0:
            raise RecipeError(
                f"the training data has {order.epoch_length} samples per epoch, fewer than one global batch of "
                f"{self.global_batch} (train.micro_batch {micro_batch} x accumulation {accumulation} "
                f"x {world_size} ranks); add data or lower 'train.global_batch' / 'train.micro_batch'")

    def epoch_of(self, step: int) -> int:
        """The epoch that global step ``step`` belongs to."""
        return step // self.steps_per_epoch

    def global_batch_indices(self, step: int) -> list[int]:
        """All sample indices of global step ``step``, in slice order ``k`` (any rank, any world size)."""
        start = (step % self.steps_per_epoch) * self.global_batch
        return self.order.indices(self.epoch_of(step), start, start + self.global_batch).tolist()

    def micro_batch_keys(self, step: int, micro_step: int) -> list[SampleKey]:
        """This rank's keys for micro-step ``micro_step`` of global step ``step``."""
        epoch = self.epoch_of(step)
        k = micro_step * self.world_size + self.rank
        start = (step % self.steps_per_epoch) * self.global_batch + k * self.micro_batch
        indices = self.order.indices(epoch, start, start + self.micro_batch).tolist()
        return [(i, sample_seed(self.order.seed, epoch, start + j)) for j, i in enumerate(indices)]

    def __iter__(self) -> Iterator[list[SampleKey]]:
        position = self.start_position
        while True:
            yield self.micro_batch_keys(*divmod(position, self.accumulation))
            position += 1


WORKER_GRACE_S = 60.0
"""How long a data-loader worker that got SIGTERM/SIGINT keeps waiting for work (see `TrainBatches`)."""

_last_sample = [0.0]  # in a worker process: time.monotonic() of its latest sample or signal


def _handle_preemption_signals(worker_id: int) -> None:
    """worker_init_fn: SIGTERM/SIGINT do not stop a worker at once. Schedulers signal every
    process of a job, and the pre-empted rank still needs its workers for the rest of its step
    (it then stops them itself). The worker only exits once its rank is gone or has asked it for
    nothing for `WORKER_GRACE_S` seconds, so no worker outlives an exiting rank for long (at exit
    Python's multiprocessing signals its workers with SIGTERM, then waits for them)."""
    parent = os.getppid()
    watcher = threading.Thread(target=_exit_when_unneeded, args=(parent,), daemon=True)

    def on_signal(signum, frame) -> None:
        _last_sample[0] = time.monotonic()  # the grace period starts now at the earliest
        if watcher.ident is None:  # not started yet
            watcher.start()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)


def _exit_when_unneeded(parent: int) -> None:
    """Exit this worker once ``parent`` is gone or has asked for no sample for `WORKER_GRACE_S`."""
    while os.getppid() == parent and time.monotonic() - _last_sample[0] < WORKER_GRACE_S:
        time.sleep(1.0)
    # No batch is half-sent: the rank is gone or asked for nothing. Status 0, which PyTorch's
    # SIGCHLD check does not treat as a failure; a rank that still asks for a batch is told the
    # worker is gone.
    os._exit(0)


class _NotingSamples(Dataset):
    """``dataset``, noting in each worker when it last produced a sample (for the grace period)."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key):
        _last_sample[0] = time.monotonic()
        return self.dataset[key]


class TrainBatches:
    """This rank's endless collated micro-batches of ``dataset`` in ``sampler``'s order, read by
    ``num_workers`` worker processes (0 = in this process). Worker seeding does not matter: each
    sample's randomness comes from its sample seed. ``on_batch`` sees every batch.

    `close` stops the workers; the training loop calls it on every way out. PyTorch would only
    stop them when its iterator is garbage-collected, which a reference cycle or a traceback
    delays past interpreter exit, where multiprocessing's SIGTERM does not stop them (see
    `_handle_preemption_signals`) and its join would wait for them forever."""

    def __init__(self, dataset: Dataset, sampler: GlobalBatchSampler, num_workers: int,
                 on_batch: Callable[[dict], None] | None = None) -> None:
        self.loader = DataLoader(_NotingSamples(dataset), batch_sampler=sampler, collate_fn=collate,
                                 num_workers=num_workers, pin_memory=torch.cuda.is_available(),
                                 worker_init_fn=_handle_preemption_signals)
        self.on_batch = on_batch
        self._iterator = None  # started at the first batch

    def __iter__(self) -> TrainBatches:
        return self

    def __next__(self) -> dict:
        if self._iterator is None:
            self._iterator = iter(self.loader)
        batch = next(self._iterator)
        if self.on_batch is not None:
            self.on_batch(batch)
        return batch

    def close(self) -> None:
        """Stop the worker processes the way PyTorch does when its iterator is collected: they
        see the done event, finish and exit (PyTorch has no public call for it). Idempotent."""
        iterator, self._iterator = self._iterator, None
        if iterator is not None and hasattr(iterator, "_shutdown_workers"):
            iterator._shutdown_workers()


def train_loader(dataset: Dataset, sampler: GlobalBatchSampler, num_workers: int,
                 on_batch: Callable[[dict], None] | None = None) -> TrainBatches:
    """The training batches of ``dataset`` in ``sampler``'s order (see `TrainBatches`)."""
    return TrainBatches(dataset, sampler, num_workers, on_batch)
