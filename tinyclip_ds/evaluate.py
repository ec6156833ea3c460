"""``tinyclip-ds eval MODEL``: retrieval and zero-shot numbers of a student (and its teacher) outside training.

MODEL is whatever a student is kept as: a run directory or one of its checkpoints, a
``--format tinyclip`` safetensors file, or a directory exported for open_clip or transformers
(`load_model` tells them apart by what the path holds). Each is turned into a `Model`: two
encoders with the tokenizer and image preprocessing they were trained or exported with. The
evaluation sets are loaded once and embedded by `tinyclip_ds.eval.evaluator.Evaluator`, which
shards every pass over the ranks and gathers the full set before computing metrics, so the
numbers are the same for any number of ranks (launched by DeepSpeed) and any batch size.
Rank 0 prints a table and writes the JSON report (and, with ``--plots``, retrieval pictures).
"""

from __future__ import annotations

import argparse
import json
import math
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from PIL import Image
from torch import Tensor

from tinyclip_ds import distributed
from tinyclip_ds.config import RecipeError
from tinyclip_ds.data.config import DataConfig
from tinyclip_ds.data.hf_layout import is_hf_spec
from tinyclip_ds.data.mixture import retrieval_pairs
from tinyclip_ds.data.sources import PairSource, classification_source, text_lines
from tinyclip_ds.data.transforms import eval_transform, to_rgb
from tinyclip_ds.eval.config import EvalConfig
from tinyclip_ds.eval.evaluator import DEFAULT_TEMPLATES, Evaluator, check_images

Encoder = Callable[[Tensor], Tensor]

ACCEPTED_MODELS = ("a run directory or checkpoint directory (with a complete checkpoint), a tinyclip "
                   ".safetensors file (tinyclip-ds export --format tinyclip / export-weights), an open_clip "
                   "directory (open_clip_config.json) or a transformers CLIPModel directory (config.json)")
TABLE_METRICS = ("i2t_R@1", "i2t_R@5", "i2t_R@10", "t2i_R@1", "t2i_R@5", "t2i_R@10", "mean_recall",
                 "mean_score", "zeroshot_top1", "zeroshot_top5")
IMAGENET_CLASSES = 1000


@dataclass
class Model:
    """One model as evaluation sees it: its encoders and the input pipeline they expect."""
    encode_image: Encoder  # normalised images (B, 3, S, S) on the device -> (B, E)
    encode_text: Encoder  # token ids (B, N) on the device -> (B, E)
    tokenizer: Callable[[list[str]], Tensor]
    transform: Callable[[Image.Image], Tensor]


@dataclass
class Loaded:
    """What MODEL turned out to be: the student, the teacher beside it (if any) and a description."""
    kind: str  # run | checkpoint | tinyclip | open_clip | hf
    name: str  # used in default file names
    student: Model
    teacher: Model | None
    default_out: Path
    info: dict = field(default_factory=dict)  # recorded in the JSON report


# ------------------------------------------------------------------------------------ models

def load_model(path: str, checkpoint: str, device: torch.device, with_teacher: bool) -> Loaded:
    """MODEL, recognised by what the path holds; a `RecipeError` listing what is accepted otherwise."""
    model = Path(path)
    if model.is_file() and model.suffix == ".safetensors":
        return _tinyclip_file(model, device, with_teacher)
    if model.is_dir():
        if (model / "open_clip_config.json").is_file():
            return _open_clip_dir(model, device)
        if (model / "config.json").is_file():
            return _hf_dir(model, device)
        from tinyclip_ds.train import checkpoint as ckpt
        from tinyclip_ds.train.records import RECIPE

        if (model / RECIPE).is_file() or ckpt.is_complete(model) or model.parent.name == "checkpoints":
            return _tinyclip_checkpoint(model, checkpoint, device, with_teacher)
    what = "does not exist" if not model.exists() else "is none of these"
    raise RecipeError(f"MODEL {path} {what}; eval accepts {ACCEPTED_MODELS}")


