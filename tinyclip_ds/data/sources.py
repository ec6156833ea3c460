"""What a data spec string in a recipe means: image folders, caption files, paired files, demo data.

Spec strings (``data.images``, ``data.captions``, ``data.pairs``, ``eval.data``,
``eval.zeroshot``) are resolved here into in-memory indexes: image entries (file paths packed
in a `PathTable`, or PIL images for the demo) and captions (a `CaptionTable`). Every problem a
user can cause while indexing is a `RecipeError` naming the recipe key (and the file and line
where there is one). ``demo:`` specs name the digits of `tinyclip_ds.data.digits`.

Image folders hold images by extension (`decode.IMAGE_EXTENSIONS`, any case); other files (such
as img2dataset's ``.txt``/``.json`` sidecars) are left out and counted in ``ImageSource.ignored``.
Text files (.txt, .csv, .tsv, .json) are UTF-8, with or without a byte-order mark. A .tsv is
read without quoting (CC3M and img2dataset write captions with bare quotes); a .csv with
standard quoting. A row whose field count differs from the header, that spans several lines
(an unmatched quote), or without an image path is left out and its line recorded in
``PairSource.bad_rows``; a file where that is most rows is an error.

Image files are only opened when a sample is loaded. A file that cannot be used then is not
an error: `decode.load_image` returns the reason instead of the image, one of
`decode.SKIP_REASONS`.
"""

from __future__ import annotations

import bisect
import csv
import json
import os
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from tinyclip_ds.config import RecipeError
from tinyclip_ds.data.decode import IMAGE_EXTENSIONS, ImageEntry, load_image

_IMAGE_SPECS = "an image folder (searched recursively) or demo:digits"
_CAPTION_SPECS = ".txt (one caption a line), COCO captions .json, or demo:digits"
_PAIR_SPECS = (".csv / .tsv (a header row naming the image-path and caption columns), COCO captions "
               ".json, or demo:digit_pairs")
_CLASS_SPECS = "a folder with one sub-folder per class, or demo:digits"


class _Packed(Sequence):
    """List-like indexing (slices, negative indices) and equality for the packed tables below."""

    __hash__ = None

    def _item(self, index: int):
        raise NotImplementedError

    def __getitem__(self, index):
        if isinstance(index, slice):
            return [self._item(i) for i in range(*index.indices(len(self)))]
        if index < 0:
            index += len(self)
        if not 0 <= index < len(self):
            raise IndexError(f"item {index} of {len(self)}")
        return self._item(index)

    def __eq__(self, other: object) -> bool:
        if isinstance(other, Sequence) and not isinstance(other, (str, bytes)):
            return len(self) == len(other) and all(a == b for a, b in zip(self, other))
        return NotImplemented


class TextTable(_Packed):
    """Strings packed into one byte array plus their offsets (8 bytes each).

    A list of a million paths or captions costs a Python object each (~50 bytes of overhead
    plus the text, and a `Path` several objects); worse, loader workers forked from the rank
    copy those pages as they read them, since reading a Python object writes its reference
    count. Two numpy arrays are shared by the workers as they are. Texts are encoded as the
    file system encodes names (UTF-8, undecodable bytes kept), so any path round-trips."""

    def __init__(self, texts: Iterable[str]) -> None:
        encoded = [_encode(text) for text in texts]
        self._offsets = np.zeros(len(encoded) + 1, dtype=np.int64)
        np.cumsum([len(b) for b in encoded], out=self._offsets[1:])
        self._bytes = np.frombuffer(b"".join(encoded), dtype=np.uint8)

    def __len__(self) -> int:
        return len(self._offsets) - 1

    def _item(self, index: int) -> str:
        return os.fsdecode(self._bytes[self._offsets[index]:self._offsets[index + 1]].tobytes())

    @property
    def nbytes(self) -> int:
        return self._offsets.nbytes + self._bytes.nbytes


def _encode(text: str) -> bytes:
    """``text`` as the file system encodes names; a code point no name can hold (a lone
    surrogate, e.g. from a JSON ``"\\ud800"`` escape in a caption) becomes "?"."""
    try:
        return os.fsencode(text)
    except UnicodeEncodeError:
        return text.encode("utf-8", "replace")


class PathTable(_Packed):
    """Paths held as a `TextTable` (see there for why)."""

    def __init__(self, paths: Iterable[str | os.PathLike]) -> None:
        self.texts = TextTable(os.fspath(path) for path in paths)

    def __len__(self) -> int:
        return len(self.texts)

    def _item(self, index: int) -> Path:
        return Path(self.texts[index])


