"""One stage-2 optimizer step on fixed data, run under DeepSpeed on 1 or more ranks.

Used by test_large_batch_equivalence.py: ``deepspeed --num_gpus 2 workers/large_batch.py --out F
--micro 4 --accumulation 4`` versus one rank with ``--micro 32 --accumulation 1``. Rank 0 saves
the gradient every student parameter had at the accumulation boundary and the parameters after
the optimizer step, for each loss term, to F.

``--mode plain`` is the negative control: plain gradient accumulation, each micro-batch
contrasted only with itself (gathered over ranks), which the library does not offer.
"""

import argparse

import torch
from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_grad

from tinyclip_ds.distill.config import LossConfig
from tinyclip_ds.distill.objectives import Stage2Objective
from tinyclip_ds.models.teachers import Teacher
from tinyclip_ds.models.transformer import Clip, TextTower, TowerShape, VisionTower
from tinyclip_ds.train.deepspeed_config import build_ds_config
from tinyclip_ds.distributed import init_distributed, shutdown
from tinyclip_ds.train.config import TrainConfig
from tinyclip_ds.train.contrastive import Features, contrastive_step, direct_step
from tinyclip_ds.train.engine import build_engine
from tinyclip_ds.train.stage2 import LogitScale, Stage2Student, step_text_length, tower_ids
from tinyclip_ds.train.task import StepResult

SAMPLES, VOCAB, CONTEXT = 32, 50, 12
TERMS = {"contrastive": {"contrastive": 1.0}, "affinity": {"affinity": 1.0},
         "filip": {"filip": 1.0, "filip_topk": 0}}


def shapes(width: int) -> tuple[TowerShape, TowerShape]:
    vision = TowerShape(width=width, layers=2, heads=2, mlp_width=2 * width, output_dim=16,
                        image_size=16, patch_size=4)
    text = TowerShape(width=width, layers=2, heads=2, mlp_width=2 * width, output_dim=16,
                      vocab_size=VOCAB, context_length=CONTEXT)
    return vision, text


def data() -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(SAMPLES, 3, 16, 16, generator=generator)
    ids = torch.randint(1, VOCAB - 1, (SAMPLES, CONTEXT), generator=generator)
    eot = torch.randint(3, CONTEXT - 2, (SAMPLES,), generator=generator)  # the longest text is cut too
    positions = torch.arange(CONTEXT)
    ids = torch.where(positions[None] > eot[:, None], 0, ids)  # padding after the end of text
    ids[torch.arange(SAMPLES), eot] = VOCAB - 1  # argmax pooling finds it
    return images, ids


def full(zero_value, plain_value) -> torch.Tensor:
    """DeepSpeed's consolidated value under ZeRO; without ZeRO it returns None: the tensor itself."""
    return (zero_value if zero_value is not None else plain_value).detach().float().clone()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--micro", type=int, required=True)
    parser.add_argument("--accumulation", type=int, required=True)
    parser.add_argument("--mode", default="feature_cache")
    parser.add_argument("--zero", type=int, default=0)
    parser.add_argument("--local_rank", type=int, default=0)
    args = parser.parse_args()
    init_distributed()  # the library's: also frees DeepSpeed's /dev/shm segment
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    images, ids = data()
    # Micro-step m of rank r takes slice k = m·world + r of the global batch (the sampler's order).
    micro_batches = []
    for m in range(args.accumulation):
        k = m * world + rank
        part = slice(k * args.micro, (k + 1) * args.micro)
        micro_batches.append({"image": images[part], "text": ids[part], "skipped": 0})

    torch.manual_seed(0)
    teacher = Teacher(Clip(*shapes(48)), tokenizer=None, image_mean=(0.5,) * 3, image_std=(0.5,) * 3)
    results = {}
    for name, overrides in TERMS.items():
        torch.manual_seed(1)
        vision, text = shapes(32)
        objective = Stage2Objective(LossConfig(**overrides))
        module = Stage2Student(VisionTower(vision), TextTower(text), LogitScale(10.0, 100.0), {},
                               objective.student_tokens)
        # Adam's first step is lr·g/(|g| + eps): with a tiny eps it turns fp32 rounding in
        # gradients that are (nearly) zero — key biases, cancelling sums — into ±lr updates.
        # eps = 1 keeps the update a smooth function of the gradient, so parameters can be compared.
        train = TrainConfig(micro_batch=args.micro, accumulation=args.accumulation, lr=1e-3,
                            warmup_steps=0, weight_decay=0.0, eps=1.0)
        ds_config = build_ds_config("zero0_fp32", {"zero_optimization": {"stage": args.zero},
                                                   "gradient_clipping": 0.0}, train, world)
        engine = build_engine(module, ds_config, train)
        grads = {}
        original_step = engine.step

        def step_and_record():
            if engine.is_gradient_accumulation_boundary():
                for pname, param in engine.module.named_parameters():
                    grads[pname] = full(safe_get_full_grad(param), param.grad)
            original_step()

        engine.step = step_and_record
        # As Stage2Task.step gives them: each micro-batch cut after its own longest text or, with
        # a token-wise term, all after the step's longest over every micro-batch and rank.
        length = step_text_length([batch["text"] for batch in micro_batches], teacher.clip.text, objective,
                                  torch.device("cpu"))
        batches = [{**batch, "text": tower_ids(batch["text"], teacher.clip.text, length)}
                   for batch in micro_batches]
        features = [teacher_features(teacher, batch) if objective.needs_teacher else None
                    for batch in batches]

        def forward(m: int, cache: bool):
            batch = batches[m]
            return (engine.module if cache else engine)(batch["image"], batch["text"])

        if args.mode == "plain":
            result = plain_accumulation(engine, forward, objective, features)
        else:
            result = contrastive_step(engine, forward, objective, features, torch.device("cpu"))
        params = {pname: full(safe_get_full_fp32_param(p), p) for pname, p in engine.module.named_parameters()}
        loss = torch.tensor([result.loss])
        torch.distributed.all_reduce(loss)  # logged losses are rank averages (as the Trainer logs them)
        results[name] = {"grads": grads, "params": params, "loss": loss.item() / world}
    if rank == 0:
        torch.save(results, args.out)
    shutdown()


def teacher_features(teacher: Teacher, batch: dict):
    """The teacher's pooled features of a micro-batch (what affinity needs)."""
    return Features(teacher.image(batch["image"]).embedding, teacher.text(batch["text"]).embedding)


def plain_accumulation(engine, forward, objective, teacher):
    """Each micro-batch its own contrastive batch: the direct step per micro-batch (DeepSpeed
    divides each backward by the accumulation steps, as plain accumulation does)."""
    total = StepResult()
    for m in range(len(teacher)):
        result = direct_step(engine, lambda _, cache, m=m: forward(m, cache), objective, teacher[m],
                             torch.device("cpu"))
        total.loss += result.loss / len(teacher)
    return total


if __name__ == "__main__":
    main()
