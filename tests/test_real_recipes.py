"""Every shipped real-teacher recipe runs: 2 steps through its stage launcher with a
random-weight teacher saved in its family's real file format, on a small fixture laid out as
COCO and ImageNet ship, including the first evaluation and the final checkpoint.

The fixture folder stands in for the working directory a user runs the recipe from: every path
the recipe names (``data/coco/...``, ``checkpoints/...``, ``runs/...``) is re-rooted there with
``--set``. Only sizes are made small (teacher and student widths and heads, batches, steps);
everything else (losses, layer maps, evaluation, data layout, DeepSpeed config, teacher
precision) is the shipped recipe's.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file
from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer

from conftest import launch, read_metrics
from test_teacher_equivalence import open_clip_library, write_hf_tokenizer
from tinyclip_ds.config import PROJECT_ROOT
from tinyclip_ds.recipe import Recipe, load_recipe
from tinyclip_ds.train.checkpoint import complete_checkpoints, tag_for

RECIPES = PROJECT_ROOT / "recipes"
# Every recipe of a teacher family: not the demo, not the fragments (_base/, students/).
REAL = sorted(p for p in RECIPES.rglob("*.yaml")
              if not any(part.startswith("_") or part in ("students", "demo")
                         for part in p.relative_to(RECIPES).parts[:-1]))

# Teachers and students are the recipes' ViT-B shapes with width and heads divided by SHRINK
# (head width 64 as in ViT-B, 12 teacher layers), so layer maps and head-count rules (e.g.
# attention maps need equal head counts) hold as on the real teacher; OpenAI's layout implies
# heads = width // 64.
SHRINK = 4
VISION = {"image_size": 64, "patch_size": 16, "layers": 12, "width": 768 // SHRINK}
TEXT = {"context_length": 32, "vocab_size": 49408, "width": 512 // SHRINK, "heads": 8 // SHRINK,
        "layers": 12}
EMBED = 512 // SHRINK
# Tiny batches, two steps, evaluated after each (the first evaluation and the final one), two
# real loader workers; the rest of each recipe stays as shipped.
TINY = ["train.steps=2", "train.micro_batch=2", "train.global_batch=4", "train.accumulation=0",
        "eval.every=1", "data.num_workers=2"]


def shrunk_students(recipe: Recipe) -> list[str]:
    """``--set`` values dividing both student towers' width and heads by SHRINK (0 = the
    teacher's, already shrunk, stays 0)."""
    return [f"student.{tower}.{field}={getattr(getattr(recipe.student, tower), field) // SHRINK}"
            for tower in ("image", "text") for field in ("width", "heads")]


# --------------------------------------------------------------------------- teacher files

def write_openai(path: Path) -> list[str]:
    """An OpenAI-layout state dict (the names of OpenAI's release, QuickGELU towers)."""
    config = {"embed_dim": EMBED, "quick_gelu": True, "vision_cfg": VISION, "text_cfg": TEXT}
    torch.save(open_clip_library(config).state_dict(), path)
    return []


def write_open_clip(path: Path) -> list[str]:
    """open_clip weights (safetensors or a torch file, as the recipe's file name says) and an
    open_clip model-config JSON (GELU towers, as open_clip's own ViT-B configs)."""
    config = {"embed_dim": EMBED, "vision_cfg": VISION, "text_cfg": TEXT}
    state = {name: value.contiguous() for name, value in open_clip_library(config).state_dict().items()}
    if path.suffix == ".safetensors":
        save_file(state, path)
    else:
        torch.save(state, path)
    model = path.with_suffix(".json")
    model.write_text(json.dumps(config))
    return [f"teacher.model={model}"]


def write_hf(path: Path) -> list[str]:
    """A ``save_pretrained`` CLIPModel directory with its tokenizer and image processor, with
    the config fields of openai/clip-vit-base-patch32 (QuickGELU, pooled at argmax(ids))."""
    config = CLIPConfig(
        vision_config=dict(hidden_size=VISION["width"], num_hidden_layers=VISION["layers"],
                           num_attention_heads=VISION["width"] // 64, intermediate_size=4 * VISION["width"],
                           patch_size=VISION["patch_size"], image_size=VISION["image_size"]),
        text_config=dict(hidden_size=TEXT["width"], num_hidden_layers=TEXT["layers"],
                         num_attention_heads=TEXT["heads"], intermediate_size=4 * TEXT["width"],
                         max_position_embeddings=TEXT["context_length"], vocab_size=TEXT["vocab_size"],
                         eos_token_id=2),
        projection_dim=EMBED)
    CLIPModel(config).save_pretrained(path)
    write_hf_tokenizer(path)  # vocab.json + merges.txt, which the processor re-saves with its configs
    size = VISION["image_size"]
    CLIPProcessor(image_processor=CLIPImageProcessor(size={"shortest_edge": size},
                                                     crop_size={"height": size, "width": size}),
                  tokenizer=CLIPTokenizer.from_pretrained(path)).save_pretrained(path)
    return []


