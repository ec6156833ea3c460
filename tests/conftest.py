"""Shared helpers: run real training processes (one rank, or several through DeepSpeed's
launcher) and read back what they wrote."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from tinyclip_ds.config import PROJECT_ROOT

DEEPSPEED = str(Path(sys.executable).with_name("deepspeed"))
FAULT_HOOKS = Path(__file__).parent / "workers" / "fault_hooks"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def kill_during_save(rank: int, step: int) -> dict[str, str]:
    """Environment in which rank ``rank`` of a launch SIGKILLs itself while saving the checkpoint of
    ``step``, after writing its shards (workers/fault_hooks/sitecustomize.py, which every process
    of the launch imports through PYTHONPATH)."""
    path = os.pathsep.join(filter(None, [str(FAULT_HOOKS), os.environ.get("PYTHONPATH", "")]))
    return {"TINYCLIP_DS_TEST_KILL_DURING_SAVE": f"{rank}:{step}", "PYTHONPATH": path}


def launch(stage: str, *args: str, ranks: int = 1, timeout: int = 600, check: bool = True,
           env: dict | None = None) -> subprocess.CompletedProcess:
    """Run a stage launcher the way users do: ``deepspeed --num_gpus N launch/<stage>.sh ARGS``
    (or, for one rank, its Python half directly, as DeepSpeed would run it)."""
    port = free_port()
    if ranks == 1:
        command = [sys.executable, f"launch/{stage}.sh", *args]
    else:
        command = [DEEPSPEED, "--num_gpus", str(ranks), "--master_port", str(port), f"launch/{stage}.sh", *args]
    result = subprocess.run(command, cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=timeout,
                            env={**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1",
                                 **(env or {})})
    if check and result.returncode != 0:
        pytest.fail(f"{' '.join(command)} failed ({result.returncode}):\n{result.stdout[-4000:]}\n"
                    f"{result.stderr[-6000:]}")
    assert not leaked_shared_memory(port), "the run left DeepSpeed's shared-memory segments in /dev/shm"
    return result


def leaked_shared_memory(port: int) -> list[Path]:
    """DeepSpeed's CPU all-reduce segments of the job on ``port`` still in /dev/shm (each ~70 MB
    of RAM until reboot; tinyclip_ds.train.run unlinks them once every rank has mapped them)."""
    return sorted(Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_*_{port}_*"))


def read_metrics(run_dir: Path) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def read_tensorboard(run_dir: Path):
    """(scalars: tag -> [(step, value)], image tags) from the run's TensorBoard event files."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accumulator = EventAccumulator(str(Path(run_dir) / "tensorboard"), size_guidance={"scalars": 0, "images": 0})
    accumulator.Reload()
    tags = accumulator.Tags()
    scalars = {tag: [(e.step, e.value) for e in accumulator.Scalars(tag)] for tag in tags["scalars"]}
    return scalars, tags["images"]
