"""What a data spec string in a recipe means: image folders, caption files, paired files, demo data.

Spec strings (``data.images``, ``data.captions``, ``data.pairs``, ``eval.data``,
``eval.zeroshot``) are resolved here into plain in-memory indexes: lists of image entries
(file paths, or PIL images for the demo) and captions. Image files are only opened when a
sample is loaded; a file that cannot be read is reported then (``None``), not here.
Every problem a user can cause is a `RecipeError` naming the recipe key.
"""

from __future__ import annotations

import csv
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

from tinyclip_ds.config import RecipeError

log = logging.getLogger(__name__)

ImageEntry = Path | Image.Image
"""An image file (opened when loaded) or an image already in memory (demo data)."""

_IMAGE_SPECS = "an image folder (searched recursively) or demo:digits"
_CAPTION_SPECS = ".txt (one caption a line), COCO captions .json, or demo:digits"
_PAIR_SPECS = (".csv / .tsv (a header row naming the image-path and caption columns), COCO captions "
               ".json, or demo:digit_pairs")
_CLASS_SPECS = "a folder with one sub-folder per class, or demo:digits"


def load_image(entry: ImageEntry) -> Image.Image | None:
    """The image, decoded; ``None`` (with a warning) when the file cannot be read."""
    if isinstance(entry, Image.Image):
        return entry
    try:
        image = Image.open(entry)
        image.load()  # decode now, so truncated or corrupt files fail here and not in a transform
        return image
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as error:
        log.warning("skipping unreadable image %s: %s", entry, error)
        return None


@dataclass
class ImageSource:
    """An indexable list of images."""

    entries: list[ImageEntry] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.entries)

    def load(self, index: int) -> Image.Image | None:
        """Image ``index``, or ``None`` when its file cannot be read (never raises for one)."""
        return load_image(self.entries[index])


@dataclass
class PairSource(ImageSource):
    """Images with all their captions: ``captions[i]`` are the captions of image ``i``."""

    captions: list[list[str]] = field(default_factory=list)


# --------------------------------------------------------------------------- training sources

def image_source(specs: str | Sequence[str], key: str = "data.images") -> ImageSource:
    """Images of one spec or of several concatenated: an image folder (every file below it,
    recursively, in sorted path order), ``demo:digits`` (the train-split single digits) or
    ``demo:digit_pairs`` (the train digit-pair images, without their captions)."""
    source = ImageSource()
    for spec, spec_key in _each_spec(specs, key):
        if _is_demo(spec):
            digits = _demo(spec, spec_key, {"demo:digits", "demo:digit_pairs"})
            demo = digits.digit_images("train") if spec == "demo:digits" else digits.digit_pairs("train")
            entries: list[ImageEntry] = [image for image, _ in demo]
        else:
            path = _existing_path(spec, spec_key, _IMAGE_SPECS)
            if not path.is_dir():
                raise RecipeError(f"'{spec_key}': {path} is a file; image sources are {_IMAGE_SPECS}")
            entries = _files_below(path)
        _require_some(entries, spec, spec_key, "images")
        source.entries += entries
    return source


def caption_source(specs: str | Sequence[str], key: str = "data.captions") -> list[str]:
    """Captions of one spec or of several concatenated: ``.txt`` (one caption per non-empty
    line), a COCO captions ``.json`` (every caption in its "annotations"), or ``demo:digits``
    (the single-digit captions plus the captions of the train digit pairs)."""
    captions: list[str] = []
    for spec, spec_key in _each_spec(specs, key):
        if _is_demo(spec):
            digits = _demo(spec, spec_key, {"demo:digits"})
            found = digits.single_captions() + [caption for _, caption in digits.digit_pairs("train")]
        else:
            path = _existing_path(spec, spec_key, _CAPTION_SPECS)
            suffix = path.suffix.lower()
            if suffix == ".txt" and path.is_file():
                found = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
            elif suffix == ".json" and path.is_file():
                found = [a["caption"].strip() for a in _read_coco(path, spec_key)["annotations"]]
            else:
                raise RecipeError(f"'{spec_key}': cannot read captions from {path}; accepted: {_CAPTION_SPECS}")
        _require_some(found, spec, spec_key, "captions")
        captions += found
    return captions