def _tinyclip_checkpoint(model: Path, which: str, device: torch.device, with_teacher: bool) -> Loaded:
    """A run or checkpoint of this library's training: the student towers consolidated from the
    checkpoint's shards as ``tinyclip-ds export`` does."""
    from tinyclip_ds.export import resolve_checkpoint, towers_with
    from tinyclip_ds.export.tinyclip import consolidate

    found = consolidate(resolve_checkpoint(model, which))
    run_dir = found.path.parent.parent
    kind = "checkpoint" if model.resolve() == found.path.resolve() else "run"
    loaded = _ours(found.recipe, towers_with(found.shapes, found.weights), device, with_teacher, kind,
                   f"{run_dir.name}_{found.path.name}", run_dir / f"eval_{found.path.name}.json")
    loaded.info.update(checkpoint=str(found.path.resolve()), step=found.step)
    return loaded


def _tinyclip_file(path: Path, device: torch.device, with_teacher: bool) -> Loaded:
    """A file written by ``export --format tinyclip`` / ``export-weights``."""
    from tinyclip_ds.export import load_student_weights

    try:
        recipe, towers = load_student_weights(path)
    except ValueError as error:  # another safetensors file (RecipeError is a ValueError too)
        raise RecipeError(f"MODEL {path}: {error}; eval accepts {ACCEPTED_MODELS}") from None
    return _ours(recipe, towers, device, with_teacher, "tinyclip", path.stem, path.parent / f"eval_{path.stem}.json")


def _ours(recipe, towers: dict, device: torch.device, with_teacher: bool, kind: str, name: str,
          default_out: Path) -> Loaded:
    """Student (and teacher) `Model`s of this library's towers. The teacher is loaded in any case:
    its tokenizer and image normalisation are the student's, and a stage-1 student's other
    tower is the teacher's (as during training)."""
    from tinyclip_ds.models.teachers import load_teacher

    try:
        teacher = load_teacher(recipe.teacher)
    except (RecipeError, OSError) as error:
        raise RecipeError(f"the student's tokenizer and image preprocessing are its teacher's, which the "
                          f"recipe's teacher section names, and that cannot be loaded here: {error}") from None
    teacher.to(device)
    transform = eval_transform(teacher.image_size, teacher.image_mean, teacher.image_std)
    clip = teacher.clip
    image = towers["image"].to(device) if "image" in towers else clip.visual
    text = towers["text"].to(device) if "text" in towers else clip.text
    student = Model(lambda x: image(x).embedding, lambda ids: text(text.fit_context(ids)).embedding,
                    teacher.tokenizer, transform)
    reference = None
    if with_teacher:
        reference = Model(lambda x: clip.visual(x).embedding, lambda ids: clip.text(ids).embedding,
                          teacher.tokenizer, transform)
    towers_from = {kind_: "student" if kind_ in towers else "teacher" for kind_ in ("image", "text")}
    return Loaded(kind, name, student, reference, default_out,
                  {"stage": recipe.stage, "towers": towers_from, "teacher": _teacher_record(recipe.teacher)})


def _teacher_record(cfg) -> dict:
    return {"source": cfg.source, "path": cfg.path, "model": cfg.model, "precision": cfg.precision}


def _open_clip_dir(path: Path, device: torch.device) -> Loaded:
    """A directory open_clip loads as ``local-dir:``, with its own tokenizer and preprocessing."""
    import open_clip

    spec = f"local-dir:{path}"
    model, _, preprocess = open_clip.create_model_and_transforms(spec, device=device)
    model.eval()
    student = Model(model.encode_image, model.encode_text, open_clip.get_tokenizer(spec), preprocess)
    return Loaded("open_clip", path.name, student, None, path.parent / f"eval_{path.name}.json")


