"""Peak memory and throughput of contrastive-correct accumulation (stage 2) on CPU.

Effective contrastive batch 1024 as 64 × 16 feature-cache accumulation, against one batch of
64 (64 negatives) and one batch of 1024 (one forward/backward of all 1024), with the
teacher running and ``contrastive + affinity`` on. Tiny towers (the digits-demo shapes with
random weights), one rank, DeepSpeed ZeRO-0 fp32.

Every configuration runs in its own process; peak memory is that process's resident-set peak
(VmHWM) over the timed steps, reported as the whole process and as the increase over the
resident set just before the first timed step (the model, the teacher and the libraries
already loaded).

    python bench/contrastive_memory.py [--samples 4096] [--threads 2]

Each configuration trains on the same number of samples (so batch 64 takes 16× the steps).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import time

CONFIGS = [  # name, micro batch, accumulation
    ("batch 64", 64, 1),
    ("feature-cache 64 × 16 = 1024", 64, 16),
    ("batch 1024", 1024, 1),
]


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def measure(micro: int, accumulation: int, samples: int) -> dict:
    """Run in a child process: build everything, warm up one step, then time steps covering
    ``samples`` samples."""
    import torch

    from tinyclip_ds.distill.config import LossConfig
    from tinyclip_ds.distill.objectives import Stage2Objective
    from tinyclip_ds.distributed import init_distributed
    from tinyclip_ds.models.config import TeacherConfig
    from tinyclip_ds.models.teachers import load_teacher
    from tinyclip_ds.models.transformer import TextTower, VisionTower
    from tinyclip_ds.train.config import TrainConfig
    from tinyclip_ds.train.contrastive import Features, contrastive_step
    from tinyclip_ds.train.deepspeed_config import build_ds_config
    from tinyclip_ds.train.engine import build_engine
    from tinyclip_ds.train.stage2 import LogitScale, Stage2Student

    init_distributed()  # the library's: also frees DeepSpeed's /dev/shm segment
    teacher = load_teacher(TeacherConfig(source="demo"))
    tokenizer = teacher.tokenizer
    vision, text = teacher.clip.visual.shape, teacher.clip.text.shape
    torch.manual_seed(0)
    student_vision = vision.replace(width=64, layers=2, mlp_width=256)
    student_text = text.replace(width=64, layers=2, mlp_width=256)
    objective = Stage2Objective(LossConfig(contrastive=1.0, affinity=1.0))
    module = Stage2Student(VisionTower(student_vision), TextTower(student_text), LogitScale(10.0, 100.0),
                           {}, objective.student_tokens)
    train = TrainConfig(micro_batch=micro, accumulation=accumulation, warmup_steps=0)
    engine = build_engine(module, build_ds_config("zero0_fp32", {}, train, 1), train)

    def step(micro_batches: list[dict]) -> None:
        """What the stage-2 task does in a step without stage-1 terms."""
        features = [Features(teacher.image(b["image"]).embedding, teacher.text(b["text"]).embedding)
                    for b in micro_batches]

        def forward(m: int, cache: bool):
            return (engine.module if cache else engine)(micro_batches[m]["image"], micro_batches[m]["text"])

        contrastive_step(engine, forward, objective, features, torch.device("cpu"))

    generator = torch.Generator().manual_seed(0)
    ids = tokenizer(["a 3 on the left and a 7 on the right"] * micro)

    def batches():
        return [{"image": torch.randn(micro, 3, vision.image_size, vision.image_size, generator=generator),
                 "text": ids, "skipped": 0} for _ in range(accumulation)]

    step(batches())  # warm-up
    steps = max(1, samples // (micro * accumulation))
    data = [batches() for _ in range(steps)]
    with open("/proc/self/clear_refs", "w") as f:  # reset the peak (VmHWM) to the current RSS
        f.write("5")
    baseline = _status_kib("VmRSS")
    start = time.perf_counter()
    for micro_batches in data:
        step(micro_batches)
    elapsed = time.perf_counter() - start
    peak = _status_kib("VmHWM")
    return {"samples_per_s": steps * micro * accumulation / elapsed, "peak_mib": peak / 1024,
            "increase_mib": (peak - baseline) / 1024}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=4096, help="timed samples per configuration")
    parser.add_argument("--threads", type=int, default=2, help="torch threads")
    parser.add_argument("--child", nargs=2, metavar=("MICRO", "ACCUMULATION"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        import torch

        torch.set_num_threads(args.threads)
        micro, accumulation = int(args.child[0]), int(args.child[1])
        print(json.dumps(measure(micro, accumulation, args.samples)))
        return

    rows = []
    for name, micro, accumulation in CONFIGS:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        env = {**os.environ, "RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1",
               "MASTER_PORT": str(port), "DS_ACCELERATOR": "cpu"}
        out = subprocess.run([sys.executable, __file__, "--samples", str(args.samples), "--threads", str(args.threads),
                              "--child", str(micro), str(accumulation)],
                             capture_output=True, text=True, env=env, check=True)
        result = json.loads(out.stdout.strip().splitlines()[-1])
        rows.append((name, micro * accumulation, result))

    base = rows[0][2]
    print(f"contrastive + affinity, teacher on, CPU, {args.threads} threads, {args.samples} timed samples each")
    print(f"{'configuration':<30} {'negatives':>9} {'samples/s':>10} {'vs batch 64':>11} "
          f"{'peak MiB':>9} {'vs batch 64':>11} {'peak increase MiB':>18} {'vs batch 64':>11}")
    for name, negatives, r in rows:
        print(f"{name:<30} {negatives:>9} {r['samples_per_s']:>10.1f} {r['samples_per_s'] / base['samples_per_s']:>10.2f}× "
              f"{r['peak_mib']:>9.0f} {r['peak_mib'] / base['peak_mib']:>10.2f}× "
              f"{r['increase_mib']:>18.1f} {r['increase_mib'] / max(base['increase_mib'], 1e-9):>10.2f}×")


if __name__ == "__main__":
    main()