TEACHERS: dict[str, Callable[[Path], list[str]]] = {
    "openai": write_openai, "open_clip": write_open_clip, "hf": write_hf}


# --------------------------------------------------------------------------- data files

def write_jpeg(path: Path, seed: int) -> dict:
    """A small real JPEG (smooth colour gradients plus noise); returns its COCO "images" entry."""
    rng = np.random.default_rng(seed)
    height, width = int(rng.integers(56, 96)), int(rng.integers(56, 96))
    y, x = np.mgrid[0:height, 0:width]
    pixels = np.stack([(x * rng.uniform(1, 4) + y * rng.uniform(0, 3)) % 256,
                       (y * rng.uniform(1, 4)) % 256,
                       rng.integers(0, 256, (height, width))], axis=-1).astype(np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path, quality=90)
    return {"id": seed, "file_name": path.name, "height": height, "width": width}


def write_coco_split(coco: Path, split: str, images: int, captions_each: int, first_id: int) -> None:
    """``<coco>/<split>/*.jpg`` and ``<coco>/annotations/captions_<split>.json`` as COCO ships them."""
    entries = [write_jpeg(coco / split / f"{image_id:012d}.jpg", image_id)
               for image_id in range(first_id, first_id + images)]
    annotations = [{"id": 10 * entry["id"] + k, "image_id": entry["id"],
                    "caption": f"A photo number {entry['id']} of a scene, caption {k}."}
                   for entry in entries for k in range(captions_each)]
    (coco / "annotations").mkdir(parents=True, exist_ok=True)
    (coco / "annotations" / f"captions_{split}.json").write_text(json.dumps(
        {"info": {"description": "test fixture in the COCO 2017 captions layout"}, "licenses": [],
         "images": entries, "annotations": annotations}))


def write_imagenet_split(imagenet: Path, split: str, per_class: int, first_id: int) -> None:
    """``<imagenet>/<split>/<wnid>/*.JPEG``, one sub-folder per class; the val split also has a
    classnames.txt (the readable names zero-shot prompts use, one per sub-folder)."""
    wnids = {"n01440764": "tench", "n01443537": "goldfish", "n01484850": "great white shark"}
    image_id = first_id
    for wnid in wnids:
        for _ in range(per_class):
            write_jpeg(imagenet / split / wnid / f"{wnid}_{image_id}.JPEG", image_id)
            image_id += 1
    if split == "val":
        (imagenet / split / "classnames.txt").write_text("\n".join(wnids.values()) + "\n")


def write_img2dataset_shards(folder: Path, shards: int, per_shard: int, first_id: int) -> None:
    """``<folder>/00000.tar, ...`` as img2dataset writes them: ``%09d.jpg`` + ``.txt`` + ``.json``
    (the shipped recipes name a longer brace range: the shards not written are gaps, as when
    img2dataset fails a shard)."""
    import webdataset

    folder.mkdir(parents=True, exist_ok=True)
    for shard in range(shards):
        with webdataset.TarWriter(str(folder / f"{shard:05d}.tar")) as writer:
            for key in range(first_id + shard * per_shard, first_id + (shard + 1) * per_shard):
                jpeg = folder / f"{key}.jpg"
                write_jpeg(jpeg, key)
                caption = f"A web photo number {key} of a scene."
                writer.write({"__key__": f"{key:09d}", "jpg": jpeg.read_bytes(), "txt": caption,
                              "json": json.dumps({"caption": caption, "status": "success"})})
                jpeg.unlink()


def write_hf_dataset(folder: Path, rows: int, first_id: int) -> None:
    """A ``save_to_disk`` DatasetDict with a train split: an Image column "image", text "caption"."""
    import datasets

    images = []
    for key in range(first_id, first_id + rows):
        jpeg = folder.parent / f"{key}.jpg"
        write_jpeg(jpeg, key)
        images.append({"bytes": jpeg.read_bytes(), "path": None})
        jpeg.unlink()
    train = datasets.Dataset.from_dict({"image": images,
                                        "caption": [f"A dataset photo number {k}." for k in range(first_id, first_id + rows)]})
    datasets.DatasetDict({"train": train.cast_column("image", datasets.Image())}).save_to_disk(str(folder))


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    """The folder the recipes run "from": data/ in the COCO and ImageNet layouts, CC3M as
    img2dataset shards and a Hugging Face dataset saved to disk."""
    root = tmp_path_factory.mktemp("real_recipes")
    write_coco_split(root / "data/coco", "train2017", images=8, captions_each=2, first_id=1)
    write_coco_split(root / "data/coco", "val2017", images=4, captions_each=5, first_id=1001)
    write_imagenet_split(root / "data/imagenet", "train", per_class=2, first_id=2001)
    write_imagenet_split(root / "data/imagenet", "val", per_class=2, first_id=3001)
    write_img2dataset_shards(root / "data/cc3m", shards=2, per_shard=4, first_id=4001)
    write_hf_dataset(root / "data/hf/my_captioned_images", rows=8, first_id=5001)
    return root