def _hf_dir(path: Path, device: torch.device) -> Loaded:
    """A transformers CLIPModel directory, with its CLIPProcessor's tokenizer and image processor."""
    from transformers import CLIPModel, CLIPProcessor

    config = json.loads((path / "config.json").read_text())
    if config.get("model_type") != "clip":
        raise RecipeError(f"MODEL {path}: config.json is a {config.get('model_type')!r} model, not a transformers "
                          f"CLIPModel; eval accepts {ACCEPTED_MODELS}")
    model = CLIPModel.from_pretrained(path).to(device).eval()
    processor = CLIPProcessor.from_pretrained(path)
    length = model.config.text_config.max_position_embeddings

    def features(output) -> Tensor:  # a tensor up to transformers 4, an output with pooler_output from 5
        return output if torch.is_tensor(output) else output.pooler_output

    def tokenize(texts: list[str]) -> Tensor:
        # Padded after the end-of-text token, which the causal mask keeps out of its pooled output.
        return processor.tokenizer(texts, padding="max_length", truncation=True, max_length=length,
                                   return_tensors="pt")["input_ids"]

    student = Model(lambda x: features(model.get_image_features(pixel_values=x)),
                    lambda ids: features(model.get_text_features(input_ids=ids)), tokenize,
                    lambda image: processor.image_processor(images=to_rgb(image), return_tensors="pt")
                    ["pixel_values"][0])
    return Loaded("hf", path.name, student, None, path.parent / f"eval_{path.name}.json")


# ------------------------------------------------------------------------------------ data

def is_karpathy(data) -> bool:
    """Whether parsed JSON is a Karpathy split file (``images[]`` with ``sentences`` and ``split``)."""
    images = data.get("images") if isinstance(data, dict) else None
    return ("annotations" not in data and isinstance(images, list) and bool(images)
            and all(isinstance(image, dict) and "sentences" in image for image in images[:10]))


def karpathy_pairs(path: Path, split: str, image_root: str = "") -> tuple[PairSource, list[str], list[int]]:
    """The ``split`` images of a Karpathy split file (dataset_coco.json, dataset_flickr30k.json) with
    all their captions, as `eval_pairs` returns a retrieval set: ``(images, captions, text_to_image)``.
    Images are ``image_root/filepath/filename`` (``filepath`` only where given; root default: the
    file's folder)."""
    data = _read_json(path, "--data")
    if not is_karpathy(data):
        raise RecipeError(f"--data {path} is not a Karpathy split file (images[] with split, filename, sentences[].raw)")
    root = Path(image_root).expanduser() if image_root else path.parent
    chosen = [image for image in data["images"] if image.get("split") == split]
    if not chosen:
        splits = sorted({str(image.get("split")) for image in data["images"]})
        raise RecipeError(f"--split {split}: {path} has no images in that split; its splits are {', '.join(splits)}")
    source = PairSource()
    entries = []
    for i, image in enumerate(chosen):
        captions = [s.get("raw", "").strip() for s in image.get("sentences") or [] if isinstance(s, dict)]
        captions = [c for c in captions if c]
        if not isinstance(image.get("filename"), str) or not captions:
            raise RecipeError(f"--data {path}: image {i} of split {split} has no \"filename\" or no "
                              f"\"sentences\"[].raw caption; a Karpathy file lists both for every image")
        entries.append(root / image.get("filepath", "") / image["filename"])
        source.captions.append(captions)
    source.add(str(path), entries)
    captions = [caption for per_image in source.captions for caption in per_image]
    text_to_image = [i for i, per_image in enumerate(source.captions) for _ in per_image]
    return source, captions, text_to_image


def retrieval_set(spec: str, image_root: str, split: str | None, image_key: str, caption_key: str):
    """A retrieval set from ``--data``: what ``eval.data`` accepts, or a Karpathy split file."""
    path = Path(spec)
    if path.suffix.lower() == ".json" and path.is_file():
        data = _read_json(path, "--data")
        if is_karpathy(data):
            return karpathy_pairs(path, split or "test", image_root)
    if split is not None and not is_hf_spec(path.expanduser()):
        raise RecipeError(f"--split applies to Karpathy split files (dataset_coco.json, dataset_flickr30k.json) "
                          f"and Hugging Face datasets; {spec} is neither: leave --split out")
    return retrieval_pairs(spec, image_root, DataConfig(csv_image_key=image_key, csv_caption_key=caption_key),
                           key="--data", split=split or "", split_key="--split")


