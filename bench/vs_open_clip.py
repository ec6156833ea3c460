"""tinyclip-ds stage 2 against open_clip's own distillation (``open_clip_train.main
--distill-model``), same work, side by side.

Same work for both: a tiny open_clip teacher (256 wide x 6 layers, 64 px, patch 16, context 32,
random weights from a local file), a student 128 wide x 2 layers x 2 heads (random init), the
same image-caption pairs (PNG files + a ``filepath,title`` CSV), batch 64, fp32, one process, one
loader worker, contrastive + logit distillation, no evaluation, one checkpoint at the end. Each
program is run for N and for 2N steps, alternately, for several rounds; the steady-state rate
N*64 / (t(2N) - t(N)) of wall times leaves start-up and exit out. Also our feature-cache
accumulation (micro 16 x 4 = 64): open_clip refuses distillation with ``--accum-freq > 1``
(``assert args.accum_freq == 1`` in open_clip_train/main.py).

    pip install -e .[bench]
    python bench/vs_open_clip.py                 # N=32, 3 rounds, 2,048 pairs
    python bench/vs_open_clip.py --steps 64 --rounds 5 --work-dir /tmp/vs

Goal (issue 13): median ratio ours/open_clip >= 1.0, no round below 0.95.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import psutil
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
BATCH = 64
EMBED = 256
TEACHER = {"embed_dim": EMBED,
           "vision_cfg": {"image_size": 64, "patch_size": 16, "layers": 6, "width": 256},  # heads = 256/64
           "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 256, "heads": 4, "layers": 6}}
# Same embedding width as the teacher: our student's output_dim defaults to the teacher's.
STUDENT = {"embed_dim": EMBED,
           "vision_cfg": {"image_size": 64, "patch_size": 16, "layers": 2, "width": 128},  # heads = 128/64
           "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 128, "heads": 2, "layers": 2}}
LR, WARMUP, WEIGHT_DECAY, CLIP_NORM = 1e-4, 10, 0.05, 1.0
POLL_S = 0.05

# open_clip needs its model configs registered in its own process (open_clip.add_model_config),
# so it is started through this one-liner rather than ``python -m open_clip_train.main``.
OPEN_CLIP_MAIN = ("import sys, open_clip; open_clip.add_model_config(sys.argv[1]); "
                  "from open_clip_train.main import main; main(sys.argv[2:])")
OPEN_CLIP_STEP = re.compile(r"Train Epoch: (\d+) \[\s*(\d+)/(\d+)")
OURS_STEP = re.compile(r"^step (\d+)/(\d+) loss")
OURS_CHECKPOINT = re.compile(r"^step \d+: checkpoint ")
OURS_LOOP_START = re.compile(r"; global batch \d+ = micro")
OURS_DONE = re.compile(r"^done: \d+ steps")


# --------------------------------------------------------------------------- files

def write_inputs(work: Path, pairs: int) -> dict[str, Path]:
    """The open_clip model configs, random teacher weights, PNG/CSV pairs and our recipe under ``work``."""
    configs = work / "configs"
    configs.mkdir(parents=True, exist_ok=True)
    (configs / "bench-teacher.json").write_text(json.dumps(TEACHER, indent=2))
    (configs / "bench-student.json").write_text(json.dumps(STUDENT, indent=2))

    torch.manual_seed(0)
    teacher = _open_clip_model(TEACHER)
    weights = work / "teacher.pt"
    torch.save(teacher.state_dict(), weights)  # a plain state dict: what --distill-pretrained loads

    images = work / "images"
    images.mkdir(exist_ok=True)
    rng = np.random.default_rng(0)
    shapes, colours = ("circle", "square", "stripe", "cloud"), ("red", "green", "blue", "grey")
    table = work / "pairs.csv"
    with table.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["filepath", "title"])
        for i in range(pairs):
            path = images / f"{i:05d}.png"
            Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(path)
            # Absolute paths: open_clip opens them as given (from its working directory).
            writer.writerow([str(path.resolve()),
                             f"a {colours[i % 4]} {shapes[(i // 4) % 4]} number {i} on a plain background"])

    recipe = work / "stage2_vs_open_clip.yaml"
    recipe.write_text(json.dumps({  # JSON is YAML
        "stage": "stage2", "seed": 0,
        "teacher": {"source": "open_clip", "model": str(configs / "bench-teacher.json"),
                    "path": str(weights), "precision": "fp32"},
        "student": {tower: {"width": 128, "layers": 2, "heads": 2, "init": "random"}
                    for tower in ("image", "text")},
        # open_clip's training transform has no RandAugment: leave ours out too (same work).
        "data": {"pairs": [str(table)], "num_workers": 1, "randaugment": False},
        "loss": {"contrastive": 1.0, "affinity": 1.0},
        "train": {"micro_batch": BATCH, "accumulation": 1, "lr": LR, "warmup_steps": WARMUP,
                  "weight_decay": WEIGHT_DECAY, "log_every": 10 ** 9},
        "eval": {"every": 0, "data": "", "zeroshot": ""},
        "checkpoint": {"every": 0, "keep_last": 1},
        "ds_config": "zero0_fp32"}, indent=2))
    return {"configs": configs, "weights": weights, "csv": table, "recipe": recipe}


def _open_clip_model(config: dict) -> torch.nn.Module:
    """A randomly initialised open_clip CLIP of ``config`` (a model-config dict)."""
    from open_clip.model import CLIP

    return CLIP(**config)


def open_clip_command(inputs: dict[str, Path], logs: Path, name: str, epochs: int) -> list[str]:
    """open_clip_train.main distilling the teacher into the student for ``epochs`` epochs."""
    return [sys.executable, "-c", OPEN_CLIP_MAIN, str(inputs["configs"]),
            "--model", "bench-student", "--distill-model", "bench-teacher",
            "--distill-pretrained", str(inputs["weights"]),
            "--train-data", str(inputs["csv"]), "--dataset-type", "csv", "--csv-separator", ",",
            "--csv-img-key", "filepath", "--csv-caption-key", "title",
            "--batch-size", str(BATCH), "--precision", "fp32", "--device", "cpu", "--workers", "1",
            "--epochs", str(epochs), "--lr", str(LR), "--warmup", str(WARMUP), "--wd", str(WEIGHT_DECAY),
            "--grad-clip-norm", str(CLIP_NORM), "--seed", "0",
            "--zeroshot-frequency", "0", "--save-frequency", "0",  # 0: saved only after the last epoch
            "--log-every-n-steps", str(10 ** 9), "--report-to", "",
            "--logs", str(logs), "--name", name]


def ours_command(inputs: dict[str, Path], run_dir: Path, steps: int, micro: int, accumulation: int) -> list[str]:
    """Our stage 2 launcher, one rank (its Python half, as DeepSpeed runs it on each rank)."""
    return [sys.executable, str(ROOT / "launch" / "stage2.sh"), "--recipe", str(inputs["recipe"]),
            "--set", f"run_dir={run_dir}", "--set", f"train.steps={steps}",
            "--set", f"train.micro_batch={micro}", "--set", f"train.accumulation={accumulation}"]


# --------------------------------------------------------------------------- one run

@dataclass
class Run:
    """One finished process: wall time, timestamped output lines, peak RSS of its tree."""
    wall: float
    lines: list[tuple[float, str]] = field(default_factory=list)
    peak_rss: int = 0       # the whole tree, summed
    peak_rss_main: int = 0  # the process started (the training process itself for both programs)

    def first(self, pattern: re.Pattern) -> float | None:
        """Seconds from start to the first line matching ``pattern``."""
        return next((t for t, line in self.lines if pattern.search(line)), None)

    def last(self, pattern: re.Pattern) -> float | None:
        """Seconds from start to the last line matching ``pattern``."""
        return next((t for t, line in reversed(self.lines) if pattern.search(line)), None)


def tree_rss(process: psutil.Process) -> tuple[int, int]:
    """Resident bytes of ``process`` and all its descendants now (shared pages counted in each),
    and of ``process`` alone."""
    total = main = 0
    for p in [process, *process.children(recursive=True)]:
        try:
            rss = p.memory_info().rss
        except psutil.Error:  # ended between listing and reading
            continue
        total += rss
        main = rss if p is process else main
    return total, main


def run(command: list[str], env: dict[str, str], cwd: Path, log: Path) -> Run:
    """Run ``command`` to its end, timestamping each output line on arrival and polling the
    RSS of its process tree; the timestamped output goes to ``log``. Exits the benchmark with
    the output tail if the command fails."""
    start = time.perf_counter()
    process = subprocess.Popen(command, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True, bufsize=1)
    result = Run(wall=0.0)

    def read() -> None:
        for line in process.stdout:
            result.lines.append((time.perf_counter() - start, line.rstrip("\n")))

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    watched = psutil.Process(process.pid)
    while process.poll() is None:
        try:
            total, main = tree_rss(watched)
        except psutil.Error:
            total = main = 0
        result.peak_rss, result.peak_rss_main = max(result.peak_rss, total), max(result.peak_rss_main, main)
        time.sleep(POLL_S)
    result.wall = time.perf_counter() - start
    reader.join()
    log.parent.mkdir(parents=True, exist_ok=True)
    log.write_text("".join(f"{t:9.3f} {line}\n" for t, line in result.lines))
    if process.returncode != 0:
        tail = "\n".join(line for _, line in result.lines[-40:])
        sys.exit(f"failed ({process.returncode}): {' '.join(command)}\n{tail}")
    return result


# --------------------------------------------------------------------------- report

@dataclass
class Program:
    """Every run of one program, by round and step count."""
    name: str
    slug: str  # its log files' prefix
    step_line: re.Pattern
    runs: dict[tuple[int, int], Run] = field(default_factory=dict)

    def rates(self, rounds: int, steps: int) -> list[float]:
        """Steady-state samples/s of each round: N*64 / (t(2N) - t(N))."""
        return [steps * BATCH / (self.runs[r, 2 * steps].wall - self.runs[r, steps].wall) for r in range(rounds)]


def median(values: list[float]) -> float:
    """The median, or NaN for no values."""
    return statistics.median(values) if values else float("nan")


def table(programs: list[Program], rounds: int, steps: int) -> str:
    """The comparison table and the ratios ours/open_clip, as text."""
    base = programs[0].rates(rounds, steps)
    out = [f"{'program':<34} {'samples/s per round':<26} {'median':>7} {'first step s':>13} "
           f"{'fixed s':>8} {'peak RSS MiB tree/main':>23} {'last step->exit s':>18}"]
    for program in programs:
        rates = program.rates(rounds, steps)
        per_step = [BATCH / r for r in rates]
        first = []
        for r in range(rounds):
            for n in (steps, 2 * steps):
                one = program.runs[r, n]
                if program.name.startswith("open_clip"):
                    first.append(one.first(OPEN_CLIP_STEP))
                else:  # ours logs no step before train.log_every: loop start + one steady step
                    start = one.first(OURS_LOOP_START)
                    first.append(None if start is None else start + per_step[r])
        first = [f for f in first if f is not None]
        fixed = [program.runs[r, steps].wall - steps * per_step[r] for r in range(rounds)]
        exits = [one.wall - one.last(program.step_line) for one in program.runs.values()
                 if one.last(program.step_line) is not None]
        rss = (f"{max(one.peak_rss for one in program.runs.values()) / 2 ** 20:.0f}/"
               f"{max(one.peak_rss_main for one in program.runs.values()) / 2 ** 20:.0f}")
        mark = "" if program.name.startswith("open_clip") else "≈"
        out.append(f"{program.name:<34} {' '.join(f'{x:.1f}' for x in rates):<26} {median(rates):>7.1f} "
                   f"{mark + format(median(first), '.2f'):>13} {median(fixed):>8.2f} {rss:>23} "
                   f"{median(exits):>18.2f}")
    if any(t <= 0 for program in programs for t in program.rates(rounds, steps)):
        out.append("warning: t(2N) <= t(N) in some round: noise exceeds N steps' time; use a larger --steps "
                   "on an idle machine")
    out.append("")
    for program in programs[1:]:
        ratios = [o / b for o, b in zip(program.rates(rounds, steps), base)]
        out.append(f"ratio {program.name} / {programs[0].name}: "
                   f"{' '.join(f'{x:.3f}' for x in ratios)}; median {median(ratios):.3f}, "
                   f"spread {min(ratios):.3f}-{max(ratios):.3f}")
    return "\n".join(out)


def our_exit_report(program: Program) -> str:
    """Our runs: last step line -> process exit, and the final checkpoint's share of it."""
    rows = []
    for (r, n), one in sorted(program.runs.items()):
        last, saved, done = one.last(OURS_STEP), one.last(OURS_CHECKPOINT), one.last(OURS_DONE)
        if last is None:
            continue
        write = f"{saved - last:.2f}" if saved is not None else "?"
        after_done = f"{one.wall - done:.2f}" if done is not None else "?"
        rows.append(f"  round {r + 1} {n:>4} steps: exit {one.wall - last:.2f} s after the last step line "
                    f"(checkpoint line {write} s after it; exit {after_done} s after 'done')")
    return f"{program.name} (goal: exit <= 2 s + the checkpoint's write after the last step):\n" + "\n".join(rows)