def pair_source(specs: str | Sequence[str], image_root: str = "", csv_image_key: str = "filepath",
                csv_caption_key: str = "title", key: str = "data.pairs") -> PairSource:
    """Image-caption pairs of one spec or of several concatenated, grouped per image.

    ``.csv``/``.tsv``: a header row; the columns ``csv_image_key`` and ``csv_caption_key``;
    rows naming the same image add captions to it. COCO captions ``.json``: every caption of
    each image. Relative image paths are resolved against ``image_root`` ('' = the file's
    folder). ``demo:digit_pairs``: the train digit pairs.
    """
    source = PairSource()
    for spec, spec_key in _each_spec(specs, key):
        part = _pairs(spec, spec_key, image_root, csv_image_key, csv_caption_key, split="train")
        source.entries += part.entries
        source.captions += part.captions
    return source


# --------------------------------------------------------------------------- evaluation sources

def eval_pairs(spec: str, image_root: str = "", csv_image_key: str = "filepath",
               csv_caption_key: str = "title", key: str = "eval.data"
               ) -> tuple[ImageSource, list[str], list[int]]:
    """A retrieval set with every caption: ``(images, captions, text_to_image)`` where
    ``text_to_image[j]`` is the index of the image caption ``j`` describes (COCO: 5 per image).

    Takes the pair specs of `pair_source`; ``demo:digit_pairs`` are the 100 held-out pairs and
    ``demo:digits`` the held-out single digits, each with the first template's caption.
    """
    pairs = _pairs(spec, key, image_root, csv_image_key, csv_caption_key, split="heldout")
    captions = [caption for per_image in pairs.captions for caption in per_image]
    text_to_image = [i for i, per_image in enumerate(pairs.captions) for _ in per_image]
    return ImageSource(pairs.entries), captions, text_to_image


def classification_source(spec: str, key: str = "eval.zeroshot"
                          ) -> tuple[ImageSource, list[int], list[str], list[str] | None]:
    """A zero-shot set: ``(images, labels, classnames, templates)``.

    A folder with one sub-folder per class (its files, recursively, are that class's images):
    class names are the sub-folder names with '_' read as ' ', or the lines of a
    ``classnames.txt`` beside the sub-folders (one per sub-folder, in sorted order); templates
    are ``None`` (the evaluator's ``eval.templates`` apply). ``demo:digits``: the held-out
    single digits, their names and the demo's own templates.
    """
    if _is_demo(spec):
        digits = _demo(spec, key, {"demo:digits"})
        held_out = digits.digit_images("heldout")
        return (ImageSource([image for image, _ in held_out]), [label for _, label in held_out],
                list(digits.DIGIT_NAMES), list(digits.SINGLE_TEMPLATES))
    root = _existing_path(spec, key, _CLASS_SPECS)
    if not root.is_dir():
        raise RecipeError(f"'{key}': {root} is a file; a zero-shot set is {_CLASS_SPECS}")
    folders = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not folders:
        raise RecipeError(f"'{key}': {root} has no sub-folders; a zero-shot set is {_CLASS_SPECS}")
    classnames = [folder.name.replace("_", " ") for folder in folders]
    names_file = root / "classnames.txt"
    if names_file.is_file():
        classnames = [line.strip() for line in names_file.read_text(encoding="utf-8").splitlines() if line.strip()]
        if len(classnames) != len(folders):
            raise RecipeError(f"'{key}': {names_file} has {len(classnames)} names but {root} has "
                              f"{len(folders)} class folders; give one name per folder, in sorted folder order")
    images = ImageSource()
    labels: list[int] = []
    for label, folder in enumerate(folders):
        files = _files_below(folder)
        images.entries += files
        labels += [label] * len(files)
    _require_some(images.entries, spec, key, "images")
    return images, labels, classnames, None


# --------------------------------------------------------------------------- helpers

