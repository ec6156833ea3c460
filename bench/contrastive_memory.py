"""Peak memory and throughput of contrastive-correct accumulation (stage 2) on CPU.

Effective contrastive batch 1024 as 64 × 16 feature-cache accumulation, against a plain batch
of 64 (64 negatives) and a plain batch of 1024 (one forward/backward of all 1024), with the
teacher running and ``contrastive + affinity`` on. Tiny towers (the digits-demo shapes with
random weights), one rank, DeepSpeed ZeRO-0 fp32.

Every configuration runs in its own process; peak memory is that process's resident-set peak
(VmHWM) over the timed steps, reported as the whole process and as the increase over the
resident set just before the first timed step (the model, the teacher and the libraries
already loaded).

    python bench/contrastive_memory.py [--samples 4096] [--threads 2]

Each configuration trains on the same number of samples (so plain 64 takes 16× the steps).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import time

CONFIGS = [  # name, micro batch, accumulation, mode
    ("plain 64", 64, 1, "plain"),
    ("feature-cache 64 × 16 = 1024", 64, 16, "feature_cache"),
    ("plain 1024", 1024, 1, "plain"),
]


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def measure(micro: int, accumulation: int, mode: str, samples: int) -> dict:
    """Run in a child process: build everything, warm up one step, then time steps covering
    ``samples`` samples."""
    import torch

    from tinyclip_ds.data.digits import DigitsTokenizer
    from tinyclip_ds.data.digits_teacher import teacher_shapes
    from tinyclip_ds.distill.objectives import LossConfig, Stage2Objective
    from tinyclip_ds.models.teachers import Teacher
    from tinyclip_ds.models.transformer import Clip, TextTower, VisionTower
    from tinyclip_ds.train.deepspeed_config import build_ds_config
    from tinyclip_ds.train.loop import build_engine
    from tinyclip_ds.train.optim import TrainConfig
    from tinyclip_ds.train.run import init_distributed
    from tinyclip_ds.train.stage2 import ContrastiveStep, LogitScale, Stage2Student

    init_distributed()  # the library's: also frees DeepSpeed's /dev/shm segment
    torch.manual_seed(0)
    tokenizer = DigitsTokenizer()
    vision, text = teacher_shapes(tokenizer)
    teacher = Teacher(Clip(vision, text), tokenizer, (0.5,) * 3, (0.5,) * 3)
    student_vision = vision.replace(width=64, layers=2, mlp_width=256)
    student_text = text.replace(width=64, layers=2, mlp_width=256)
    objective = Stage2Objective(LossConfig(contrastive=1.0, affinity=1.0))
    module = Stage2Student(VisionTower(student_vision), TextTower(student_text), LogitScale(10.0, 100.0),
                           {}, objective.student_tokens)
    train = TrainConfig(micro_batch=micro, accumulation=accumulation, warmup_steps=0)
    engine = build_engine(module, build_ds_config("zero0_fp32", {}, train, 1), type("R", (), {"train": train})())
    step = ContrastiveStep(engine, teacher, objective, torch.device("cpu"), accumulation, mode, seed=0)

    generator = torch.Generator().manual_seed(0)
    ids = tokenizer(["a 3 on the left and a 7 on the right"] * micro)

    def batches():
        return [{"image": torch.randn(micro, 3, vision.image_size, vision.image_size, generator=generator),
                 "text": ids, "skipped": 0} for _ in range(accumulation)]

    step(batches(), 0)  # warm-up
    steps = max(1, samples // (micro * accumulation))
    data = [batches() for _ in range(steps)]
    with open("/proc/self/clear_refs", "w") as f:  # reset the peak (VmHWM) to the current RSS
        f.write("5")
    baseline = _status_kib("VmRSS")
    start = time.perf_counter()
    for micro_batches in data:
        step(micro_batches, 0)
    elapsed = time.perf_counter() - start
    peak = _status_kib("VmHWM")
    return {"samples_per_s": steps * micro * accumulation / elapsed, "peak_mib": peak / 1024,
            "increase_mib": (peak - baseline) / 1024}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=4096, help="timed samples per configuration")
    parser.add_argument("--threads", type=int, default=2, help="torch threads")
    parser.add_argument("--child", nargs=3, metavar=("MICRO", "ACCUMULATION", "MODE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        import torch

        torch.set_num_threads(args.threads)
        micro, accumulation, mode = int(args.child[0]), int(args.child[1]), args.child[2]
        print(json.dumps(measure(micro, accumulation, mode, args.samples)))
        return

    rows = []
    for name, micro, accumulation, mode in CONFIGS:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        env = {**os.environ, "RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1",
               "MASTER_PORT": str(port), "DS_ACCELERATOR": "cpu"}
        out = subprocess.run([sys.executable, __file__, "--samples", str(args.samples), "--threads", str(args.threads),
                              "--child", str(micro), str(accumulation), mode],
                             capture_output=True, text=True, env=env, check=True)
        result = json.loads(out.stdout.strip().splitlines()[-1])
        rows.append((name, micro * accumulation, result))

    base = rows[0][2]
    print(f"contrastive + affinity, teacher on, CPU, {args.threads} threads, {args.samples} timed samples each")
    print(f"{'configuration':<30} {'negatives':>9} {'samples/s':>10} {'vs plain 64':>11} "
          f"{'peak MiB':>9} {'vs plain 64':>11} {'peak increase MiB':>18} {'vs plain 64':>11}")
    for name, negatives, r in rows:
        print(f"{name:<30} {negatives:>9} {r['samples_per_s']:>10.1f} {r['samples_per_s'] / base['samples_per_s']:>10.2f}× "
              f"{r['peak_mib']:>9.0f} {r['peak_mib'] / base['peak_mib']:>10.2f}× "
              f"{r['increase_mib']:>18.1f} {r['increase_mib'] / max(base['increase_mib'], 1e-9):>10.2f}×")


if __name__ == "__main__":
    main()