class CaptionTable(_Packed):
    """The captions of each image (``table[i]`` is image i's list) as one `TextTable`."""

    def __init__(self, per_image: Iterable[Sequence[str]]) -> None:
        per_image = list(per_image)
        self.starts = np.zeros(len(per_image) + 1, dtype=np.int64)
        np.cumsum([len(captions) for captions in per_image], out=self.starts[1:])
        self.texts = TextTable(caption for captions in per_image for caption in captions)

    def __len__(self) -> int:
        return len(self.starts) - 1

    def _item(self, index: int) -> list[str]:
        return self.texts[int(self.starts[index]):int(self.starts[index + 1])]


@dataclass
class ImageSource:
    """An indexable list of images, made of the parts of one or more specs (a `mixture.Part`:
    the reader of an image folder and of demo images, and through `PairSource` of pairs files)."""

    entries: Sequence[ImageEntry] = field(default_factory=list)
    specs: list[str] = field(default_factory=list, kw_only=True)  # the spec of each part, in order
    starts: list[int] = field(default_factory=list, kw_only=True)  # the index of each part's first entry
    ignored: Counter[str] = field(default_factory=Counter, kw_only=True)
    """Files in image folders that are not images, by lower-cased extension ('' = none)."""

    def __len__(self) -> int:
        return len(self.entries)

    def add(self, spec: str, entries: Sequence[ImageEntry]) -> None:
        """Append the entries of ``spec`` as a new part (the first part is kept as given, so a
        one-spec source keeps its compact `PathTable`)."""
        self.starts.append(len(self.entries))
        self.specs.append(spec)
        self.entries = entries if not self.entries else [*self.entries, *entries]

    @property
    def spec(self) -> str:
        """The spec its entries came from (several, comma-separated, for a concatenation; '' for
        entries given without one)."""
        return ", ".join(dict.fromkeys(self.specs))

    def source_of(self, index: int) -> str:
        """The spec entry ``index`` came from ('' for entries given without one)."""
        part = bisect.bisect_right(self.starts, index) - 1
        return self.specs[part] if part >= 0 else ""

    def load(self, index: int) -> Image.Image | str:
        """Image ``index``, or the reason it cannot be used (see `load_image`; never raises for one)."""
        return load_image(self.entries[index])

    def captions_of(self, index: int) -> list[str]:
        """Refused: these are images only (a `PairSource` has captions)."""
        raise TypeError(f"{self.spec or 'this source'} holds images only")

    def describe(self, index: int) -> str:
        """Entry ``index`` for a message: its file, or its place in the source (an image in memory)."""
        entry = self.entries[index]
        return str(entry) if isinstance(entry, Path) else f"{self.spec} #{index}"

    @property
    def skipped(self) -> Counter[str]:
        """Entries left out while indexing, per reason (none: folders list only image files)."""
        return Counter()

    def summary(self) -> str:
        """One line for the run's log: how many images, and which files were left out."""
        line = f"{len(self)} images"
        if self.ignored:
            most_first = sorted(self.ignored.items(), key=lambda item: (-item[1], item[0]))
            counts = ", ".join(f"{ext or 'no extension'}: {n}" for ext, n in most_first)
            line += f", {sum(self.ignored.values())} other files ignored ({counts})"
        return line


@dataclass
class PairSource(ImageSource):
    """Images with all their captions: ``captions[i]`` are the captions of image ``i``."""

    captions: Sequence[list[str]] = field(default_factory=list)
    bad_rows: dict[str, list[int]] = field(default_factory=dict)
    """Malformed .csv/.tsv rows left out: the first line of each, per file."""

    def captions_of(self, index: int) -> list[str]:
        """All captions of image ``index``."""
        return self.captions[index]

    @property
    def skipped(self) -> Counter[str]:
        """Rows left out while indexing, per reason."""
        return Counter({"malformed_row": sum(map(len, self.bad_rows.values()))} if self.bad_rows else {})

    def summary(self) -> str:
        """One line for the run's log: images, captions and the rows left out."""
        line = f"{len(self)} images with {sum(map(len, self.captions))} captions"
        for path, lines in self.bad_rows.items():
            line += f"; {path}: {len(lines)} malformed rows skipped (lines {_some(lines)})"
        return line


# --------------------------------------------------------------------------- training sources

