"""Hugging Face `datasets` as a random-access source of images and captions.

A spec is a local path in one of the forms `datasets` itself writes or reads (`is_hf_spec`):

- a folder written by ``save_to_disk``: ``state.json`` + ``dataset_info.json`` + ``data-*.arrow``
  (a `Dataset`), or ``dataset_dict.json`` + one such folder per split (a `DatasetDict`;
  ``data.split`` picks one);
- one ``.arrow`` file in the Arrow IPC *stream* format `datasets` writes (a cache file);
- one ``.parquet`` file, or a folder whose data files are ``*.parquet`` (the Hub layout
  ``data/train-00000-of-00004.parquet`` included: file and folder names give the splits, as
  `datasets` infers them);
- an ``imagefolder``: image files plus a ``metadata.jsonl`` or ``metadata.csv`` with a
  ``file_name`` column (beside the images or in per-split sub-folders ``train/``, ...). A
  plain image folder without metadata is not a spec here (`sources.image_source` reads it).

Rows are read from memory-mapped Arrow, as `datasets` does natively: ``save_to_disk`` folders
and ``.arrow`` files are mapped where they are; parquet files and imagefolders are first
converted by `datasets`' own builders into Arrow files in its cache (``cache_dir``, by default
``~/.cache/huggingface/datasets``) and those are mapped. That conversion runs once per
dataset (later opens find the cache) and takes time proportional to the data: parquet copies
every byte (images included), an imagefolder only writes its image paths and metadata.

No network: nothing here goes through ``load_dataset`` (which calls the Hub to count
downloads unless HF_HUB_OFFLINE is set); the builders are run directly on local data files,
as `Dataset.from_parquet` does, and nothing global is set.

Columns: the image column is an ``Image`` feature (read with ``decode=False``, so that this
module decodes the bytes and names what is wrong with bad ones), raw bytes, or file paths
(relative ones resolved against ``image_root``, or the dataset's own folder); the caption
column is text, or a list of texts (COCO style: several captions per image). Both are found
by name unless given (`IMAGE_COLUMNS`, `CAPTION_COLUMNS`).

Nothing is scanned per row at open, so a row's problems (undecodable image bytes, a missing
image file, an empty caption) are found only when it is loaded, as a reason
(`decode.SKIP_REASONS`, `decode.CAPTION_SKIP_REASONS`); ``skipped`` (rows left out while
indexing) is therefore always empty. What opening does cost is Arrow's per-record-batch
metadata, read for every batch of every mapped file: about 1.5 KB of RAM and ~10 us per batch
and column view. `datasets` writes image datasets in batches of 100 rows, so 10^7 rows open in
~2 s and ~250 MB, and 10^9 rows saved that way would take minutes and tens of GB: write such
a set with a larger ``writer_batch_size`` (or as webdataset shards).
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import datasets
import pyarrow as pa
from datasets.data_files import DataFilesDict, get_data_patterns
from datasets.packaged_modules import _PACKAGED_DATASETS_MODULES
from datasets.packaged_modules.imagefolder.imagefolder import ImageFolder
from datasets.packaged_modules.parquet.parquet import Parquet
from PIL import Image

from tinyclip_ds.config import RecipeError
from tinyclip_ds.data import decode
from tinyclip_ds.data.hf_layout import ACCEPTED, kind_of

log = logging.getLogger(__name__)

IMAGE_COLUMNS = ("image", "jpg", "png", "webp", "img", "image_path", "filepath", "file_name", "path")
"""Image column names tried in this order (case-insensitive) when ``image_column`` is ''; when none
fits, the first column with an ``Image`` feature is used."""

CAPTION_COLUMNS = ("text", "caption", "txt", "title", "sentence", "caption_text",
                   "captions", "sentences", "texts")
"""Caption column names tried in this order (case-insensitive) when ``caption_column`` is ''."""

_RECORD_BATCH_BYTES = 1500
"""RAM one Arrow record batch of a memory-mapped table costs (its C++ array and buffer objects),
measured with pyarrow 26 as the growth of RssAnon while opening a 10^5-batch file: 0.7-1.9 KB."""

_reported: Counter[str] = Counter()  # bad dataset cells warned about in this process, per reason
_WARNINGS_PER_REASON = 20  # then quiet: the counts per reason are the record, not the log


# --------------------------------------------------------------------------- the source

class HFSource:
    """One Hugging Face dataset as a `mixture.Part`: row ``i`` is sample ``i``.

    Nothing per row is checked at open (rows left out while indexing, ``skipped``, stay
    empty): a row whose image or caption cannot be used is found when loaded, and `load` /
    `captions_of` return its reason. Pickles small (the memory-mapped tables pickle as their
    file names) for DataLoader workers; forked workers share the mapping.
    """

    def __init__(self, spec: str, key: str = "data.pairs", need: Sequence[str] = ("image", "text"),
                 image_column: str = "", caption_column: str = "", split: str = "train",
                 max_caption_chars: int = 2000, image_root: str = "", cache_dir: str = "",
                 split_key: str = "data.split") -> None:
        """Open ``spec`` (see the module docstring). ``need``: what every sample must have
        ("image", "text"); a needed column that cannot be found is a `RecipeError`. ``split``
        picks one split of a spec that has several (a DatasetDict, a parquet folder or
        imagefolder with split files/folders); '' = its only split (several: an error naming
        ``split_key``, the option that picks one); a single dataset is read whole. ``cache_dir``:
        where parquet files and imagefolders are converted to Arrow ('' = datasets' cache)."""
        unknown = set(need) - {"image", "text"}
        if unknown:
            raise ValueError(f"need holds {sorted(unknown)}; it takes 'image' and 'text'")
        self.spec = spec
        self.key = key
        self.skipped: Counter[str] = Counter()  # always empty: rows are only checked when loaded
        self.max_caption_chars = max_caption_chars
        path = Path(spec).expanduser()
        if not spec or not path.exists():
            raise RecipeError(f"'{key}': {spec or 'the spec'} does not exist; give {ACCEPTED}")
        self.kind = kind_of(path)
        if not self.kind:
            raise RecipeError(f"'{key}': {path} is not a Hugging Face dataset; accepted: {ACCEPTED}")
        dataset, self.split = _open(path, self.kind, split, key, cache_dir, split_key)
        self.rows = len(dataset)
        self.image_root = Path(image_root).expanduser() if image_root else (path if path.is_dir() else path.parent)
        self._name = path.name + (f"/{self.split}" if self.split else "")

        found = ", ".join(repr(c) for c in dataset.column_names) or "none"
        self.image_column, self.image_kind = _image_column(dataset, image_column)
        self.caption_column, self.caption_kind = _caption_column(dataset, caption_column)
        for what, column, option, holds in (("image", self.image_column, "data.image_column",
                                             "an Image feature, image bytes or image file paths"),
                                            ("text", self.caption_column, "data.caption_column",
                                             "text, or a list of texts")):
            if column is None and what in need:
                given = image_column if what == "image" else caption_column
                problem = (f"has no usable column '{given}' (named by '{option}')" if given else
                           f"has no {'image' if what == 'image' else 'caption'} column (looked for "
                           f"{', '.join(IMAGE_COLUMNS if what == 'image' else CAPTION_COLUMNS)})")
                raise RecipeError(f"'{key}': {path}{' split ' + self.split if self.split else ''} {problem}; "
                                  f"columns found: {found}. Set '{option}' to the column holding {holds}")
        if self.image_kind == "feature" and "image" in need:
            # decode=False: we decode the bytes ourselves, so a bad image is a counted reason, not an error
            dataset = dataset.cast_column(self.image_column, datasets.Image(decode=False))
        # One view per needed column: reading a caption does not page in the row's image bytes.
        # Selecting columns of a memory-mapped table is zero-copy (and pickles as a replayed step).
        self._images = (dataset.select_columns([self.image_column])
                        if self.image_column and "image" in need else None)
        self._captions = (dataset.select_columns([self.caption_column])
                          if self.caption_column and "text" in need else None)

    def __len__(self) -> int:
        return self.rows

    def sample_id(self, index: int) -> str:
        """A name for row ``index`` in logs: ``<spec folder or file name>[/<split>]/<row>``."""
        return f"{self._name}/{index}"

    def describe(self, index: int) -> str:
        """Row ``index`` for a message: ``"<sample_id> of <spec>"``."""
        return f"{self.sample_id(index)} of {self.spec}"

    def load(self, index: int) -> Image.Image | str:
        """The image of row ``index``, decoded, or the reason it cannot be used (a key of
        `decode.SKIP_REASONS`); never raises for bad data."""
        if self._images is None:
            raise ValueError(f"{self.spec} was opened without images (need did not hold 'image')")
        value = self._images[index][self.image_column]
        if self.image_kind == "feature":  # {"bytes": ..., "path": ...}: bytes when embedded, else a file
            value = None if value is None else value["bytes"] if value["bytes"] is not None else value["path"]
        if value is None or value == "":
            return self._bad(index, "no_image", "the image cell is empty")
        if isinstance(value, str):
            return decode.load_image(self.image_root / value)  # warns once per file itself
        decoded = decode.decode_image_bytes(value)
        if isinstance(decoded, Image.Image):
            return decoded
        return self._bad(index, *decoded)

    def captions_of(self, index: int) -> list[str] | str:
        """The usable captions of row ``index`` (stripped; >= 1), or the reason it has none (a
        key of `decode.CAPTION_SKIP_REASONS`). In a list of captions, unusable ones are left
        out and the row is skipped only when none is left (reason: the first one's)."""
        if self._captions is None:
            raise ValueError(f"{self.spec} was opened without captions (need did not hold 'text')")
        try:
            value = self._captions[index][self.caption_column]
        except UnicodeDecodeError:  # Arrow does not validate every string it maps
            return "not_utf8"
        texts = [value] if self.caption_kind == "text" or value is None else value
        return decode.usable_captions(texts, self.max_caption_chars)

    def summary(self) -> str:
        """One line: rows, where they come from, the columns read, and rows skipped while indexing."""
        columns = []
        if self._images is not None:
            columns.append(f"image column '{self.image_column}' ({self.image_kind})")
        if self._captions is not None:
            columns.append(f"caption column '{self.caption_column}'"
                           + (" (lists of captions)" if self.caption_kind == "list" else ""))
        split = f", split {self.split}" if self.split else ""
        return (f"{self.rows} samples (Hugging Face {self.kind}{split}; {'; '.join(columns)}); "
                f"0 skipped while indexing (rows are checked when loaded)")

    def index_nbytes_in_ram(self) -> int:
        """Approximate RAM the opened dataset holds outside its memory-mapped files: Arrow buffers
        held in memory (an in-memory table, an in-memory indices mapping; none for mapped
        tables, whose pages belong to the shared, evictable page cache) plus
        `_RECORD_BATCH_BYTES` per record batch of each column view (Arrow's per-batch objects)."""
        total = 0
        for view in (self._images, self._captions):
            if view is None:
                continue
            total += _in_memory_bytes(view.data)
            if view._indices is not None:  # a select/shuffle mapping; none for the forms opened here
                total += _in_memory_bytes(view._indices)
            columns = view.data.table.columns
            total += _RECORD_BATCH_BYTES * (columns[0].num_chunks if columns else 0)
        return total

    def _bad(self, index: int, reason: str, detail: str) -> str:
        """``reason``, after a warning for the first few of each reason in this process."""
        _reported[reason] += 1
        if _reported[reason] <= _WARNINGS_PER_REASON:
            more = " (further ones are counted, not logged)" if _reported[reason] == _WARNINGS_PER_REASON else ""
            log.warning("skipping image of %s (%s): %s%s", self.sample_id(index), reason,
                        detail or decode.SKIP_REASONS.get(reason, ""), more)
        return reason


# --------------------------------------------------------------------------- helpers

def _open(path: Path, kind: str, split: str, key: str, cache_dir: str,
          split_key: str) -> tuple[datasets.Dataset, str]:
    """The dataset at ``path`` (memory-mapped) and the split read ('' for a single dataset)."""
    cache = str(Path(cache_dir).expanduser()) if cache_dir else None
    try:
        if kind == "arrow":
            return datasets.Dataset.from_file(str(path)), ""
        if kind == "parquet":
            return datasets.Dataset.from_parquet(str(path), cache_dir=cache), ""
        if kind == "saved":
            loaded = datasets.load_from_disk(str(path))
            if isinstance(loaded, datasets.Dataset):
                return loaded, ""
            split = _pick_split(list(loaded), split, path, key, split_key)
            return loaded[split], split
        # imagefolder or parquet folder: the split files as datasets' own rules find them
        # (train/, data/validation-*.parquet, ...; everything is "train" when no name says otherwise)
        parquet = kind == "parquet_folder"
        files = DataFilesDict.from_patterns(get_data_patterns(str(path)), base_path=str(path),
                                            allowed_extensions=[".parquet"] if parquet else None)
        split = _pick_split(list(files), split, path, key, split_key)
        builder_class = Parquet if parquet else ImageFolder
        # The builder run directly, as Dataset.from_parquet does: load_dataset would also call the Hub
        builder = builder_class(cache_dir=cache, data_files=DataFilesDict({split: files[split]}),
                                hash=_PACKAGED_DATASETS_MODULES["parquet" if parquet else "imagefolder"][1])
        builder.download_and_prepare()
        return builder.as_dataset(split=split), (split if len(files) > 1 else "")
    except RecipeError:
        raise
    except Exception as error:  # noqa: BLE001 - datasets/pyarrow raise many types for damaged or foreign files
        raise RecipeError(f"'{key}': cannot read {path} as a Hugging Face dataset ({type(error).__name__}: "
                          f"{str(error)[:300]}); accepted: {ACCEPTED}") from error


def _pick_split(splits: list[str], split: str, path: Path, key: str, split_key: str) -> str:
    """``split`` if ``path`` has it; '' = its only split."""
    if not split and len(splits) == 1:
        return splits[0]
    if split not in splits:
        has = f"has no split '{split}'" if split else "has several splits"
        raise RecipeError(f"'{key}': {path} {has}; its splits: {', '.join(map(str, splits))}. "
                          f"Set '{split_key}' to one of them")
    return split


def _image_column(dataset: datasets.Dataset, wanted: str) -> tuple[str | None, str]:
    """``(column, kind)``: kind "feature" (an Image feature), "bytes" or "path"; ``(None, "")``
    when no column fits (``wanted`` absent or of another type, or none found by name)."""
    candidates = [wanted] if wanted else _by_name(dataset.column_names, IMAGE_COLUMNS)
    if not wanted:  # then any Image feature, for datasets that name it otherwise
        candidates += [c for c, f in dataset.features.items() if isinstance(f, datasets.Image)]
    for column in candidates:
        if column not in dataset.column_names:
            continue
        feature = dataset.features[column]
        arrow_type = dataset.data.schema.field(column).type
        if isinstance(feature, datasets.Image):
            return column, "feature"
        if (pa.types.is_binary(arrow_type) or pa.types.is_large_binary(arrow_type)
                or pa.types.is_binary_view(arrow_type)):
            return column, "bytes"
        if _is_text(arrow_type):
            return column, "path"
    return None, ""


def _caption_column(dataset: datasets.Dataset, wanted: str) -> tuple[str | None, str]:
    """``(column, kind)``: kind "text" or "list" (several captions); ``(None, "")`` when none fits."""
    for column in [wanted] if wanted else _by_name(dataset.column_names, CAPTION_COLUMNS):
        if column not in dataset.column_names:
            continue
        arrow_type = dataset.data.schema.field(column).type
        if _is_text(arrow_type):
            return column, "text"
        if (pa.types.is_list(arrow_type) or pa.types.is_large_list(arrow_type)
                or pa.types.is_fixed_size_list(arrow_type)) and _is_text(arrow_type.value_type):
            return column, "list"
    return None, ""


def _by_name(columns: list[str], names: Sequence[str]) -> list[str]:
    """The columns whose lower-cased name is in ``names``, in the order of ``names`` (an exact
    match before a case-insensitive one: LAION's parquet files name the caption "TEXT")."""
    found = []
    for name in names:
        found += [c for c in columns if c == name] + [c for c in columns if c != name and c.lower() == name]
    return found


def _is_text(arrow_type: pa.DataType) -> bool:
    return pa.types.is_string(arrow_type) or pa.types.is_large_string(arrow_type) or pa.types.is_string_view(arrow_type)


def _in_memory_bytes(table: Any) -> int:
    """Bytes of a `datasets` table's blocks held in memory (memory-mapped blocks count 0)."""
    if isinstance(table, datasets.table.InMemoryTable):
        return table.nbytes
    if isinstance(table, datasets.table.ConcatenationTable):
        return sum(_in_memory_bytes(block) for row in table.blocks for block in row)
    return 0
