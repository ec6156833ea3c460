"""How big and how fast a student is next to its teacher (``tinyclip-ds speed``).

For the teacher and the student of a recipe, per tower (image, text) and for the whole model
(both towers), `measure` reports:

- ``params``: stored parameters. A weight-share student stores its unique blocks once;
  ``params_unrolled`` is what the same tower has with every repeat written as its own block
  (what an exported, unrolled student holds). Equal for towers without weight sharing.
- ``gflops``: GFLOPs of one sample's forward pass (``flops``: the exact count), counted by
  PyTorch's own ``torch.utils.flop_counter.FlopCounterMode`` on a real forward at batch 1 (a
  weight-share tower runs, and is counted at, its effective depth). Matrix products and
  convolutions are counted (2 per multiply-add); element-wise ops, norms and softmax are not.
- ``latency_ms``: median wall time of a forward at batch 1 over ``repeats`` timed runs after
  ``warmup`` untimed ones (``latency_ms_min``: the fastest).
- ``throughput``: samples per second at ``batch_size`` (the batch size over the median time
  of a batch, ``batch_ms``).

The ``model`` entry adds the two towers, run one after the other as CLIP encodes an image and a
caption: parameters, FLOPs and latencies add up, its throughput is pairs per second
(1 / (1/image + 1/text)). Inputs are random (images of the tower's size; texts filling the
whole context, as a CLIP text tower always computes). The report's JSON (``--out``) is::

    {"source", "recipe", "stage", "trained_towers", "teacher_source", "student_weights",
     "settings": {"device", "device_name", "precision", "threads", "batch_size", "warmup",
                  "repeats", "torch"},
     "teacher" | "student": {"image" | "text": {"params", "params_unrolled", "width", "heads",
                                                "layers", "repeat", "depth", "flops", "gflops",
                                                "latency_ms", "latency_ms_min", "batch_ms",
                                                "throughput"},
                             "model": {"params", "params_unrolled", "flops", "gflops",
                                       "latency_ms", "throughput"}},
     "ratio": {"image" | "text" | "model": {"params", "gflops", "speedup_latency",
                                            "speedup_throughput"}}}

``ratio`` is student / teacher for sizes and teacher / student time for the speed-ups.
Speed needs no trained weights: a teacher whose weights file is absent can be built with random
weights from an open_clip model config (``--teacher-shape``).
"""

from __future__ import annotations

import os
import platform
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from tinyclip_ds.config import RecipeError
from tinyclip_ds.models.config import TeacherConfig
from tinyclip_ds.models.students import Tower, build_students, tower_of, tower_parameter_shapes
from tinyclip_ds.models.teachers import (DEMO_TEACHER_PATH, PRECISIONS, load_teacher, open_clip_config,
                                         open_clip_shapes)
from tinyclip_ds.models.transformer import Clip, VisionTower
from tinyclip_ds.progress import progress
from tinyclip_ds.recipe import Recipe, load_recipe

KINDS = ("image", "text")
MODELS = ("teacher", "student")


@dataclass
class Settings:
    """How the towers are timed."""
    device: str = "cpu"
    precision: str = "fp32"
    threads: int = 0            # 0 = PyTorch's default
    batch_size: int = 32
    warmup: int = 3
    repeats: int = 10


# --------------------------------------------------------------------------- what is measured

def resolve_source(source: str | Path, overrides: Sequence[str] = ()) -> tuple[Recipe, Path | None]:
    """``(recipe, checkpoint or None)`` of a recipe file, a run directory (its recipe.yaml) or a
    checkpoint directory (its recipe; its student weights are then used)."""
    from tinyclip_ds.train import checkpoint
    from tinyclip_ds.train.records import RECIPE, recipe_of

    path = Path(source)
    if path.is_file():
        return load_recipe(path, list(overrides)), None
    if path.is_dir() and checkpoint.is_complete(path):
        recipe_path = recipe_of(path)
        if not recipe_path.is_file():
            raise RecipeError(f"{path}: a checkpoint without a recipe.yaml (neither its own nor its run's)")
        return load_recipe(recipe_path, list(overrides)), path
    if path.is_dir() and (path / RECIPE).is_file():
        return load_recipe(path / RECIPE, list(overrides)), None
    raise RecipeError(f"{source}: not a recipe file, a run directory (with recipe.yaml) or a "
                      f"complete checkpoint directory")


