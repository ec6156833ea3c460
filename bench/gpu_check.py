"""The Python half of ``bench/gpu_check.sh``: one prepared check of the real training code on a
lent GPU (one H100/H200, no network), or with ``--tiny`` the same code path on the CPU in seconds.

Four sub-commands, each its own process (so every stage gets a fresh process group and its own
GPU memory peak); the shell script runs them in this order and stops at the first failure:

    python bench/gpu_check.py prepare --out DIR [--tiny]    # teacher, images, pairs, recipes
    python bench/gpu_check.py stage stage1_image --out DIR [--set k=v ...]
    python bench/gpu_check.py stage stage2 --out DIR [--set k=v ...]
    python bench/gpu_check.py report --out DIR [--peak-tflops X]

The work (full size):

- teacher: open_clip ``ViT-B-16-quickgelu`` with random weights, built with open_clip and saved
  to ``DIR/teacher.safetensors`` (nothing is downloaded), computing in bf16;
- students: the design brief's best image student ``recipes/students/image/w768-l4-h24.yaml``
  and the text student ``recipes/students/text/w512-l4-h8.yaml``;
- data: 2,048 synthetic 224 px JPEGs and a CSV of captions for them;
- stage 1 (image): every intermediate term the head counts allow (24 student vs 12 teacher
  heads: ``attn_scores``/``attn_probs`` need equal counts, so the MiniLM relations stand in) —
  emb, hidden, attn_relation, value_relation, rep_l1/mse/cos/kl/relation, vit_kd — micro batch
  256, bf16, ZeRO-2;
- stage 2: contrastive + affinity + fd at a global batch of 4,096 through feature-cache
  accumulation (micro 256 × 16 on one GPU), bf16, ZeRO-2, the image tower loaded from the
  stage-1 run.

``--tiny`` changes only sizes (a small teacher from an open_clip model-config JSON, small
students with the same head ratio, 32 px images, few steps); the DeepSpeed config stays
zero2_bf16, run on the CPU (``DS_ACCELERATOR=cpu``).

What is measured, per stage (``stage`` writes ``DIR/<stage>.json``; ``report`` prints them):

- ``samples_per_s``: samples of the steps after the warm-up over the wall time from the end of
  the last warm-up step to the end of the last step (data loading, logging included; start-up,
  the final checkpoint excluded). ``compute_samples_per_s``: the same samples over the time
  spent inside the optimizer steps only (the loader's batches already in hand), i.e. what the
  GPU sustains when the input pipeline keeps up.
- ``peak_gpu_memory_gib``: ``torch.cuda.max_memory_allocated`` over the whole run.
- ``mfu``: model FLOP/s over the card's peak dense bf16 FLOP/s. The FLOPs of a sample are
  counted by PyTorch's ``FlopCounterMode`` (matrix products and convolutions; attention through
  the math kernel so it is counted) on real forwards of the run's own modules after training:
  the frozen teacher's forward as the stage calls it, and the forward of what DeepSpeed trains
  (stage 1: the student tower *and* the objective's learned parts — projections, ViTKD
  generator, relation products; stage 2: both student towers, text at the length training runs
  the micro-batch at, up to its longest caption, reported as ``text_tokens``). A training sample costs
  ``teacher + 3 × student`` (backward ≈ 2 × forward). ``hfu`` also counts the work the method
  repeats: stage 2's feature cache runs the student forward once more (``teacher + 4 ×
  student``). Stage 2's batch-level loss (the 4,096² similarity products, ~0.2 % of a step)
  and element-wise work are not counted.
- The peak is taken from the GPU's name (`peak_bf16_flops`; ``--peak-tflops`` overrides):
  H100 SXM and H200 989 TFLOP/s, H100 PCIe 756, H100/H200 NVL 835, A100 312 (dense bf16).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
STAGES = ("stage1_image", "stage2")


@dataclass(frozen=True)
class Profile:
    """The sizes of one check: everything --tiny changes and nothing else."""

    name: str
    teacher: str | dict  # an open_clip model name, or a model config written next to the weights
    image_size: int
    images: int  # synthetic images (each image a pair with one caption in stage 2)
    student: dict  # recipe ``student`` values laid over the shipped fragments (tiny: smaller)
    stage1_micro: int
    stage1_warmup: int
    stage1_measured: int
    stage2_micro: int
    stage2_global: int
    stage2_warmup: int
    stage2_measured: int
    num_workers: int


FULL = Profile(
    name="full", teacher="ViT-B-16-quickgelu", image_size=224, images=2048, student={},
    stage1_micro=256, stage1_warmup=10, stage1_measured=50,
    stage2_micro=256, stage2_global=4096, stage2_warmup=3, stage2_measured=20,
    num_workers=max(1, min(12, (os.cpu_count() or 4) - 2)))

# ViT-B-16-quickgelu's depths and head ratios at small widths: the image student keeps twice the
# teacher's heads (so attention maps are refused and relations used, as at full size) and 4 of
# its 12 layers (the same layer map).
TINY = Profile(
    name="tiny",
    teacher={"embed_dim": 32, "quick_gelu": True,
             "vision_cfg": {"image_size": 32, "patch_size": 8, "layers": 12, "width": 64, "head_width": 16},
             "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 12}},
    image_size=32, images=64,
    student={"image": {"width": 64, "layers": 4, "heads": 8}, "text": {"width": 32, "layers": 4, "heads": 2}},
    stage1_micro=8, stage1_warmup=2, stage1_measured=3,
    stage2_micro=8, stage2_global=32, stage2_warmup=1, stage2_measured=2,
    num_workers=1)

# Peak dense bf16 tensor FLOP/s by GPU name, most specific first (NVIDIA's data sheets).
PEAK_BF16 = (("H100 PCIe", 756e12), ("H100 NVL", 835e12), ("H200 NVL", 835e12), ("H100", 989e12),
             ("H200", 989e12), ("GH200", 989e12), ("A100", 312e12))

STAGE1_TERMS = {"emb": 1.0, "hidden": 1.0, "attn_relation": 1.0, "value_relation": 1.0, "rep_l1": 1.0,
                "rep_mse": 1.0, "rep_cos": 1.0, "rep_kl": 1.0, "rep_relation": 1.0, "vit_kd": 1.0}
STAGE2_TERMS = {"contrastive": 1.0, "affinity": 1.0, "fd": 2000.0}
WORDS = ("red", "blue", "green", "small", "large", "striped", "cat", "dog", "car", "tree", "house",
         "boat", "two", "three", "on", "near", "a", "the", "photo", "of")


# --------------------------------------------------------------------------- prepare

def write_teacher(profile: Profile, out: Path) -> str:
    """Random-weight open_clip teacher weights in ``out``; returns the recipe's teacher.model."""
    import open_clip
    import torch
    from safetensors.torch import save_file

    torch.manual_seed(0)
    if isinstance(profile.teacher, str):
        model, config = profile.teacher, open_clip.get_model_config(profile.teacher)
    else:
        config = profile.teacher
        model = str(out / "teacher.json")
        Path(model).write_text(json.dumps(config))
    clip = open_clip.model.CLIP(config["embed_dim"], config["vision_cfg"], config["text_cfg"],
                                quick_gelu=config.get("quick_gelu", False))
    # fp16 on disk: half the size; the teacher computes in bf16 anyway
    save_file({name: value.detach().half().contiguous() for name, value in clip.state_dict().items()},
              str(out / "teacher.safetensors"))
    return model