def zeroshot_set(spec: str, classnames_file: str | None, templates_file: str | None
                 ) -> tuple[tuple, list[str], dict]:
    """``((images, labels, classnames), templates, description)`` for ``--zeroshot``.

    Class names: ``--classnames`` (one a line, in sorted-folder order), else the folder's
    classnames.txt, else for a 1000-class folder (ImageNet) open_clip's IMAGENET_CLASSNAMES,
    else the folder names. Templates: ``--templates``, else the set's own (demo), else
    open_clip's OPENAI_IMAGENET_TEMPLATES for 1000 classes, else a generic CLIP set."""
    images, labels, classnames, own_templates = classification_source(spec, key="--zeroshot")
    names_from = "the set's own" if spec.startswith("demo:") else "folder names"
    if not spec.startswith("demo:") and (Path(spec) / "classnames.txt").is_file():
        names_from = str(Path(spec) / "classnames.txt")
    imagenet = len(classnames) == IMAGENET_CLASSES and not spec.startswith("demo:")
    if classnames_file:
        names = _lines(classnames_file, "--classnames")
        if len(names) != len(classnames):
            raise RecipeError(f"--classnames {classnames_file} has {len(names)} names but --zeroshot {spec} has "
                              f"{len(classnames)} classes; give one name per class folder, in sorted folder order")
        classnames, names_from = names, classnames_file
    elif imagenet and names_from == "folder names":
        from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES

        classnames, names_from = list(IMAGENET_CLASSNAMES), "open_clip IMAGENET_CLASSNAMES"
    if templates_file:
        templates, templates_from = _lines(templates_file, "--templates"), templates_file
        bad = [t for t in templates if t.count("{}") != 1]
        if bad:
            raise RecipeError(f"--templates {templates_file}: every line needs exactly one {{}}; bad: {bad[:3]}")
    elif own_templates:
        templates, templates_from = list(own_templates), "the set's own"
    elif imagenet:
        from open_clip.zero_shot_metadata import OPENAI_IMAGENET_TEMPLATES

        # open_clip keeps them as functions of the class name; the evaluator formats "{}" strings.
        templates, templates_from = [t("{}") for t in OPENAI_IMAGENET_TEMPLATES], "open_clip OPENAI_IMAGENET_TEMPLATES"
    else:
        templates, templates_from = list(DEFAULT_TEMPLATES), "generic CLIP templates"
    description = {"classes": len(classnames), "images": len(images), "classnames": names_from,
                   "templates": templates_from, "n_templates": len(templates)}
    return (images, torch.tensor(labels), classnames), templates, description


def _lines(path: str, key: str) -> list[str]:
    if not Path(path).is_file():
        raise RecipeError(f"{key} {path}: no such file (one entry a line)")
    lines = [line.strip() for line in text_lines(Path(path), key) if line.strip()]
    if not lines:
        raise RecipeError(f"{key} {path} is empty (one entry a line)")
    return lines