# --------------------------------------------------------------------------- running recipes

def rerooted(value: str | list[str], root: Path) -> str | list[str]:
    """A recipe path (or list of paths) re-rooted under ``root``; '' and demo: specs unchanged."""
    if isinstance(value, list):
        return [rerooted(v, root) for v in value]
    return str(root / value) if value and not value.startswith("demo:") else value


def path_overrides(recipe: Recipe, root: Path) -> list[str]:
    """``--set`` values that re-root every path the recipe names under ``root``."""
    paths = {"teacher.path": recipe.teacher.path,
             "data.images": recipe.data.images, "data.captions": recipe.data.captions,
             "data.pairs": recipe.data.pairs, "data.image_root": recipe.data.image_root,
             "eval.data": recipe.eval.data, "eval.image_root": recipe.eval.image_root,
             "eval.zeroshot": recipe.eval.zeroshot}
    for tower in recipe.towers:
        paths[f"student.{tower}.init_from"] = getattr(recipe.student, tower).init_from
    # --set takes a string field's text as it is and a list field's as YAML (JSON is YAML)
    return [f"{key}={value if isinstance(value, str) else json.dumps(value)}"
            for key, value in ((key, rerooted(value, root)) for key, value in paths.items())]


class Runs:
    """Runs recipes in the fixture folder once each; a stage-2 recipe first runs the stage-1
    recipes its ``init_from`` run directories come from."""

    def __init__(self, root: Path):
        self.root = root
        self.done: dict[Path, tuple[Path, str]] = {}
        self.teachers: dict[Path, list[str]] = {}
        # the stage-1 run directories stage-2 recipes name in init_from, as the recipes write them
        self.by_run_dir = {Path("runs") / load_recipe(p).name: p for p in REAL}

    def run(self, path: Path) -> tuple[Path, str]:
        """The run directory and output of ``path``'s 2-step run (trained now unless done)."""
        if path in self.done:
            return self.done[path]
        recipe = load_recipe(path)
        for tower in recipe.towers:
            init_from = Path(getattr(recipe.student, tower).init_from)
            if init_from in self.by_run_dir:
                self.run(self.by_run_dir[init_from])
        teacher = self.teacher(recipe)
        run_dir = self.root / "runs" / recipe.name
        overrides = [f"run_dir={run_dir}", *path_overrides(recipe, self.root), *teacher,
                     *shrunk_students(recipe), *TINY]
        result = launch(recipe.stage, "--recipe", str(path), *[a for o in overrides for a in ("--set", o)],
                        timeout=900)
        self.done[path] = run_dir, result.stdout
        return self.done[path]

    def teacher(self, recipe: Recipe) -> list[str]:
        """Writes the recipe's teacher file (once per path, shared by a family's stages)."""
        path = self.root / recipe.teacher.path
        if path not in self.teachers:
            if recipe.teacher.source not in TEACHERS:
                pytest.fail(f"no random-weight writer for teacher.source {recipe.teacher.source!r}: "
                            f"add one to TEACHERS in {__file__}")
            path.parent.mkdir(parents=True, exist_ok=True)
            self.teachers[path] = TEACHERS[recipe.teacher.source](path)
        return self.teachers[path]


@pytest.fixture(scope="module")
def runs(workdir) -> Runs:
    return Runs(workdir)


def test_every_family_has_every_stage():
    families = {p.parent for p in REAL if p.parent.parent == RECIPES}
    assert {f.name for f in families} >= {"openai_vit_b32", "open_clip_vit_b16", "hf_clip_vit_b32"}
    sources = set()
    for family in families:
        assert {p.name for p in family.glob("*.yaml")} >= {"stage1_image.yaml", "stage1_text.yaml",
                                                           "stage2.yaml"}, family
        sources.add(load_recipe(family / "stage1_image.yaml").teacher.source)
    assert sources == set(TEACHERS)


@pytest.mark.slow
@pytest.mark.parametrize("path", REAL, ids=lambda p: str(p.relative_to(RECIPES).with_suffix("")))
def test_real_recipe_trains_evaluates_and_checkpoints(path, runs):
    run_dir, output = runs.run(path)
    metrics = read_metrics(run_dir)
    assert [m["step"] for m in metrics] == [1, 2], metrics
    for entry in metrics:
        for key in ("student/i2t_R@1", "student/t2i_R@1", "student/zeroshot_top1",
                    "teacher/t2i_R@1", "teacher/zeroshot_top1"):
            assert 0.0 <= entry[key] <= 1.0 and math.isfinite(entry[key]), (key, entry)
    assert complete_checkpoints(run_dir) == [run_dir / "checkpoints" / tag_for(2)]
    recipe = load_recipe(path)
    for tower in recipe.towers:  # stage 2 starts from the family's stage-1 runs
        if getattr(recipe.student, tower).init_from:
            assert f"{tower} tower: loaded from stage-1 checkpoint" in output, output[-3000:]