def synthetic_image(size: int, seed: int) -> np.ndarray:
    """An RGB image of smooth gradients plus noise (compresses and decodes like a photo, roughly)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:size, 0:size]
    return np.stack([(x * rng.uniform(0.5, 3) + y * rng.uniform(0, 2)) % 256,
                     (y * rng.uniform(0.5, 3)) % 256,
                     rng.integers(0, 256, (size, size))], axis=-1).astype(np.uint8)


def write_data(profile: Profile, out: Path) -> None:
    """``profile.images`` JPEGs in out/images and out/pairs.csv pairing each with a caption."""
    import csv

    from PIL import Image

    images = out / "images"
    images.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    with open(out / "pairs.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["filepath", "title"])
        for i in range(profile.images):
            name = f"images/{i:05d}.jpg"
            Image.fromarray(synthetic_image(profile.image_size, i)).save(out / name, quality=90)
            writer.writerow([name, " ".join(rng.choice(WORDS, size=int(rng.integers(4, 12))))])


def write_recipes(profile: Profile, out: Path, teacher_model: str) -> None:
    """out/recipes/<stage>.yaml: the shipped student fragments, the check's losses and sizes."""
    import yaml

    fragments = ROOT / "recipes" / "students"
    image, text = str(fragments / "image" / "w768-l4-h24.yaml"), str(fragments / "text" / "w512-l4-h8.yaml")
    teacher = {"source": "open_clip", "model": teacher_model, "path": str(out / "teacher.safetensors"),
               "precision": "bf16"}
    common = {"teacher": teacher, "ds_config": "zero2_bf16", "eval": {"every": 0},
              "checkpoint": {"every": 0, "keep_last": 1}}
    stage1_steps = profile.stage1_warmup + profile.stage1_measured
    stage2_steps = profile.stage2_warmup + profile.stage2_measured
    recipes = {
        "stage1_image": {
            "base": [image], "name": "gpu_check_stage1_image", "stage": "stage1_image",
            "run_dir": str(out / "runs" / "stage1_image"),
            "student": {"image": profile.student.get("image", {})},
            "data": {"images": [str(out / "images")], "num_workers": profile.num_workers},
            "loss": STAGE1_TERMS,
            # log once, at the end: the measured window holds no extra collective
            "train": {"micro_batch": profile.stage1_micro, "steps": stage1_steps, "lr": 5.0e-4,
                      "warmup_steps": stage1_steps, "log_every": stage1_steps}},
        "stage2": {
            "base": [image, text], "name": "gpu_check_stage2", "stage": "stage2",
            "run_dir": str(out / "runs" / "stage2"),
            "student": {"image": {**profile.student.get("image", {}), "init_from": str(out / "runs" / "stage1_image")},
                        "text": profile.student.get("text", {})},
            "data": {"pairs": [str(out / "pairs.csv")], "num_workers": profile.num_workers},
            "loss": STAGE2_TERMS,
            "train": {"micro_batch": profile.stage2_micro, "global_batch": profile.stage2_global,
                      "steps": stage2_steps, "lr": 1.0e-4, "warmup_steps": stage2_steps,
                      "log_every": stage2_steps}},
    }
    (out / "recipes").mkdir(parents=True, exist_ok=True)
    for stage, recipe in recipes.items():
        (out / "recipes" / f"{stage}.yaml").write_text(
            f"# bench/gpu_check.py ({profile.name}): written by `prepare`\n"
            + yaml.safe_dump({**recipe, **common}, sort_keys=False))