def image_source(specs: str | Sequence[str], key: str = "data.images") -> ImageSource:
    """Images of one spec or of several concatenated: an image folder (every image file below
    it, recursively, in sorted path order; other files are counted in ``ignored``),
    ``demo:digits`` (the train-split single digits) or ``demo:digit_pairs`` (the train
    digit-pair images, without their captions)."""
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
            files, ignored = _images_below(path)
            _require_images(files, ignored, spec, spec_key)
            source.ignored += ignored
            entries = PathTable(files)
        source.add(spec, entries)
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
                found = [line.strip() for line in text_lines(path, spec_key) if line.strip()]
            elif suffix == ".json" and path.is_file():
                annotations = _coco_annotations(_read_coco(path, spec_key), path, spec_key, ("caption",))
                found = [annotation["caption"].strip() for annotation in annotations]
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
    each image. Relative image paths are resolved against ``image_root``; with '' against the
    file's folder, or, for a COCO file laid out as COCO ships it
    (``<root>/annotations/captions_<split>.json``), against ``<root>/<split>/``.
    ``demo:digit_pairs``: the train digit pairs.
    """
    source = PairSource()
    for spec, spec_key in _each_spec(specs, key):
        part = _pairs(spec, spec_key, image_root, csv_image_key, csv_caption_key, split="train")
        source.add(spec, part.entries)
        source.captions = part.captions if not source.captions else [*source.captions, *part.captions]
        source.bad_rows.update(part.bad_rows)
    return source


# --------------------------------------------------------------------------- evaluation sources

def eval_pairs(spec: str, image_root: str = "", csv_image_key: str = "filepath",
               csv_caption_key: str = "title", key: str = "eval.data"
               ) -> tuple[PairSource, list[str], list[int]]:
    """A retrieval set with every caption: ``(images, captions, text_to_image)`` where
    ``text_to_image[j]`` is the index of the image caption ``j`` describes (COCO: 5 per image).

    Takes the pair specs of `pair_source` (image paths resolved the same way); ``demo:digit_pairs``
    are the 100 held-out pairs and ``demo:digits`` the held-out single digits, each with the
    first template's caption.
    """
    pairs = _pairs(spec, key, image_root, csv_image_key, csv_caption_key, split="heldout")
    captions = [caption for per_image in pairs.captions for caption in per_image]
    text_to_image = [i for i, per_image in enumerate(pairs.captions) for _ in per_image]
    return pairs, captions, text_to_image


def classification_source(spec: str, key: str = "eval.zeroshot"
                          ) -> tuple[ImageSource, list[int], list[str], list[str] | None]:
    """A zero-shot set: ``(images, labels, classnames, templates)``.

    A folder with one sub-folder per class (its image files, recursively, are that class's
    images; other files are counted in ``images.ignored``): class names are the sub-folder
    names with '_' read as ' ', or the lines of a ``classnames.txt`` beside the sub-folders
    (one per sub-folder, in sorted order); templates are ``None`` (the evaluator's
    ``eval.templates`` apply). ``demo:digits``: the held-out single digits, their names and
    the demo's own templates.
    """
    if _is_demo(spec):
        digits = _demo(spec, key, {"demo:digits"})
        held_out = digits.digit_images("heldout")
        images = ImageSource()
        images.add(spec, [image for image, _ in held_out])
        return (images, [label for _, label in held_out], list(digits.DIGIT_NAMES),
                list(digits.SINGLE_TEMPLATES))
    root = _existing_path(spec, key, _CLASS_SPECS)
    if not root.is_dir():
        raise RecipeError(f"'{key}': {root} is a file; a zero-shot set is {_CLASS_SPECS}")
    folders = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not folders:
        raise RecipeError(f"'{key}': {root} has no sub-folders; a zero-shot set is {_CLASS_SPECS}")
    classnames = [folder.name.replace("_", " ") for folder in folders]
    names_file = root / "classnames.txt"
    if names_file.is_file():
        classnames = [line.strip() for line in text_lines(names_file, key) if line.strip()]
        if len(classnames) != len(folders):
            raise RecipeError(f"'{key}': {names_file} has {len(classnames)} names but {root} has "
                              f"{len(folders)} class folders; give one name per folder, in sorted folder order")
    images = ImageSource()
    labels: list[int] = []
    for label, folder in enumerate(folders):
        files, ignored = _images_below(folder)
        images.add(spec, files)
        images.ignored += ignored
        labels += [label] * len(files)
    _require_images(images.entries, images.ignored, spec, key)
    return images, labels, classnames, None


# --------------------------------------------------------------------------- helpers

def _pairs(spec: str, key: str, image_root: str, csv_image_key: str, csv_caption_key: str,
           split: str) -> PairSource:
    """The pairs of one spec, as one part; ``split`` picks the demo's train or held-out part."""
    source = PairSource()
    if _is_demo(spec):
        digits = _demo(spec, key, {"demo:digit_pairs", "demo:digits"} if split == "heldout"
                       else {"demo:digit_pairs"})
        if spec == "demo:digits":
            template = digits.SINGLE_TEMPLATES[0]
            singles = digits.digit_images(split)
            source.add(spec, [image for image, _ in singles])
            source.captions = [[template.format(digits.DIGIT_NAMES[label])] for _, label in singles]
        else:
            pairs = digits.digit_pairs(split)
            source.add(spec, [image for image, _ in pairs])
            source.captions = [[caption] for _, caption in pairs]
        return source
    path = _existing_path(spec, key, _PAIR_SPECS)
    suffix = path.suffix.lower()
    if suffix in (".csv", ".tsv") and path.is_file():
        rows, bad_lines = _table_rows(path, key, csv_image_key, csv_caption_key)
        if bad_lines:
            source.bad_rows[str(path)] = bad_lines
    elif suffix == ".json" and path.is_file():
        rows = _coco_rows(path, key)
    else:
        raise RecipeError(f"'{key}': cannot read image-caption pairs from {path}; accepted: {_PAIR_SPECS}")
    grouped: dict[str, list[str]] = {}  # insertion-ordered: images keep their first-seen order
    for image, caption in rows:
        grouped.setdefault(image, []).append(caption)
    _require_some(grouped, spec, key, "image-caption pairs")
    root = Path(image_root).expanduser() if image_root else _own_image_root(path)
    source.add(spec, PathTable(os.path.join(root, image) for image in grouped))
    source.captions = CaptionTable(grouped.values())
    return source


