"""Test-side fault injection for every Python process started with this folder on PYTHONPATH.

With ``TINYCLIP_DS_TEST_KILL_DURING_SAVE=RANK:STEP`` in the environment, that rank SIGKILLs
itself while saving the checkpoint of that step, right after its shards are written and flushed
to disk and before the completion barrier: a checkpoint torn the way a dying node tears it.
Python imports ``sitecustomize`` at start-up, and the processes started by ``deepspeed`` and by
``bash launch/*.sh`` inherit the environment, PYTHONPATH included, so every rank gets the hook.

Nothing is imported here: `tinyclip_ds.train.checkpoint` is patched when a process imports it,
so the launcher processes do not pay for importing torch.
"""

import importlib.abc
import importlib.util
import os
import signal
import sys

VARIABLE = "TINYCLIP_DS_TEST_KILL_DURING_SAVE"
TARGET = "tinyclip_ds.train.checkpoint"


def kill_during_save(checkpoint, rank: int, step: int) -> None:
    """Make ``checkpoint.save`` SIGKILL rank ``rank`` once it has flushed its shards of ``step``."""
    from tinyclip_ds import distributed

    # `save` flushes its staging directory last, after every shard of the rank is written.
    flush = checkpoint._flush_to_disk

    def flush_then_die(directory):
        flush(directory)
        run_dir = directory.parent.parent
        if directory == checkpoint.staging_dir(run_dir, step) and distributed.rank() == rank:
            os.kill(os.getpid(), signal.SIGKILL)

    checkpoint._flush_to_disk = flush_then_die


class PatchOnImport(importlib.abc.MetaPathFinder):
    """Finds `TARGET` as Python would, and patches the module once it has been executed."""

    def __init__(self, rank: int, step: int):
        self.rank, self.step = rank, step

    def find_spec(self, name, path, target=None):
        """The ordinary spec of `TARGET`, with a loader that patches the module; None for others."""
        if name != TARGET:
            return None
        sys.meta_path.remove(self)  # the module is imported once; let the ordinary finders find it
        spec = importlib.util.find_spec(name)
        execute = spec.loader.exec_module

        def exec_module(module):
            execute(module)
            kill_during_save(module, self.rank, self.step)

        spec.loader.exec_module = exec_module
        return spec


if os.environ.get(VARIABLE):
    rank, step = (int(part) for part in os.environ[VARIABLE].split(":"))
    sys.meta_path.insert(0, PatchOnImport(rank, step))