def _read_json(path: Path, key: str):
    try:
        return json.loads(path.read_bytes().decode("utf-8-sig"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise RecipeError(f"{key} {path} is not valid UTF-8 JSON ({error})") from None


# ------------------------------------------------------------------------------------ command

def run_eval(args: argparse.Namespace) -> int:
    """The ``eval`` command on this rank (every rank of a DeepSpeed launch runs it)."""
    if not args.data and not args.zeroshot:
        raise RecipeError("nothing to evaluate: give --data (retrieval) and/or --zeroshot (classification)")
    if args.batch_size < 1:
        raise RecipeError(f"--batch-size must be a positive integer, got {args.batch_size}")
    if "RANK" in os.environ:  # started by a launcher (deepspeed): join its process group
        _, _, device = distributed.init_distributed()
    else:
        device = torch.device(args.device if args.device != "auto" else "cuda" if torch.cuda.is_available() else "cpu")

    loaded = load_model(args.model, args.checkpoint, device, with_teacher=not args.no_teacher)
    evaluator = Evaluator(EvalConfig(data="", zeroshot="", batch_size=args.batch_size), DataConfig(),
                          224, (0.0,) * 3, (1.0,) * 3, loaded.student.tokenizer, device)
    sets: dict = {}
    if args.data:
        evaluator.retrieval = retrieval_set(args.data, args.image_root, args.split, args.csv_image_key,
                                            args.csv_caption_key)
        check_images(evaluator.retrieval[0], "--data")
        sets["retrieval"] = {"data": args.data, "split": args.split, "images": len(evaluator.retrieval[0]),
                             "captions": len(evaluator.retrieval[1])}
    if args.zeroshot:
        evaluator.zeroshot, evaluator.templates, description = zeroshot_set(args.zeroshot, args.classnames,
                                                                             args.templates)
        check_images(evaluator.zeroshot[0], "--zeroshot")
        sets["zeroshot"] = {"data": args.zeroshot, **description}

    results: dict[str, dict[str, float]] = {}
    models = {"student": loaded.student, **({"teacher": loaded.teacher} if loaded.teacher else {})}
    for who, model in models.items():
        # The sets are loaded once; each model brings its own tokenizer and preprocessing.
        evaluator.tokenizer, evaluator.transform = model.tokenizer, model.transform
        with torch.no_grad():
            sides = evaluator.image_side(model.encode_image), evaluator.text_side(model.encode_text)
        results[who] = evaluator.metrics(*sides)
        if args.plots and distributed.rank() == 0 and evaluator.retrieval:
            _plot(evaluator, sides, who, Path(args.plots))

    if distributed.rank() == 0:
        out = Path(args.out) if args.out else default_out(loaded)
        report = {"model": str(Path(args.model).resolve()), "kind": loaded.kind, **loaded.info,
                  "sets": sets, "world_size": distributed.world(), "batch_size": args.batch_size,
                  "device": str(device), "metrics": results}
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(report, indent=2) + "\n")
        print(table(results))
        print(f"results: {out}")
        if args.plots and evaluator.retrieval:
            print(f"retrieval grids: {Path(args.plots) / 'retrieval_<model>.png'} ({', '.join(results)})")
    distributed.shutdown()
    return 0


def default_out(loaded: Loaded) -> Path:
    """Beside MODEL where that folder is writable, else ./eval_<name>.json."""
    folder = loaded.default_out.parent
    return loaded.default_out if os.access(folder, os.W_OK) else Path(f"eval_{loaded.name}.json")


def table(results: dict[str, dict[str, float]]) -> str:
    """The terminal table: one row per metric, one column per model (fractions, 4 decimals)."""
    rows = [m for m in TABLE_METRICS if any(m in r for r in results.values())]
    width = max(len(m) for m in rows)
    lines = [f"{'metric':<{width}}" + "".join(f"  {who:>8}" for who in results)]
    for metric in rows:
        cells = "".join(f"  {r[metric]:8.4f}" if metric in r and not math.isnan(r[metric]) else f"  {'-':>8}"
                        for r in results.values())
        lines.append(f"{metric:<{width}}{cells}")
    return "\n".join(lines)


def _plot(evaluator: Evaluator, sides, who: str, folder: Path) -> None:
    """``folder/retrieval_<who>.png``: captions with their top-5 images of the whole set."""
    from tinyclip_ds.eval.plots import retrieval_grid

    folder.mkdir(parents=True, exist_ok=True)
    title = f"{who}: caption -> top-5 images (green: correct)"
    retrieval_grid(*evaluator.retrieval_examples(*sides), title=title).save(folder / f"retrieval_{who}.png")