def _own_image_root(path: Path) -> Path:
    """Where the images of a pairs file are when no image root is given: ``<root>/<split>/`` for
    a COCO file laid out as COCO ships it (``<root>/annotations/captions_<split>.json``),
    otherwise the file's own folder."""
    split = path.stem.removeprefix("captions_")
    if (path.suffix.lower() == ".json" and path.parent.name == "annotations" and split != path.stem
            and (path.parent.parent / split).is_dir()):
        return path.parent.parent / split
    return path.parent


def _table_rows(path: Path, key: str, image_key: str, caption_key: str
                ) -> tuple[list[tuple[str, str]], list[int]]:
    """``(image path, caption)`` of every well-formed row of a .csv/.tsv file with a header
    row, and the first line of each malformed row (left out). A .tsv has no quoting."""
    tsv = path.suffix.lower() == ".tsv"
    lines = text_lines(path, key)
    reader = csv.reader(lines, delimiter="\t", quoting=csv.QUOTE_NONE) if tsv else csv.reader(lines)
    columns = next(reader, [])
    for wanted, setting in ((image_key, "data.csv_image_key"), (caption_key, "data.csv_caption_key")):
        if wanted not in columns:
            raise RecipeError(
                f"'{key}': {path} has no column '{wanted}' (named by '{setting}'); columns found: "
                f"{', '.join(repr(c) for c in columns) or 'none'}. Set 'data.csv_image_key' and "
                f"'data.csv_caption_key' to the image-path and caption columns")
    image_column, caption_column = columns.index(image_key), columns.index(caption_key)
    rows: list[tuple[str, str]] = []
    bad_lines: list[int] = []
    first_line = reader.line_num + 1
    for row in reader:
        # A field over several lines is an unmatched quote that swallowed the rows after it.
        if len(row) != len(columns) or not row[image_column] or any("\n" in value for value in row):
            bad_lines.append(first_line)
        else:
            rows.append((row[image_column], row[caption_column].strip()))
        first_line = reader.line_num + 1
    if len(bad_lines) > len(rows):
        layout = "a .tsv is tab-separated, unquoted" if tsv else "a .csv is comma-separated, with standard quoting"
        raise RecipeError(
            f"'{key}': {path}: {len(bad_lines)} of {len(bad_lines) + len(rows)} rows are malformed (lines "
            f"{_some(bad_lines)}: a field count other than the header's {len(columns)}, a field over several "
            f"lines or no image path); {layout}: check the file's delimiter and quotes")
    return rows, bad_lines


def _coco_rows(path: Path, key: str) -> list[tuple[str, str]]:
    """``(file_name, caption)`` of every caption of a COCO captions file, in "images" order."""
    data = _read_coco(path, key)
    if not isinstance(data.get("images"), list):
        raise RecipeError(f"'{key}': {path} has no \"images\" list; image-caption pairs need a COCO "
                          f"captions file with both \"images\" and \"annotations\"")
    by_image: dict[int, list[str]] = {}
    for annotation in _coco_annotations(data, path, key, ("image_id", "caption")):
        by_image.setdefault(annotation["image_id"], []).append(annotation["caption"].strip())
    rows = []
    for i, image in enumerate(data["images"]):
        if not isinstance(image, dict) or "id" not in image or not isinstance(image.get("file_name"), str):
            raise RecipeError(f"'{key}': {path}: \"images\"[{i}] has no \"id\" and \"file_name\"; "
                              f"a COCO captions file lists each image as {{\"id\": ..., \"file_name\": ...}}")
        rows += [(image["file_name"], caption) for caption in by_image.get(image["id"], [])]
    return rows