def _pairs(spec: str, key: str, image_root: str, csv_image_key: str, csv_caption_key: str,
           split: str) -> PairSource:
    """The pairs of one spec; ``split`` picks the demo's train or held-out part."""
    if _is_demo(spec):
        digits = _demo(spec, key, {"demo:digit_pairs", "demo:digits"} if split == "heldout"
                       else {"demo:digit_pairs"})
        if spec == "demo:digits":
            template = digits.SINGLE_TEMPLATES[0]
            singles = digits.digit_images(split)
            return PairSource([image for image, _ in singles],
                              [[template.format(digits.DIGIT_NAMES[label])] for _, label in singles])
        pairs = digits.digit_pairs(split)
        return PairSource([image for image, _ in pairs], [[caption] for _, caption in pairs])
    path = _existing_path(spec, key, _PAIR_SPECS)
    root = Path(image_root).expanduser() if image_root else path.parent
    suffix = path.suffix.lower()
    if suffix in (".csv", ".tsv") and path.is_file():
        rows = _table_rows(path, key, csv_image_key, csv_caption_key)
    elif suffix == ".json" and path.is_file():
        rows = _coco_rows(path, key)
    else:
        raise RecipeError(f"'{key}': cannot read image-caption pairs from {path}; accepted: {_PAIR_SPECS}")
    grouped: dict[str, list[str]] = {}  # insertion-ordered: images keep their first-seen order
    for image, caption in rows:
        grouped.setdefault(image, []).append(caption)
    _require_some(grouped, spec, key, "image-caption pairs")
    return PairSource([root / image for image in grouped], list(grouped.values()))


def _table_rows(path: Path, key: str, image_key: str, caption_key: str) -> list[tuple[str, str]]:
    """``(image path, caption)`` of every row of a .csv/.tsv file with a header row."""
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f, delimiter="\t" if path.suffix.lower() == ".tsv" else ",", restval="")
        columns = reader.fieldnames or []
        for wanted, setting in ((image_key, "data.csv_image_key"), (caption_key, "data.csv_caption_key")):
            if wanted not in columns:
                raise RecipeError(
                    f"'{key}': {path} has no column '{wanted}' (named by '{setting}'); columns found: "
                    f"{', '.join(repr(c) for c in columns) or 'none'}. Set 'data.csv_image_key' and "
                    f"'data.csv_caption_key' to the image-path and caption columns")
        return [(row[image_key], row[caption_key].strip()) for row in reader]


def _coco_rows(path: Path, key: str) -> list[tuple[str, str]]:
    """``(file_name, caption)`` of every caption of a COCO captions file, in "images" order."""
    data = _read_coco(path, key)
    if not isinstance(data.get("images"), list):
        raise RecipeError(f"'{key}': {path} has no \"images\" list; image-caption pairs need a COCO "
                          f"captions file with both \"images\" and \"annotations\"")
    by_image: dict[int, list[str]] = {}
    for annotation in data["annotations"]:
        by_image.setdefault(annotation["image_id"], []).append(annotation["caption"].strip())
    return [(image["file_name"], caption) for image in data["images"]
            for caption in by_image.get(image["id"], [])]


def _read_coco(path: Path, key: str) -> dict:
    """A COCO captions file (a mapping with an "annotations" list)."""
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except json.JSONDecodeError as error:
        raise RecipeError(f"'{key}': {path} is not valid JSON ({error})") from None
    if not isinstance(data, dict) or not isinstance(data.get("annotations"), list):
        raise RecipeError(f"'{key}': {path} is not a COCO captions file (no \"annotations\" list)")
    return data


def _files_below(folder: Path) -> list[Path]:
    """Every non-hidden file below ``folder``, recursively, in sorted path order."""
    return sorted(p for p in folder.rglob("*")
                  if p.is_file() and not any(part.startswith(".") for part in p.relative_to(folder).parts))


def _each_spec(specs: str | Sequence[str], key: str) -> list[tuple[str, str]]:
    """``(spec, recipe key)`` pairs; list items are named ``key[i]`` in errors."""
    if isinstance(specs, str):
        return [(specs, key)]
    if not specs:
        raise RecipeError(f"'{key}' is empty; give at least one source")
    return [(spec, f"{key}[{i}]") for i, spec in enumerate(specs)]


def _is_demo(spec: str) -> bool:
    return spec.startswith("demo:")


def _demo(spec: str, key: str, allowed: set[str]):
    """The digits demo module, after checking that ``spec`` is a demo this key accepts."""
    if spec not in allowed:
        raise RecipeError(f"'{key}': unknown demo data '{spec}'; demo data here: {', '.join(sorted(allowed))}")
    from tinyclip_ds.data import digits  # imported lazily: building the demo costs time
    return digits


def _existing_path(spec: str, key: str, accepted: str) -> Path:
    if not spec:
        raise RecipeError(f"'{key}' is empty; give {accepted}")
    path = Path(spec).expanduser()
    if not path.exists():
        raise RecipeError(f"'{key}': {path} does not exist; give {accepted}")
    return path


def _require_some(found, spec: str, key: str, what: str) -> None:
    if not found:
        raise RecipeError(f"'{key}': {spec} contains no {what}")