def prepare(profile: Profile, out: Path) -> None:
    """Everything the stages read, written afresh into ``out``."""
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    start = time.perf_counter()
    model = write_teacher(profile, out)
    write_data(profile, out)
    write_recipes(profile, out, model)
    (out / "profile.json").write_text(json.dumps(asdict(profile), indent=2) + "\n")
    print(f"prepared {out} ({profile.name}: teacher {model if profile.name == 'full' else 'tiny config'}, "
          f"{profile.images} images of {profile.image_size} px) in {time.perf_counter() - start:.1f} s",
          flush=True)


# --------------------------------------------------------------------------- one stage

class StepMeter:
    """Wraps a task's ``step`` to time every optimizer step and keep one micro-batch for counting."""

    def __init__(self, task, device):
        import torch

        self.task, self.device = task, device
        self.sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
        self.ends: list[float] = []  # wall time at the end of each step
        self.inside: list[float] = []  # seconds spent in each step
        self.samples: list[int] = []
        self.example: dict | None = None
        self._step = task.step
        task.step = self  # an instance attribute: the Trainer calls task.step(engine, micro_batches)

    def __call__(self, engine, micro_batches):
        """The task's step, timed (the device synchronised before the clock is read)."""
        if self.example is None:
            self.example = micro_batches[0]
        self.sync()
        start = time.perf_counter()
        result = self._step(engine, micro_batches)
        self.sync()
        end = time.perf_counter()
        if result.applied:  # the Trainer retries a skipped step: only applied ones count
            self.ends.append(end)
            self.inside.append(end - start)
            self.samples.append(result.samples)
        return result

    def throughput(self, warmup: int) -> tuple[float, float, int]:
        """(samples/s end to end, samples/s inside the steps, samples measured) after ``warmup`` steps."""
        if len(self.ends) <= warmup:
            raise RuntimeError(f"only {len(self.ends)} applied steps, need more than the {warmup} warm-up ones")
        samples = sum(self.samples[warmup:])
        return (samples / (self.ends[-1] - self.ends[warmup - 1] if warmup else self.ends[-1] - self.ends[0]),
                samples / sum(self.inside[warmup:]), samples)


