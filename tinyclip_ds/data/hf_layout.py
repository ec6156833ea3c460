"""Whether a path is a Hugging Face dataset `tinyclip_ds.data.hf` reads, from file names alone.

Kept apart from `hf` because importing `datasets` takes seconds: every run asks this of each of
its sources, and only runs that read a dataset should pay for the import.
"""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path

SAVED_MARKERS = ("dataset_info.json", "state.json", "dataset_dict.json")
METADATA_FILES = ("metadata.jsonl", "metadata.csv")
ACCEPTED = ("a save_to_disk folder, a .arrow file, a .parquet file or folder of them, or an imagefolder "
            "(images + metadata.jsonl/metadata.csv with a file_name column)")
_PEEKED_FOLDERS = 100  # sub-folders looked into for parquet files / imagefolder metadata
_PEEKED_ENTRIES = 1000  # entries looked at in each: a folder of parquet shards shows one at once


def is_hf_spec(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a dataset `tinyclip_ds.data.hf` reads (see its docstring); cheap: looks
    at file names only (a folder's own entries and the first entries of its sub-folders)."""
    return kind_of(Path(path).expanduser()) != ""


def kind_of(path: Path) -> str:
    """"arrow", "parquet", "saved", "imagefolder", "parquet_folder", or "" for none of them."""
    if path.is_file():
        return {".arrow": "arrow", ".parquet": "parquet"}.get(path.suffix.lower(), "")
    if not path.is_dir():
        return ""
    if any((path / name).is_file() for name in SAVED_MARKERS):
        return "saved"
    parquet_here = False
    folders: list[Path] = []
    with os.scandir(path) as entries:
        for entry in entries:
            if entry.name.startswith("."):
                continue
            if entry.is_dir():
                folders.append(Path(entry.path))
            elif entry.name.lower().endswith(".parquet"):
                parquet_here = True
    folders = sorted(folders)[:_PEEKED_FOLDERS]
    if any(_has_metadata(folder) for folder in [path, *folders]):
        return "imagefolder"
    if parquet_here or any(_peek_parquet(folder) for folder in folders):
        return "parquet_folder"
    return ""


def _has_metadata(folder: Path) -> bool:
    """Whether ``folder`` holds an imagefolder metadata file with a ``file_name`` column."""
    for name in METADATA_FILES:
        file = folder / name
        if not file.is_file():
            continue
        try:
            with open(file, encoding="utf-8-sig", errors="replace") as f:
                first = f.readline()
            columns = (next(csv.reader([first]), []) if name.endswith(".csv")
                       else list(json.loads(first)) if first.strip() else [])
        except (OSError, ValueError, TypeError):  # unreadable, or not JSON / not an object
            continue
        # datasets also accepts "<name>_file_name" columns (several files per row)
        if any(column == "file_name" or column.endswith("_file_name") for column in columns):
            return True
    return False


def _peek_parquet(folder: Path) -> bool:
    """Whether one of the first entries of ``folder`` is a parquet file."""
    try:
        with os.scandir(folder) as entries:
            for count, entry in enumerate(entries):
                if count >= _PEEKED_ENTRIES:
                    break
                if entry.name.lower().endswith(".parquet"):
                    return True
    except OSError:
        pass
    return False