FOOTNOTES = """\
samples/s: N*64 / (t(2N) - t(N)), t = wall time from process start to exit (start-up, the final
  checkpoint and exit cancel out). ratio > 1: ours faster.
first step s: open_clip: its first "Train Epoch" line (printed after step 1); ours (≈): our
  "training order: ...; global batch" line (printed just before step 1) + one steady-state step, as ours logs
  no step before train.log_every.
fixed s: t(N) - N * steady step time: start-up + final checkpoint + exit, what does not grow with steps.
peak RSS: psutil, polled every 50 ms, max over the runs. tree: the resident sets of the process
  and all its descendants (the loader worker) summed, pages they share counted in each; main: the
  training process alone.
last step->exit: process exit minus the last step's log line (open_clip: its end-of-epoch line).
Losses: both contrastive (InfoNCE, learned scale) + logit distillation; open_clip's distillation
  is KL/CE of the student's logits to the teacher's, each at its own learned logit scale; ours is
  TinyCLIP affinity mimicking at a fixed scale (loss.affinity_logit_scale = 50). Same matrices,
  same cost class.
Text: ours runs both text towers (teacher and student) up to the batch's longest caption, 14 of
  the 32 context tokens here (TextTower.trim_padding: causal towers, so the embeddings are the same);
  open_clip runs all 32.
Optimizer: both torch AdamW; ours fused (one kernel over all parameters), open_clip's default.
Data: open_clip re-creates its loader (and its worker) every epoch (pairs/64 steps); ours streams
  without epoch breaks. Images: open_clip RandomResizedCrop(0.9-1), ours resize + centre crop
  (RandAugment off, as open_clip has none).
open_clip with accumulation: refused with distillation (open_clip_train/main.py:
  'assert args.accum_freq == 1' under 'FIXME: support distillation with grad accum.')."""


