"""Evaluate the shipped demo teacher with the project's Evaluator on 1 or more ranks.

Used by test_eval_exact.py: rank 0 saves the metrics for each ``--batch-sizes`` value to --out.
"""

import argparse
import json

import torch

from tinyclip_ds.data.config import DataConfig
from tinyclip_ds.distributed import init_distributed, shutdown
from tinyclip_ds.eval.config import EvalConfig
from tinyclip_ds.eval.evaluator import Evaluator
from tinyclip_ds.models.config import TeacherConfig
from tinyclip_ds.models.teachers import load_teacher


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--batch-sizes", type=int, nargs="+", required=True)
    parser.add_argument("--local_rank", type=int, default=0)
    args = parser.parse_args()
    rank, _, _ = init_distributed()  # the library's: also frees DeepSpeed's /dev/shm segment
    teacher = load_teacher(TeacherConfig(source="demo"))
    results = {}
    for batch_size in args.batch_sizes:
        cfg = EvalConfig(data="demo:digit_pairs", zeroshot="demo:digits", batch_size=batch_size)
        evaluator = Evaluator(cfg, DataConfig(), teacher.image_size, teacher.image_mean, teacher.image_std,
                              teacher.tokenizer, torch.device("cpu"))
        images = evaluator.image_side(lambda x: teacher.clip.visual(x).embedding)
        texts = evaluator.text_side(lambda ids: teacher.clip.text(ids).embedding)
        results[batch_size] = evaluator.metrics(images, texts)
    if rank == 0:
        with open(args.out, "w") as f:
            json.dump(results, f)
    shutdown()


if __name__ == "__main__":
    main()