def count(fn) -> int:
    """FLOPs of ``fn()`` as FlopCounterMode counts them, attention through the math kernel (the
    counter has no formula for the fused CPU kernel; on GPUs the math path is the same products)."""
    import torch
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def sample_flops(task, stage: str, example: dict, rows: int = 2) -> tuple[float, float, int | None]:
    """(teacher, student) forward FLOPs per sample of the stage's own modules, on ``rows`` rows of
    a real micro-batch (two: in-batch terms need a pair), and the text length they were counted
    at: the whole micro-batch's (training cuts the padding after its longest caption)."""
    import torch

    batch = {key: value[:rows] if isinstance(value, torch.Tensor) else value for key, value in example.items()}
    module = task.module
    if stage == "stage1_image":
        inputs = batch["image"].to(task.device)
        request = task.objective.teacher_request
        teacher = count(lambda: task.teacher_forward(inputs, request))
        with torch.no_grad():
            targets = task.teacher_forward(inputs, request)
        student = count(lambda: module(inputs, targets, 0))
        text_tokens = None
    else:
        images, ids = (x[:rows] for x in task.inputs(example, None))
        teacher = count(lambda: (task.teacher_features(images, ids), task.teacher_intermediates(images, ids)))
        with torch.no_grad():
            intermediates = task.teacher_intermediates(images, ids)
        student = count(lambda: module(images, ids, intermediates, 0))
        text_tokens = ids.shape[1]
    n = len(batch["index"])
    return teacher / n, student / n, text_tokens


def peak_bf16_flops(name: str) -> float | None:
    """The card's peak dense bf16 FLOP/s from its name (None when unknown)."""
    for key, flops in PEAK_BF16:
        if key.lower() in name.lower():
            return flops
    return None


def run_stage(stage: str, out: Path, overrides: list[str]) -> dict:
    """Train one stage in this process as `tinyclip_ds.train.loop.train` does, measured."""
    import deepspeed
    import torch

    from tinyclip_ds.recipe import check_paths, check_run_dir, load_recipe
    from tinyclip_ds.speed import device_name
    from tinyclip_ds.train.deepspeed_config import batch_sizes
    from tinyclip_ds.train.loop import Trainer, build_task
    from tinyclip_ds.train.run import prepare as prepare_run

    profile = Profile(**json.loads((out / "profile.json").read_text()))
    warmup = profile.stage1_warmup if stage == "stage1_image" else profile.stage2_warmup
    recipe = load_recipe(out / "recipes" / f"{stage}.yaml", overrides)
    shutil.rmtree(recipe.output_dir, ignore_errors=True)  # our scratch run: always a fresh start
    check_run_dir(recipe)
    check_paths(recipe)
    run = prepare_run(recipe, None)
    task = build_task(run)
    meter = StepMeter(task, run.device)
    if run.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(run.device)
    start = time.perf_counter()
    code = Trainer(run, task).fit()
    wall = time.perf_counter() - start
    if code != 0:
        raise SystemExit(f"gpu_check: {stage} stopped with exit code {code}")
    on_gpu = run.device.type == "cuda"
    peak_memory = torch.cuda.max_memory_allocated(run.device) / 2**30 if on_gpu else None
    samples_per_s, compute_per_s, measured = meter.throughput(warmup)
    teacher, student, text_tokens = sample_flops(task, stage, meter.example)
    micro, accumulation, global_batch = batch_sizes(recipe.train, run.world)
    model = teacher + 3 * student
    hardware = model + (student if stage == "stage2" and accumulation > 1 else 0)  # the cache pass
    name = device_name(str(run.device))
    peak = peak_bf16_flops(name) if on_gpu else None
    result = {
        "stage": stage, "profile": profile.name, "device": name, "ranks": run.world,
        "ds_config": recipe.ds_config, "zero_stage": run.ds_config["zero_optimization"]["stage"],
        "bf16": bool(run.ds_config.get("bf16", {}).get("enabled")),
        "micro_batch": micro, "accumulation": accumulation, "global_batch": global_batch,
        "steps": recipe.train.steps, "warmup_steps": warmup, "measured_samples": measured,
        "samples_per_s": samples_per_s, "compute_samples_per_s": compute_per_s,
        "peak_gpu_memory_gib": peak_memory,
        "teacher_gflops_per_sample": teacher / 1e9, "student_gflops_per_sample": student / 1e9,
        "model_gflops_per_sample": model / 1e9, "hardware_gflops_per_sample": hardware / 1e9,
        "text_tokens": text_tokens,
        "model_tflops_per_s": model * samples_per_s / 1e12,
        "peak_tflops": peak / 1e12 if peak else None,
        "mfu": model * samples_per_s / peak if peak else None,
        "mfu_compute": model * compute_per_s / peak if peak else None,
        "hfu": hardware * samples_per_s / peak if peak else None,
        "loss_terms": sorted(name for name, weight in asdict(recipe.loss).items()
                             if isinstance(weight, float) and weight > 0 and name in {**STAGE1_TERMS, **STAGE2_TERMS}),
        "run_seconds": wall, "torch": torch.__version__, "deepspeed": deepspeed.__version__,
    }
    (out / f"{stage}.json").write_text(json.dumps(result, indent=2) + "\n")
    print(f"gpu_check {stage}: {samples_per_s:.1f} samples/s ({compute_per_s:.1f} inside the steps)", flush=True)
    return result