def missing_teacher_file(cfg: TeacherConfig) -> Path | None:
    """The teacher's weights file or directory when it does not exist (None when it does, and
    for an open_clip pretrained tag, which open_clip resolves itself)."""
    if cfg.source == "demo":
        path = Path(cfg.path or DEMO_TEACHER_PATH)
    elif not cfg.path:
        return Path("''")
    else:
        path = Path(cfg.path)
        if cfg.source == "open_clip" and not path.exists() and "/" not in cfg.path and path.suffix == "":
            return None  # a tag such as laion2b_s34b_b79k
    return None if path.exists() else path


def build_teacher(recipe: Recipe, teacher_shape: str | None) -> tuple[Clip, str]:
    """``(teacher clip, description)``: the recipe's teacher, or with ``teacher_shape`` (an
    open_clip model name or model-config JSON) that architecture with random weights."""
    if teacher_shape:
        try:
            vision, text = open_clip_shapes(open_clip_config(teacher_shape)[0])
        except (ValueError, FileNotFoundError) as err:
            raise RecipeError(f"--teacher-shape {teacher_shape}: {err}") from None
        return Clip(vision, text).eval(), f"open_clip shape {teacher_shape} (random weights)"
    missing = missing_teacher_file(recipe.teacher)
    if missing is not None:
        cfg = recipe.teacher
        example = cfg.model if cfg.source == "open_clip" and cfg.model else "ViT-B-32"
        raise RecipeError(f"teacher.path: the teacher's weights {missing} do not exist; speed needs only "
                          f"its architecture: pass --teacher-shape MODEL (an open_clip model name such "
                          f"as {example}, or a model-config JSON) to time random weights of that shape")
    teacher = load_teacher(recipe.teacher)
    cfg = recipe.teacher
    return teacher.clip, " ".join(filter(None, (cfg.source, cfg.model, cfg.path or "shipped weights")))


def build_models(recipe: Recipe, teacher_shape: str | None = None,
                 checkpoint_path: Path | None = None) -> tuple[dict[str, dict[str, Tower]], dict]:
    """``({"teacher"|"student": {"image"|"text": tower}}, notes)``: the teacher's towers and the
    students of both kinds built as training builds them, with a checkpoint's student weights
    loaded when one is given. ``notes`` (``teacher_source``, ``student_weights``) says where the
    teacher and the student weights come from."""
    teacher, teacher_note = build_teacher(recipe, teacher_shape)
    students = build_students(recipe.student, teacher, KINDS, recipe.seed)
    weights_note = "initialised as the recipe says (student.*.init; weights do not change speed)"
    if checkpoint_path is not None:
        load_checkpoint_students(checkpoint_path, recipe, {k: s.tower for k, s in students.items()})
        weights_note = f"checkpoint {checkpoint_path} ({', '.join(recipe.towers)})"
    towers = {"teacher": {kind: tower_of(teacher, kind) for kind in KINDS},
              "student": {kind: students[kind].tower for kind in KINDS}}
    return towers, {"teacher_source": teacher_note, "student_weights": weights_note}


def load_checkpoint_students(path: Path, recipe: Recipe, towers: dict[str, Tower]) -> None:
    """Load the student towers a checkpoint holds (the recipe's stage's) into ``towers``."""
    from tinyclip_ds.export import student_state_dict
    from tinyclip_ds.train.consolidate import consolidated_state_dict

    weights = student_state_dict(consolidated_state_dict(path), recipe.stage)
    for kind in recipe.towers:
        prefix = kind + "."
        try:
            towers[kind].load_state_dict({name[len(prefix):]: value for name, value in weights.items()
                                          if name.startswith(prefix)}, strict=True)
        except RuntimeError as err:
            first = str(err).strip().splitlines()[-1].strip()
            raise RecipeError(f"{path}: its student.{kind} weights do not fit the recipe's student "
                              f"({first}); drop the --set overrides that change its shape") from None


# --------------------------------------------------------------------------- counting and timing

def example_input(tower: Tower, batch: int, device: str | torch.device = "cpu",
                  dtype: torch.dtype = torch.float32) -> Tensor:
    """A random input batch for ``tower``: normalised images of its size, or token ids filling its
    whole context and ending with the token it pools at."""
    s = tower.shape
    generator = torch.Generator().manual_seed(0)
    if isinstance(tower, VisionTower):
        return torch.randn(batch, 3, s.image_size, s.image_size, generator=generator).to(device, dtype)
    eot = s.eot_token_id if s.eot_token_id is not None else s.vocab_size - 1
    # Ordinary tokens stay below the end-of-text id, so argmax pooling (eot_token_id None) finds it.
    ids = torch.randint(0, max(1, min(eot, s.vocab_size - 1)), (batch, s.context_length), generator=generator)
    ids[ids == eot] = 0
    ids[:, -1] = eot
    return ids.to(device)


