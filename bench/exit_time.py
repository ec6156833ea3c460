"""How long a training run takes from its last step to process exit.

Runs a command (by default the digits demo's stage 2 for a few steps, evaluation off), time-stamps
every line it prints as it arrives, and reports the times of the last step line, the final
checkpoint line and the ``done:`` line against the moment the process (and, under the
``deepspeed`` launcher, every rank) has exited. Goal (issue 13): exit ≤ 2 s after the last step
plus the final checkpoint's write time, i.e. ``done: → exit`` well under 2 s.

    python bench/exit_time.py --steps 4 --workers 0 --repeats 3
    python bench/exit_time.py --steps 4 --workers 1 --repeats 3 --launcher deepspeed
    python bench/exit_time.py --steps 4 --workers 1 --repeats 3 --launcher bash

Launchers: ``python`` runs the script's Python half as one rank; ``deepspeed`` is
``deepspeed --num_gpus 1 launch/stage2.sh`` (DeepSpeed's runner and per-node launcher add their
own exit time: their 1 s poll and their own interpreter teardown); ``bash`` is
``bash launch/stage2.sh`` (our supervisor, tinyclip_ds/launch.py, which replaces DeepSpeed's
per-node launcher once the ranks run).

Each run goes to a fresh run directory under ``--work`` (removed afterwards).
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

MARKERS = {"last step": re.compile(r"^step (\d+)/\1 "), "checkpoint": re.compile(r"^step \d+: checkpoint "),
           "done": re.compile(r"^done: ")}


def command(args: argparse.Namespace, run_dir: Path, port: int) -> list[str]:
    """The stage-2 demo command for one measured run."""
    sets = [f"run_dir={run_dir}", f"train.steps={args.steps}", "eval.every=0", "eval.data=",
            "eval.zeroshot=", f"data.num_workers={args.workers}", "student.image.init_from=",
            "student.text.init_from=", "train.log_every=1"]
    tail = [x for s in sets for x in ("--set", s)]
    if args.launcher == "deepspeed":
        return ["deepspeed", "--num_gpus", "1", "--master_port", str(port), args.script, *tail]
    if args.launcher == "bash":
        return ["bash", args.script, *tail]  # NUM_GPUS and MASTER_PORT: see main
    return [sys.executable, args.script, *tail]


def measure(cmd: list[str], env: dict) -> dict[str, float]:
    """Seconds from each marker line to process exit (and the whole wall time) for one run."""
    start = time.monotonic()
    seen: dict[str, float] = {}
    process = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    lines = []
    for line in process.stdout:
        now = time.monotonic()
        # The launcher prefixes rank output with "[rank0]:" in some versions; strip such prefixes.
        text = re.sub(r"^\[?rank\d+\]?:\s*", "", line.rstrip("\n"))
        lines.append(text)
        for name, pattern in MARKERS.items():
            if pattern.search(text):
                seen[name] = now
    code = process.wait()
    end = time.monotonic()
    if code != 0 or "done" not in seen:
        sys.stderr.write("\n".join(lines[-30:]) + "\n")
        raise SystemExit(f"run failed (exit {code}): {' '.join(cmd)}")
    return {**{f"{name} → exit": end - t for name, t in seen.items()}, "wall": end - start}


def main() -> None:
    """Measure and print the median (min–max) of each interval over the repeats."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--workers", type=int, default=0, help="data.num_workers")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--launcher", choices=("python", "deepspeed", "bash"), default="python")
    parser.add_argument("--script", default="launch/stage2.sh", help="the stage-2 launcher file")
    parser.add_argument("--port", type=int, default=29731, help="first --master_port (one per repeat)")
    parser.add_argument("--work", default="runs/exit_time")
    args = parser.parse_args()
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "DS_ACCELERATOR": os.environ.get("DS_ACCELERATOR", "cpu")}
    results: dict[str, list[float]] = {}
    for repeat in range(args.repeats):
        run_dir = Path(args.work) / f"run{repeat}"
        shutil.rmtree(run_dir, ignore_errors=True)
        env.update(NUM_GPUS="1", MASTER_PORT=str(args.port + repeat))  # read by the bash launcher
        for name, value in measure(command(args, run_dir, args.port + repeat), env).items():
            results.setdefault(name, []).append(value)
        shutil.rmtree(run_dir, ignore_errors=True)
    how = {"python": "python", "deepspeed": "deepspeed --num_gpus 1", "bash": "bash"}[args.launcher]
    how = f"{how} {args.script}"
    print(f"{how}, {args.steps} steps, data.num_workers={args.workers}, {args.repeats} runs: "
          "seconds, median (min–max)")
    for name, values in results.items():
        print(f"  {name:<20} {statistics.median(values):6.2f}  ({min(values):.2f}–{max(values):.2f})")


if __name__ == "__main__":
    main()