# --------------------------------------------------------------------------- report

def number(value, spec: str) -> str:
    """``value`` formatted, or n/a when it was not measured (CPU runs have no GPU figures)."""
    return "n/a" if value is None or (isinstance(value, float) and not math.isfinite(value)) else format(value, spec)


def work(result: dict) -> str:
    """What the row trained, in a few words."""
    batch = (f"micro {result['micro_batch']}" if result["accumulation"] == 1 else
             f"batch {result['global_batch']} = {result['micro_batch']} × {result['accumulation']} feature cache")
    precision = "bf16" if result["bf16"] else "fp32"
    return f"{batch}, {precision}, ZeRO-{result['zero_stage']}"


def report(out: Path, peak_tflops: float | None) -> str:
    """The markdown rows (with a header) and one JSON line per stage, from DIR/<stage>.json."""
    results = []
    for stage in STAGES:
        path = out / f"{stage}.json"
        if not path.is_file():
            raise SystemExit(f"gpu_check: {path} is missing: the {stage} run did not finish")
        result = json.loads(path.read_text())
        if peak_tflops:  # the user's peak for a card the table does not know, or to check ours
            peak = peak_tflops * 1e12
            result["peak_tflops"] = peak_tflops
            for key, flops, rate in (("mfu", "model", "samples_per_s"), ("mfu_compute", "model", "compute_samples_per_s"),
                                     ("hfu", "hardware", "samples_per_s")):
                result[key] = result[f"{flops}_gflops_per_sample"] * 1e9 * result[rate] / peak
        results.append(result)
    first = results[0]
    lines = [f"gpu_check ({first['profile']}) on {first['device']}, {first['ranks']} rank(s), torch "
             f"{first['torch']}, DeepSpeed {first['deepspeed']}; assumed peak {number(first['peak_tflops'], '.0f')} TFLOP/s dense bf16",
             "",
             "| stage | work | samples/s | samples/s in steps | peak GPU memory GiB | model TFLOP/s | MFU | MFU in steps | HFU |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        lines.append(f"| {r['stage']} | {work(r)} | {r['samples_per_s']:.1f} | {r['compute_samples_per_s']:.1f} | "
                     f"{number(r['peak_gpu_memory_gib'], '.1f')} | {r['model_tflops_per_s']:.3g} | "
                     f"{number(r['mfu'], '.1%')} | {number(r['mfu_compute'], '.1%')} | {number(r['hfu'], '.1%')} |")
    lines.append("")
    lines += [json.dumps(r, sort_keys=True) for r in results]
    text = "\n".join(lines) + "\n"
    (out / "results.md").write_text(text)
    return text


# --------------------------------------------------------------------------- command line

def main(argv: list[str] | None = None) -> int:
    """The sub-commands the shell script runs; exits non-zero on any failure."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    p = commands.add_parser("prepare", help="write the teacher, the images, the pairs and the recipes")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--tiny", action="store_true", help="CPU-sized shapes (the test suite's)")
    s = commands.add_parser("stage", help="train one stage, measured")
    s.add_argument("stage", choices=STAGES)
    s.add_argument("--out", type=Path, required=True)
    s.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="recipe override (e.g. train.micro_batch=128 on a smaller card)")
    r = commands.add_parser("report", help="print the results as markdown rows and JSON lines")
    r.add_argument("--out", type=Path, required=True)
    r.add_argument("--peak-tflops", type=float, default=None,
                   help="the card's peak dense bf16 TFLOP/s (for cards the name table does not know)")
    args = parser.parse_args(argv)
    out = args.out.resolve()
    if args.command == "prepare":
        prepare(TINY if args.tiny else FULL, out)
    elif args.command == "stage":
        from tinyclip_ds.config import RecipeError

        try:
            run_stage(args.stage, out, args.overrides)
        except RecipeError as error:
            print(f"gpu_check {args.stage}: {error}", file=sys.stderr)
            return 2
    else:
        print(report(out, args.peak_tflops), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
