"""Time of one AdamW step over a CLIP student's parameters, torch's three implementations.

The student is ``bench/vs_open_clip.py``'s (both towers 128 wide x 2 layers x 2 heads, 64 px,
patch 16, context 32, CLIP's 49,408-token vocabulary: 7.3M parameters in 62 tensors), with
the parameter groups training uses (`tinyclip_ds.train.optim.parameter_groups`) and random
gradients. Training builds the fused one (`build_optimizer`).

    python bench/optimizer_step.py                # 2 threads, median of 30 steps
    python bench/optimizer_step.py --threads 1 --repeats 50
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from tinyclip_ds.models.transformer import Clip, TowerShape
from tinyclip_ds.train.optim import parameter_groups

IMPLEMENTATIONS = {"default (for-loop on the CPU)": {}, "foreach": {"foreach": True}, "fused": {"fused": True}}


def student() -> Clip:
    """The comparison's student, randomly initialised."""
    common = dict(width=128, layers=2, heads=2, mlp_width=512, output_dim=256, act="gelu")
    return Clip(TowerShape(image_size=64, patch_size=16, **common),
                TowerShape(vocab_size=49408, context_length=32, **common))


def step_ms(model: Clip, options: dict, warmup: int, repeats: int) -> float:
    """Median milliseconds of ``AdamW(**options).step()`` over ``model``'s parameters."""
    for parameter in model.parameters():
        parameter.grad = torch.randn_like(parameter)
    optimizer = torch.optim.AdamW(parameter_groups(model, 0.05), lr=1e-4, betas=(0.9, 0.98), eps=1e-6, **options)
    for _ in range(warmup):
        optimizer.step()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        optimizer.step()
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=30)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = student()
    count = sum(p.numel() for p in model.parameters())
    tensors = len(list(model.parameters()))
    print(f"torch {torch.__version__}, {args.threads} threads, {count / 1e6:.2f}M parameters in {tensors} "
          f"tensors, median of {args.repeats}")
    print(f"{'AdamW':<30} {'ms per step':>12}")
    for name, options in IMPLEMENTATIONS.items():
        print(f"{name:<30} {step_ms(model, options, args.warmup, args.repeats):>12.1f}")


if __name__ == "__main__":
    main()