def count_flops(tower: nn.Module, inputs: Tensor) -> int:
    """FLOPs of ``tower(inputs)`` as PyTorch's FlopCounterMode counts them.

    Counted with the math attention backend: the counter has no formula for the fused CPU
    attention kernel (it would count attention as 0), and the math path runs the same two
    matrix products per head that the counter's fused-kernel formulas count on GPUs."""
    with torch.inference_mode(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        tower(inputs)
    return counter.get_total_flops()


def parameter_counts(tower: Tower) -> tuple[int, int]:
    """``(stored, unrolled)`` parameter counts: unrolled as if every repeat of a weight-share
    tower were its own block."""
    stored = sum(p.numel() for p in tower.parameters())
    kind = "image" if isinstance(tower, VisionTower) else "text"
    unrolled_shape = tower.shape.replace(layers=tower.shape.depth, repeat=1)
    shapes = tower_parameter_shapes(kind, unrolled_shape)
    unrolled = sum(torch.Size(shape).numel() for shape in shapes.values())
    return stored, unrolled


def time_calls(fn: Callable[[], object], warmup: int, repeats: int, sync: Callable[[], None],
               tick: Callable[[], None] = lambda: None) -> list[float]:
    """Seconds of each of ``repeats`` calls of ``fn`` after ``warmup`` untimed ones; ``sync``
    waits for the device, so asynchronous (CUDA) work is inside the time it belongs to."""
    for _ in range(warmup):
        fn()
        tick()
    sync()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
        tick()
    return times


def device_name(device: str) -> str:
    """The accelerator's or CPU's model name, for the report."""
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(device))
    try:
        with open("/proc/cpuinfo") as f:
            names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
    except OSError:
        names = []
    name = names[0] if names else (platform.processor() or platform.machine())
    return f"{name} ({os.cpu_count()} logical cores)"


def check_settings(settings: Settings) -> None:
    """Refuse settings this machine cannot run, naming the option."""
    if settings.device.startswith("cuda") and not torch.cuda.is_available():
        raise RecipeError("--device cuda: no CUDA device is available here; use --device cpu")
    if settings.precision not in PRECISIONS:
        raise RecipeError(f"--precision {settings.precision}: expected one of {', '.join(PRECISIONS)}")
    if settings.batch_size < 1 or settings.repeats < 1 or settings.warmup < 0:
        raise RecipeError("--batch-size and --repeats must be >= 1 and --warmup >= 0")


def measure(towers: dict[str, dict[str, Tower]], settings: Settings) -> dict:
    """Parameters, FLOPs, latency and throughput of every tower (see the module docstring), with
    the whole-model sums and the student/teacher ratios."""
    check_settings(settings)
    if settings.threads:
        torch.set_num_threads(settings.threads)
    dtype = PRECISIONS[settings.precision]
    on_cuda = settings.device.startswith("cuda")
    sync = (lambda: torch.cuda.synchronize(settings.device)) if on_cuda else (lambda: None)
    calls = len(MODELS) * len(KINDS) * 2 * (settings.warmup + settings.repeats)
    report: dict = {}
    with progress(total=calls, desc="speed", unit="forward") as bar:
        for model in MODELS:
            report[model] = {}
            for kind in KINDS:
                tower = towers[model][kind].to(settings.device, dtype).eval()
                report[model][kind] = _measure_tower(tower, settings, dtype, sync, bar, f"{model} {kind}")
            report[model]["model"] = _whole_model(report[model]["image"], report[model]["text"])
    report["ratio"] = {part: _ratio(report["teacher"][part], report["student"][part])
                       for part in (*KINDS, "model")}
    return report


def _measure_tower(tower: Tower, settings: Settings, dtype: torch.dtype, sync, bar, desc: str) -> dict:
    stored, unrolled = parameter_counts(tower)
    s = tower.shape
    flops = count_flops(tower, example_input(tower, 1, settings.device, dtype))
    entry = {"params": stored, "params_unrolled": unrolled, "width": s.width, "heads": s.heads,
             "layers": s.layers, "repeat": s.repeat, "depth": s.depth, "flops": flops,
             "gflops": flops / 1e9}
    with torch.inference_mode():
        for batch, key in ((1, "latency"), (settings.batch_size, "batch")):
            bar.set_description(f"{desc} batch {batch}")
            inputs = example_input(tower, batch, settings.device, dtype)
            times = time_calls(lambda: tower(inputs), settings.warmup, settings.repeats, sync, bar.update)
            median = statistics.median(times)
            if key == "latency":
                entry["latency_ms"], entry["latency_ms_min"] = 1e3 * median, 1e3 * min(times)
            else:
                entry["batch_ms"], entry["throughput"] = 1e3 * median, batch / median
    return entry