def main(argv: list[str] | None = None) -> int:
    """Write the inputs, run both programs alternately, print the table."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=32, help="N: each program runs N and 2N steps")
    parser.add_argument("--rounds", type=int, default=3, help="alternated rounds")
    parser.add_argument("--work-dir", default=None, help="where inputs and runs go (default: a temp dir, removed)")
    parser.add_argument("--no-accumulation", action="store_true", help="skip our micro 16 x 4 row")
    parser.add_argument("--pairs", type=int, default=2048, help=argparse.SUPPRESS)  # small checks only
    args = parser.parse_args(argv)
    per_epoch = args.pairs // BATCH
    if per_epoch < 1 or args.steps < 1 or args.steps % per_epoch:
        parser.error(f"--steps must be a multiple of pairs/{BATCH} = {per_epoch} (open_clip counts whole epochs)")

    work = Path(args.work_dir) if args.work_dir else Path(tempfile.mkdtemp(prefix="vs_open_clip_"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        inputs = write_inputs(work, args.pairs)
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "DS_ACCELERATOR": "cpu"}
        programs = [Program("open_clip --distill-model", "open_clip", OPEN_CLIP_STEP),
                    Program("tinyclip-ds stage 2", "ours", OURS_STEP)]
        if not args.no_accumulation:
            programs.append(Program("tinyclip-ds stage 2, 16 x accum 4", "ours_accum4", OURS_STEP))
        print(f"work dir {work}; torch threads {torch.get_num_threads()}; OMP_NUM_THREADS "
              f"{os.environ.get('OMP_NUM_THREADS', 'unset')}; {args.pairs} pairs; N = {args.steps}", flush=True)
        # Untimed: DeepSpeed builds its CPU communication op on a machine's first run, and the
        # first reads of the inputs come from disk; neither belongs to a round.
        logs = work / "logs"
        run(open_clip_command(inputs, work / "open_clip", "warmup", 1), env, ROOT, logs / "open_clip_warmup.log")
        run(ours_command(inputs, work / "ours" / "warmup", per_epoch, BATCH, 1), env, ROOT, logs / "ours_warmup.log")
        print("warm-up: one epoch of each program, untimed", flush=True)
        for r in range(args.rounds):
            for steps in (args.steps, 2 * args.steps):
                # Rotate who goes first each round, so that no program always runs after the same one.
                order = programs[r % len(programs):] + programs[:r % len(programs)]
                for program in order:
                    tag = f"r{r}_{steps}"
                    if program is programs[0]:
                        command = open_clip_command(inputs, work / "open_clip", tag, steps // per_epoch)
                    else:
                        micro, accumulation = (BATCH, 1) if program is programs[1] else (BATCH // 4, 4)
                        command = ours_command(inputs, work / program.slug / tag, steps, micro, accumulation)
                    one = run(command, env, ROOT, work / "logs" / f"{program.slug}_{tag}.log")
                    program.runs[r, steps] = one
                    print(f"round {r + 1} {program.name:<34} {steps:>4} steps: {one.wall:7.2f} s, "
                          f"peak RSS {one.peak_rss / 2 ** 20:.0f}/{one.peak_rss_main / 2 ** 20:.0f} MiB", flush=True)
        print()
        print(table(programs, args.rounds, args.steps))
        print()
        for program in programs[1:]:
            print(our_exit_report(program))
        print()
        print(FOOTNOTES)
    finally:
        if not args.work_dir:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