def _coco_annotations(data: dict, path: Path, key: str, fields: tuple[str, ...]) -> list[dict]:
    """The "annotations" of a COCO captions file, each checked to hold ``fields`` (a
    "caption" must be text)."""
    for i, annotation in enumerate(data["annotations"]):
        if (not isinstance(annotation, dict) or any(name not in annotation for name in fields)
                or not isinstance(annotation.get("caption", ""), str)):
            raise RecipeError(f"'{key}': {path}: \"annotations\"[{i}] has no {' and '.join(map(repr, fields))} "
                              f"(found {json.dumps(annotation)[:80]}); a COCO captions file has "
                              f"{{\"image_id\": ..., \"caption\": \"...\"}} per annotation")
    return data["annotations"]


def _read_coco(path: Path, key: str) -> dict:
    """A COCO captions file (a mapping with an "annotations" list)."""
    raw = path.read_bytes()
    try:
        data = json.loads(raw.decode("utf-8-sig"))
    except UnicodeDecodeError as error:
        raise _not_utf8(path, key, raw[:error.start].count(b"\n") + 1) from None
    except json.JSONDecodeError as error:
        raise RecipeError(f"'{key}': {path} is not valid JSON ({error})") from None
    if not isinstance(data, dict) or not isinstance(data.get("annotations"), list):
        raise RecipeError(f"'{key}': {path} is not a COCO captions file (no \"annotations\" list)")
    return data


def text_lines(path: Path, key: str) -> Iterator[str]:
    """The lines of a UTF-8 text file (a leading byte-order mark dropped), decoded one at a time
    so that a line in another encoding is reported by number."""
    with open(path, "rb") as f:
        for number, raw in enumerate(f, start=1):
            try:
                yield raw.decode("utf-8-sig" if number == 1 else "utf-8")
            except UnicodeDecodeError:
                raise _not_utf8(path, key, number) from None


def _not_utf8(path: Path, key: str, line: int) -> RecipeError:
    return RecipeError(f"'{key}': {path} line {line} is not UTF-8 text; re-save the file as UTF-8 "
                       f"(e.g. iconv -f latin1 -t utf-8 {path.name} > fixed{path.suffix})")


def _images_below(folder: Path) -> tuple[list[Path], Counter[str]]:
    """The image files below ``folder`` (by extension), recursively, in sorted path order, and
    the other files counted by extension. Hidden files and folders (names starting with '.',
    such as macOS's ``._x.jpg``) are tool metadata: left out and not counted; symlinked
    folders are not followed."""
    images: list[Path] = []
    others: Counter[str] = Counter()
    for directory, subfolders, files in os.walk(folder):
        subfolders[:] = [name for name in subfolders if not name.startswith(".")]
        for name in files:
            if name.startswith("."):
                continue
            extension = os.path.splitext(name)[1].lower()
            if extension in IMAGE_EXTENSIONS:
                images.append(Path(directory, name))
            else:
                others[extension] += 1
    return sorted(images), others


def _require_images(files: list[ImageEntry], ignored: Counter[str], spec: str, key: str) -> None:
    if not files:
        others = (f", only {sum(ignored.values())} other files ({', '.join(ext or 'no extension' for ext in ignored)})"
                  if ignored else "")
        raise RecipeError(f"'{key}': {spec} contains no images{others}; images are "
                          f"{', '.join(sorted(IMAGE_EXTENSIONS))} files")


def _some(numbers: list[int], shown: int = 5) -> str:
    """``1, 4, 9`` or ``1, 4, 9, 12, 20, ... (8 in all)``."""
    text = ", ".join(map(str, numbers[:shown]))
    return text + (f", ... ({len(numbers)} in all)" if len(numbers) > shown else "")


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
    """The digits demo's data (`tinyclip_ds.data.digits`), after checking that ``spec`` is demo
    data this key accepts."""
    if spec not in allowed:
        raise RecipeError(f"'{key}': unknown demo data '{spec}'; demo data here: {', '.join(sorted(allowed))}")
    from tinyclip_ds.data import digits  # imported lazily: scikit-learn and building the digits take seconds
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