def _whole_model(image: dict, text: dict) -> dict:
    return {"params": image["params"] + text["params"],
            "params_unrolled": image["params_unrolled"] + text["params_unrolled"],
            "flops": image["flops"] + text["flops"], "gflops": image["gflops"] + text["gflops"],
            "latency_ms": image["latency_ms"] + text["latency_ms"],
            "throughput": 1.0 / (1.0 / image["throughput"] + 1.0 / text["throughput"])}


def _ratio(teacher: dict, student: dict) -> dict:
    return {"params": student["params"] / teacher["params"],
            "gflops": student["gflops"] / teacher["gflops"],
            "speedup_latency": teacher["latency_ms"] / student["latency_ms"],
            "speedup_throughput": student["throughput"] / teacher["throughput"]}


def speed_report(source: str | Path, settings: Settings, overrides: Sequence[str] = (),
                 teacher_shape: str | None = None) -> dict:
    """The full report (JSON-ready) of ``tinyclip-ds speed SOURCE``."""
    recipe, checkpoint_path = resolve_source(source, overrides)
    check_settings(settings)
    towers, notes = build_models(recipe, teacher_shape, checkpoint_path)
    results = measure(towers, settings)
    return {"source": str(source), "recipe": recipe.name, "stage": recipe.stage,
            "trained_towers": list(recipe.towers), **notes,
            "settings": {"device": settings.device, "device_name": device_name(settings.device),
                         "precision": settings.precision, "threads": torch.get_num_threads(),
                         "batch_size": settings.batch_size, "warmup": settings.warmup,
                         "repeats": settings.repeats, "torch": torch.__version__},
            **results}


# --------------------------------------------------------------------------- the table

def format_report(report: dict) -> str:
    """The report as a terminal table, teacher and student per tower and for the whole model."""
    st = report["settings"]
    header = ("tower", "model", "params", "depth", "GFLOPs", "latency ms", "samples/s",
              "× params", "× GFLOPs", "speed-up b1", f"speed-up b{st['batch_size']}")
    rows = [header]
    for part in (*KINDS, "model"):
        for model in MODELS:
            e = report[model][part]
            params = _millions(e["params"])
            if e["params_unrolled"] != e["params"]:
                params += f" ({_millions(e['params_unrolled'])} unrolled)"
            depth = "" if part == "model" else (str(e["depth"]) if e["repeat"] == 1
                                                 else f"{e['depth']} ({e['layers']}×{e['repeat']})")
            r = report["ratio"][part]
            ratios = (("", "", "", "") if model == "teacher" else
                      (f"{r['params']:.2f}", f"{r['gflops']:.2f}", f"{r['speedup_latency']:.2f}×",
                       f"{r['speedup_throughput']:.2f}×"))
            rows.append((part, model, params, depth, f"{e['gflops']:.3g}", f"{e['latency_ms']:.1f}",
                         f"{e['throughput']:.1f}", *ratios))
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    table = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
    untrained = [kind for kind in KINDS if kind not in report["trained_towers"]]
    notes = [f"speed of {report['recipe']} ({report['stage']}); teacher: {report['teacher_source']}; "
             f"student weights: {report['student_weights']}",
             f"{st['device']} ({st['device_name']}), {st['precision']}, {st['threads']} threads; "
             f"latency = median of {st['repeats']} forwards at batch 1, samples/s at batch "
             f"{st['batch_size']}, after {st['warmup']} warm-up forwards each; GFLOPs per sample "
             f"(torch FlopCounterMode)"]
    if untrained:
        notes.append(f"the {' and '.join(untrained)} student is student.{untrained[0]}'s shape "
                     f"(this {report['stage']} recipe does not train it)")
    notes.append("model = both towers one after the other (an image and a caption; samples/s = pairs/s)")
    return "\n".join([notes[0], notes[1], *table, *notes[2:]])


def _millions(n: int) -> str:
    return f"{n / 1e6:.2f}M"
