"""Random access to webdataset tar shards (the img2dataset layout), through a compact index.

Spec forms (`is_shard_spec`, `shard_paths`): a brace pattern (``shards/{00000..00099}.tar``,
several braces and ``{a,b}`` lists allowed), one ``.tar`` file, or a folder holding ``*.tar``
files (used in sorted order). Shards must be plain (uncompressed) local tar files: members
are read in place at their byte offsets. A shard named by a pattern but absent is skipped and
counted (``missing_shard``: img2dataset leaves gaps where a shard failed); none present is a
`RecipeError`.

Sample layout, following webdataset: a member's *key* is its path with the basename cut at
its first '.', its *extension* the rest, lower-cased (``000000123.jpg`` -> ``000000123``,
``jpg``); consecutive members with one key form a sample. The image is the sample's first
member with an image extension (`decode.IMAGE_EXTENSIONS`); the caption is its ``txt``
member, else the ``caption`` field of its ``json`` member (img2dataset writes both). Other
members (``.npy``, ...) and webdataset metadata (``__key__``-style names) are ignored.
``need`` says which members a sample must have ("image", "text" or both); a sample without
one is left out while indexing and counted (`INDEX_SKIP_REASONS`).

Index: scanning reads tar headers only (`tarfile`; member data is never read), one shard per
task in a process pool, and writes

* ``<hash>.npy``: one row per sample, `INDEX_DTYPE` (packed, 37 bytes): ``shard`` (int32,
  position in the shard list), ``image_offset`` / ``image_size`` (int64; byte offset of the
  member's data in the shard; offset -1 = no image member), ``caption_offset`` /
  ``caption_size`` (int64) and ``caption_kind`` (uint8: 0 none, 1 txt, 2 json). Opened
  with ``np.load(mmap_mode="r")``: nothing per sample is held in Python objects.
* ``<hash>.json``: the sidecar: index format version, ``need``, the fingerprint (each shard's
  absolute path, size and mtime_ns), per-shard sample counts, skipped counts per reason and
  which shards were skipped. ``<hash>`` is a hash of version + need + fingerprint, so a
  changed shard set (a touched, added or removed shard) gets a new index.

The index lives in ``cache_dir`` if given, else ``<shards folder>/.tinyclip_index/``, falling
back to ``$XDG_CACHE_HOME`` (``~/.cache``) ``/tinyclip_ds/shard_index/`` where the first is
not writable. Ranks starting together serialise on a `filelock.FileLock`: one builds, the
others then load; files are written under temporary names and renamed into place.

Loading: member bytes are read with ``os.pread`` on raw file descriptors, opened lazily per
process (reopened after a fork, dropped when pickled, at most `MAX_OPEN_SHARDS` kept), so a
part is safe in DataLoader workers. A problem found then is returned as a reason, never
raised: images use `decode.SKIP_REASONS`, captions `decode.CAPTION_SKIP_REASONS`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import mmap
import multiprocessing
import os
import shutil
import sys
import tarfile
import tempfile
import time
from collections import Counter, OrderedDict
from collections.abc import Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from itertools import repeat
from pathlib import Path

import numpy as np
from braceexpand import braceexpand
from filelock import FileLock, Timeout
from PIL import Image
from tqdm import tqdm

from tinyclip_ds.config import RecipeError
from tinyclip_ds.data.decode import IMAGE_EXTENSIONS, decode_image_bytes, usable_captions

log = logging.getLogger(__name__)

INDEX_VERSION = 1
"""Bumped whenever the index files change meaning; an index of another version is rebuilt."""

INDEX_DTYPE = np.dtype([("shard", "<i4"), ("image_offset", "<i8"), ("image_size", "<i8"),
                        ("caption_offset", "<i8"), ("caption_size", "<i8"), ("caption_kind", "u1")])
"""One index row per sample (packed: 37 bytes)."""

CAPTION_NONE, CAPTION_TXT, CAPTION_JSON = 0, 1, 2
"""``caption_kind`` values: no caption member, a ``.txt`` member, a ``.json`` member's "caption"."""

INDEX_SKIP_REASONS = {
    "no_image_member": "the sample has no image member (.jpg, .png, .webp, ...)",
    "no_caption_member": "the sample has neither a .txt nor a .json member",
    "missing_shard": "a shard named by the spec does not exist (img2dataset leaves gaps where a shard failed)",
    "unreadable_shard": "the shard cannot be opened or read as an uncompressed tar file",
    "truncated_shard": "the tar file ends early or is damaged partway; the members before the break are kept",
}
"""Why samples (the first two) or whole shards (the others; counted per shard) are left out while indexing."""

MAX_OPEN_SHARDS = 128
"""File descriptors a process keeps open per part (least recently used closed first): random
access over 10^4 shards must not run into the open-files limit."""

NEEDS = ("image", "text")

_IMAGE_EXTS = frozenset(ext.lstrip(".") for ext in IMAGE_EXTENSIONS)
_ACCEPTED = ("a brace pattern of .tar shards (shards/{00000..00099}.tar), one .tar file, or a folder "
             "holding .tar files")
_reported: set[tuple[str, str]] = set()  # (shard, reason) this process has already warned about


# --------------------------------------------------------------------------- specs

def is_shard_spec(spec: str) -> bool:
    """Whether ``spec`` names tar shards: it ends in ``.tar`` (a file or a brace pattern; also
    ``.tar.gz`` / ``.tgz`` and URLs, so that `shard_paths` can explain why those are not read),
    or it is a folder holding ``.tar`` files directly."""
    lowered = spec.lower()
    if lowered.endswith((".tar", ".tar.gz", ".tgz")):
        return True
    path = Path(spec).expanduser()
    try:
        return path.is_dir() and any(_is_tar_name(child.name) for child in path.iterdir())
    except OSError:
        return False


def shard_paths(spec: str, key: str = "data.pairs") -> list[Path]:
    """The shard files ``spec`` names, in order, absent ones included (they are skipped as
    ``missing_shard`` when indexing). `RecipeError` when it names no existing shard."""
    if "://" in spec or spec.startswith("pipe:"):
        raise RecipeError(f"'{key}': {spec} is not a local path; shards are read at random, so they must be "
                          f"local (or mounted) files: download or mount them and give their path")
    if spec.lower().endswith((".tar.gz", ".tgz")):
        raise RecipeError(f"'{key}': {spec}: compressed shards cannot be read at random; decompress them "
                          f"(gunzip) and give the .tar files")
    if "{" in spec:
        paths = [Path(name).expanduser() for name in expand_braces(spec)]
        present = [path for path in paths if path.is_file()]
        if not present:
            raise RecipeError(f"'{key}': none of the {len(paths)} shards of {spec} exists (first: {paths[0]}); "
                              f"check the folder and the {{first..last}} range")
        return paths
    path = Path(spec).expanduser()
    if not path.exists():
        raise RecipeError(f"'{key}': {path} does not exist; give {_ACCEPTED}")
    if path.is_dir():
        paths = sorted(child for child in path.iterdir() if _is_tar_name(child.name) and child.is_file())
        if not paths:
            raise RecipeError(f"'{key}': {path} holds no .tar files; give {_ACCEPTED}")
        return paths
    if not path.is_file():  # a FIFO or device would block the indexer's read forever
        raise RecipeError(f"'{key}': {path} is not a regular file; give {_ACCEPTED}")
    return [path]


def expand_braces(pattern: str) -> list[str]:
    """``{a..b}`` ranges (zero-padded like their ends) and ``{x,y}`` lists, as bash does."""
    return list(braceexpand(pattern))


def _is_tar_name(name: str) -> bool:
    return name.lower().endswith(".tar") and not name.startswith(".")


def _split_name(name: str) -> tuple[str, str] | None:
    """``(key, extension)`` of a member path, webdataset's way, or None for a member that is
    not part of a sample (no extension, a hidden ``.name``, webdataset ``__meta__`` files)."""
    folder, _, base = name.rpartition("/")
    stem, dot, ext = base.partition(".")
    if not dot or not stem or base.startswith("__"):
        return None
    return (f"{folder}/{stem}" if folder else stem), ext.lower()


# --------------------------------------------------------------------------- scanning

def _scan_shard(shard: int, path: str, need_image: bool, need_text: bool
                ) -> tuple[np.ndarray, dict[str, int], str | None, str]:
    """Index one shard from its tar headers: ``(rows, samples skipped per reason, shard
    problem ("missing_shard", "unreadable_shard", "truncated_shard" or None), what went wrong)``.
    Never raises."""
    rows: list[tuple[int, int, int, int, int, int]] = []
    skipped: Counter[str] = Counter()
    try:
        problem, detail = _scan_members(shard, path, need_image, need_text, rows, skipped)
    except Exception as error:  # noqa: BLE001 - one bad shard must not stop indexing of the others
        rows, skipped, problem, detail = [], Counter(), "unreadable_shard", f"{type(error).__name__}: {error}"
    return np.array(rows, dtype=INDEX_DTYPE), dict(skipped), problem, detail


def _scan_members(shard: int, path: str, need_image: bool, need_text: bool,
                  rows: list, skipped: Counter[str]) -> tuple[str | None, str]:
    if os.path.exists(path) and not os.path.isfile(path):  # opening a FIFO would block forever
        return "unreadable_shard", "not a regular file"
    try:
        file = open(path, "rb")
    except FileNotFoundError:
        return "missing_shard", ""
    except OSError as error:
        return "unreadable_shard", str(error)
    with file:
        size = os.fstat(file.fileno()).st_size
        try:
            tar = tarfile.open(fileobj=file, mode="r:")  # "r:": uncompressed only (members read in place)
        except (tarfile.TarError, OSError) as error:
            return "unreadable_shard", f"not a tar file ({error})"
        problem, detail = None, ""
        key: str | None = None
        members: dict[str, tuple[int, int]] = {}  # the current sample's members: ext -> (offset, size)
        while True:
            try:
                info = tar.next()  # reads the header and seeks past the data, without reading it
            except (tarfile.TarError, OSError) as error:
                problem, detail = "truncated_shard", f"{error} after byte {tar.offset}"
                break
            if info is None:
                # A tar ends with a zero block; anything else (nothing, or a damaged header,
                # where tarfile just stops) means the shard is cut short or damaged there.
                end = os.pread(file.fileno(), tarfile.BLOCKSIZE, tar.offset)
                if end != bytes(tarfile.BLOCKSIZE):
                    problem, detail = "truncated_shard", f"no end-of-archive block at byte {tar.offset}"
                break
            tar.members.clear()  # tarfile keeps every header; this scan needs none of them
            if info.offset_data + info.size > size:
                problem, detail = "truncated_shard", f"member {info.name} ends past the end of the file"
                break
            if not info.isreg() or info.issparse():
                continue
            split = _split_name(info.name)
            if split is None:
                continue
            if split[0] != key:
                _add_sample(shard, members, need_image, need_text, rows, skipped)
                key, members = split[0], {}
            members.setdefault(split[1], (info.offset_data, info.size))  # a repeated member: the first counts
        _add_sample(shard, members, need_image, need_text, rows, skipped)
        return problem, detail


def _add_sample(shard: int, members: dict[str, tuple[int, int]], need_image: bool, need_text: bool,
                rows: list, skipped: Counter[str]) -> None:
    """Append the index row of one sample (its members by extension), or count why not."""
    if not members:
        return
    image = next((members[ext] for ext in members if ext in _IMAGE_EXTS), None)
    if "txt" in members:
        caption, kind = members["txt"], CAPTION_TXT
    elif "json" in members:
        caption, kind = members["json"], CAPTION_JSON
    else:
        caption, kind = None, CAPTION_NONE
    if image is None and need_image:
        skipped["no_image_member"] += 1
    elif caption is None and need_text:
        skipped["no_caption_member"] += 1
    elif image is not None or caption is not None:
        rows.append((shard, *(image or (-1, 0)), *(caption or (-1, 0)), kind))


def _scan_all(paths: list[str], need_image: bool, need_text: bool, workers: int
              ) -> Iterator[tuple[np.ndarray, dict[str, int], str | None, str]]:
    """`_scan_shard` of every shard, in order; several shards at once in a process pool."""
    if workers <= 1 or len(paths) <= 1:
        for shard, path in enumerate(paths):
            yield _scan_shard(shard, path, need_image, need_text)
        return
    # fork: workers start at once without re-importing the package; they only read files.
    context = multiprocessing.get_context("fork") if "fork" in multiprocessing.get_all_start_methods() else None
    with ProcessPoolExecutor(workers, mp_context=context) as pool:
        yield from pool.map(_scan_shard, range(len(paths)), paths, repeat(need_image), repeat(need_text),
                            chunksize=max(1, len(paths) // (workers * 8)))


# --------------------------------------------------------------------------- the part

class ShardSet:
    """One shard spec's samples, at random (a `mixture.Part`).

    ``need``: which members a sample must have ("image" for stage 1 image, "text" for stage 1
    text, both for stage 2). ``max_caption_chars``: longer captions are ``long_caption``.
    ``cache_dir``: where the index goes (default: beside the shards, else the user cache).
    ``progress``: a progress bar while indexing (only on a terminal, only where env RANK is 0).
    ``index_workers``: processes scanning shards (default: one per CPU, at most 32).
    """

    spec: str
    skipped: Counter[str]

    def __init__(self, spec: str, key: str = "data.pairs", need: Sequence[str] = NEEDS,
                 max_caption_chars: int = 2000, cache_dir: str | Path | None = None,
                 progress: bool = True, index_workers: int | None = None) -> None:
        need = tuple(need)
        if not need or any(item not in NEEDS for item in need):
            raise ValueError(f"need must be a non-empty subset of {NEEDS}, not {need!r}")
        self._setup(spec, key, need, max_caption_chars)
        paths = shard_paths(spec, key)
        self.shards = [str(path) for path in paths]
        fingerprint = [_fingerprint(path) for path in paths]
        identity = {"version": INDEX_VERSION, "need": sorted(need), "fingerprint": fingerprint}
        name = hashlib.sha256(json.dumps(identity).encode()).hexdigest()[:20]
        folders = [Path(cache_dir).expanduser()] if cache_dir is not None else [
            _first_existing(paths).parent / ".tinyclip_index"]
        folders.append(Path(os.environ.get("XDG_CACHE_HOME") or "~/.cache").expanduser()
                       / "tinyclip_ds" / "shard_index")
        workers = index_workers or min(32, os.cpu_count() or 1)
        meta = self._find_or_build(folders, name, identity, workers, progress)
        self._attach(meta)

    @classmethod
    def from_index(cls, index_path: str | Path, spec: str | None = None, key: str = "data.pairs",
                   max_caption_chars: int = 2000) -> ShardSet:
        """Open an index file and its sidecar as they are, without checking the shards (for
        benches: see `fake_index`)."""
        index_path = Path(index_path)
        meta = _read_sidecar(index_path.with_suffix(".json"), None)
        if meta is None:
            raise RecipeError(f"'{key}': {index_path.with_suffix('.json')} is missing or not a shard index "
                              f"sidecar of version {INDEX_VERSION}")
        part = cls.__new__(cls)
        part._setup(spec or str(index_path), key, tuple(meta["need"]), max_caption_chars)
        part.shards = list(meta["shards"])
        part.index_path = index_path
        part._attach(meta)
        return part

    def _setup(self, spec: str, key: str, need: tuple[str, ...], max_caption_chars: int) -> None:
        if max_caption_chars < 1:
            raise ValueError(f"max_caption_chars must be at least 1, not {max_caption_chars}")
        self.spec, self.key, self.need, self.max_caption_chars = spec, key, need, max_caption_chars
        self._index: np.ndarray | None = None
        self._fds: OrderedDict[int, int] = OrderedDict()
        self._pid = os.getpid()

    # ----------------------------------------------------------------------- index files

    def _find_or_build(self, folders: list[Path], name: str, identity: dict, workers: int,
                       show_progress: bool) -> dict:
        """The sidecar of this shard set's index in the first of ``folders`` that has it (writable
        or not) or can be written (then built there); ``self.index_path`` set to its ``.npy``."""
        errors = []
        for folder in folders:
            meta = _read_sidecar(folder / f"{name}.json", identity)  # fast path: no lock needed
            if meta is not None:
                self.index_path = folder / f"{name}.npy"
                return meta
            try:
                folder.mkdir(parents=True, exist_ok=True)
                with tempfile.TemporaryFile(dir=folder):  # writable? (a lock file alone may exist read-only)
                    pass
                lock = FileLock(str(folder / f"{name}.lock"))
                try:
                    lock.acquire(timeout=0)
                except Timeout:
                    log.info("waiting for another process to index %s (lock %s)", self.spec, lock.lock_file)
                    lock.acquire()
            except OSError as error:
                errors.append(f"{folder} ({error.strerror or error})")
                log.info("cannot write a shard index in %s (%s); trying the next place", folder, error)
                continue
            try:
                self.index_path = folder / f"{name}.npy"
                meta = _read_sidecar(folder / f"{name}.json", identity)  # built while we waited?
                if meta is None:
                    meta = self._build(folder, name, identity, workers, show_progress)
                return meta
            finally:
                lock.release()
        raise RecipeError(f"'{self.key}': cannot write the index of {self.spec} in {' or '.join(errors)}; "
                          f"give a writable cache_dir")

    def _build(self, folder: Path, name: str, identity: dict, workers: int, show_progress: bool) -> dict:
        """Scan every shard and write ``<name>.npy`` and then (the commit) ``<name>.json``."""
        started = time.monotonic()
        paths = [entry[0] for entry in identity["fingerprint"]]
        need_image, need_text = "image" in self.need, "text" in self.need
        counts: list[int] = []
        skipped: Counter[str] = Counter()
        skipped_shards: dict[str, list[int]] = {}
        rows_file = folder / f".{name}.{os.getpid()}.rows"
        npy_file = folder / f".{name}.{os.getpid()}.npy"
        json_file = folder / f".{name}.{os.getpid()}.json"
        show = show_progress and sys.stderr.isatty() and os.environ.get("RANK", "0") == "0"
        log.info("indexing %d shards of %s (once; cached in %s)", len(paths), self.spec, folder)
        try:
            # Rows go to a raw file shard by shard, so building holds one shard's rows in memory.
            with open(rows_file, "wb") as out, tqdm(total=len(paths), desc="indexing shards", unit="shard",
                                                   disable=not show, leave=False, dynamic_ncols=True) as bar:
                for shard, (rows, sample_skips, problem, detail) in enumerate(
                        _scan_all(paths, need_image, need_text, min(workers, len(paths)))):
                    rows.tofile(out)
                    counts.append(len(rows))
                    skipped.update(sample_skips)
                    if problem is not None:
                        skipped[problem] += 1
                        skipped_shards.setdefault(problem, []).append(shard)
                        if problem != "missing_shard":  # missing ones: one line below, not one per gap
                            log.warning("shard %s: %s (%s)", self.shards[shard], problem, detail)
                    bar.update()
            if "missing_shard" in skipped_shards:
                missing = [self.shards[shard] for shard in skipped_shards["missing_shard"]]
                log.warning("%d shards of %s do not exist (skipped): %s%s", len(missing), self.spec,
                            ", ".join(missing[:5]), ", ..." if len(missing) > 5 else "")
            with open(npy_file, "wb") as out, open(rows_file, "rb") as rows_in:
                header = {"descr": np.lib.format.dtype_to_descr(INDEX_DTYPE), "fortran_order": False,
                          "shape": (sum(counts),)}
                np.lib.format.write_array_header_1_0(out, header)
                shutil.copyfileobj(rows_in, out, 1 << 24)
            meta = {**identity, "shards": paths, "counts": counts, "skipped": dict(skipped),
                    "skipped_shards": skipped_shards}
            json_file.write_text(json.dumps(meta))
            os.replace(npy_file, folder / f"{name}.npy")
            os.replace(json_file, folder / f"{name}.json")  # last: a sidecar means a complete index
        finally:
            for leftover in (rows_file, npy_file, json_file):
                leftover.unlink(missing_ok=True)
        log.info("indexed %d shards of %s: %d samples in %.1f s", len(paths), self.spec, sum(counts),
                 time.monotonic() - started)
        return meta

    def _attach(self, meta: dict) -> None:
        """Take the per-shard facts from the sidecar and open the rows (memory-mapped)."""
        self.counts = np.asarray(meta["counts"], dtype=np.int64)
        self.starts = np.concatenate([[0], np.cumsum(self.counts)])  # the first row of each shard
        self.skipped = Counter(meta["skipped"])
        self.skipped_shards = {reason: list(shards) for reason, shards in meta["skipped_shards"].items()}
        if len(self.counts) != len(self.shards):
            raise RecipeError(f"'{self.key}': {self.index_path} lists {len(self.counts)} shards, not "
                              f"{len(self.shards)}; delete it to rebuild")
        if self.starts[-1] == 0:
            raise RecipeError(f"'{self.key}': {self.spec}: no usable samples in {len(self.shards)} shards "
                              f"({self._skip_text() or 'the shards hold no members'}); each sample needs "
                              f"{' and '.join(_MEMBER_WORDS[item] for item in self.need)} member "
                              f"(img2dataset layout: <key>.jpg, <key>.txt, <key>.json)")
        rows = self._rows()
        if rows.dtype != INDEX_DTYPE or rows.shape != (self.starts[-1],):
            raise RecipeError(f"'{self.key}': {self.index_path} does not match its sidecar; delete both to "
                              f"rebuild the index")

    def _rows(self) -> np.ndarray:
        """The index rows, memory-mapped (opened again after unpickling). Training reads them in
        a random order, so the map is advised as random: the kernel's read-ahead would otherwise
        page in ~60 KB around every 37-byte row (measured: 576 MB of page cache and 0.6 ms per
        look-up over 10^4 look-ups in a 10^8-row index; 40 MB and 6 us with the advice)."""
        if self._index is None:
            try:
                rows = np.load(self.index_path, mmap_mode="r", allow_pickle=False)
            except (OSError, ValueError) as error:  # e.g. a copy of the index cut short
                raise RecipeError(f"'{self.key}': {self.index_path} cannot be read ({error}); delete it and its "
                                  f"sidecar to rebuild the index") from None
            mapped = getattr(rows, "_mmap", None)  # numpy keeps the mmap object under this name
            if mapped is not None and hasattr(mmap, "MADV_RANDOM"):
                mapped.madvise(mmap.MADV_RANDOM)
            self._index = rows
        return self._index

    # ----------------------------------------------------------------------- the Part interface

    def __len__(self) -> int:
        return int(self.starts[-1])

    def load(self, i: int) -> Image.Image | str:
        """Sample ``i``'s image, decoded, or the reason it cannot be used (a key of
        `decode.SKIP_REASONS`, warned about once per shard and reason). Never raises for bad data."""
        row = self._row(i)
        shard = int(row["shard"])
        if row["image_offset"] < 0:
            return "no_image_member"  # a text-only part's sample
        data = self._read(shard, int(row["image_offset"]), int(row["image_size"]))
        if isinstance(data, str):
            self._warn(shard, data, "")
            return data
        decoded = decode_image_bytes(data)
        if isinstance(decoded, Image.Image):
            return decoded
        self._warn(shard, *decoded)
        return decoded[0]

    def captions_of(self, i: int) -> list[str] | str:
        """Sample ``i``'s caption as a one-item list, or the reason it cannot be used (a key of
        `decode.CAPTION_SKIP_REASONS`). Never raises for bad data."""
        row = self._row(i)
        kind = int(row["caption_kind"])
        if kind == CAPTION_NONE:
            return "missing_caption"
        data = self._read(int(row["shard"]), int(row["caption_offset"]), int(row["caption_size"]))
        if isinstance(data, str):
            return "unreadable" if data == "truncated" else data  # a shard that shrank after indexing
        try:
            text = data.decode("utf-8-sig")
        except UnicodeDecodeError:
            return "not_utf8"
        if kind == CAPTION_JSON:
            try:
                record = json.loads(text)
            except ValueError:
                return "bad_json"
            if not isinstance(record, dict) or "caption" not in record:
                return "bad_json"
            text = record["caption"]  # img2dataset writes null for a row without a caption
            if text is not None and not isinstance(text, str):
                return "bad_json"
        return usable_captions([text], self.max_caption_chars)

    def sample_id(self, i: int) -> str:
        """``"<shard file name>/<sample key>"`` (for logs and tests)."""
        row = self._row(i)
        shard = int(row["shard"])
        offset = int(row["image_offset"]) if row["image_offset"] >= 0 else int(row["caption_offset"])
        name = _member_name(self.shards[shard], offset)
        split = _split_name(name) if name is not None else None
        key = split[0] if split else f"#{i - int(self.starts[shard])}"  # the shard is gone: its position
        return f"{Path(self.shards[shard]).name}/{key}"

    def describe(self, i: int) -> str:
        """Sample ``i`` for a message: ``"<sample_id> of <spec>"``."""
        return f"{self.sample_id(i)} of {self.spec}"

    def summary(self) -> str:
        """One line for the run's log, e.g. ``4 shards, 3,998 samples; skipped while indexing:
        no_caption_member 2, unreadable_shard 1 (shards/00003.tar)``."""
        line = f"{len(self.shards):,} shards, {len(self):,} samples"
        skips = self._skip_text()
        return f"{line}; skipped while indexing: {skips}" if skips else line

    def index_nbytes_in_ram(self) -> int:
        """Approximate bytes this part holds in Python memory: the per-shard arrays and paths
        (the per-sample rows are memory-mapped, paged in by the OS as they are read)."""
        return (self.counts.nbytes + self.starts.nbytes + sys.getsizeof(self.shards)
                + sum(sys.getsizeof(path) for path in self.shards))

    # ----------------------------------------------------------------------- reading

    def _row(self, i: int) -> np.void:
        if not 0 <= i < len(self):
            raise IndexError(f"sample {i} of a part of {len(self)}")
        return self._rows()[i]

    def _read(self, shard: int, offset: int, size: int) -> bytes | str:
        """``size`` bytes of a shard at ``offset``, or a reason: ``missing_shard`` (deleted
        after indexing), ``unreadable`` (an I/O error), ``truncated`` (the shard shrank)."""
        try:
            fd = self._fd(shard)
        except FileNotFoundError:
            return "missing_shard"
        except OSError:
            return "unreadable"
        chunks = []
        try:
            while size > 0:  # pread may return less than asked (at most ~2 GiB per call on Linux)
                chunk = os.pread(fd, size, offset)
                if not chunk:
                    return "truncated"
                chunks.append(chunk)
                size -= len(chunk)
                offset += len(chunk)
        except OSError:
            return "unreadable"
        return b"".join(chunks)

    def _fd(self, shard: int) -> int:
        """A read-only descriptor of a shard, opened lazily and kept (per process: descriptors
        inherited through a fork are closed and reopened, so processes share no file state)."""
        if self._pid != os.getpid():
            self.close()
            self._pid = os.getpid()
        fd = self._fds.get(shard)
        if fd is None:
            fd = os.open(self.shards[shard], os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
            self._fds[shard] = fd
            if len(self._fds) > MAX_OPEN_SHARDS:
                os.close(self._fds.popitem(last=False)[1])
        else:
            self._fds.move_to_end(shard)
        return fd

    def close(self) -> None:
        """Close the shard files this process opened (they reopen on the next load)."""
        while self._fds:
            try:
                os.close(self._fds.popitem()[1])
            except OSError:
                pass

    def __del__(self) -> None:
        try:  # only descriptors this process opened; nothing at all during interpreter shutdown
            if self._fds and self._pid == os.getpid():
                self.close()
        except Exception:  # noqa: BLE001 - a finaliser must not raise
            pass

    def __getstate__(self) -> dict:
        """Pickled without descriptors and without the memory map (both reopen lazily)."""
        state = self.__dict__.copy()
        state.update(_index=None, _fds=OrderedDict(), _pid=None)
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._pid = os.getpid()

    def _warn(self, shard: int, reason: str, detail: str) -> None:
        if (self.shards[shard], reason) not in _reported:  # once per shard and reason: no log floods
            _reported.add((self.shards[shard], reason))
            log.warning("skipping samples of shard %s (%s%s); further ones of this shard are not logged",
                        self.shards[shard], reason, f": {detail}" if detail else "")

    def _skip_text(self) -> str:
        """``no_caption_member 2, unreadable_shard 1 (shards/00003.tar)``, most frequent first."""
        parts = []
        for reason, n in sorted(self.skipped.items(), key=lambda item: (-item[1], item[0])):
            text = f"{reason} {n:,}"
            if reason in self.skipped_shards:
                names = [self.shards[shard] for shard in self.skipped_shards[reason]]
                text += f" ({', '.join(names[:3])}{f', ... ({len(names)} in all)' if len(names) > 3 else ''})"
            parts.append(text)
        return ", ".join(parts)


_MEMBER_WORDS = {"image": "an image (.jpg/.png/.webp/...)", "text": "a caption (.txt or .json)"}


def _fingerprint(path: Path) -> list:
    """``[absolute path, size, mtime_ns]`` (size and mtime None for a shard that is absent)."""
    try:
        info = path.stat()
        return [os.path.abspath(path), info.st_size, info.st_mtime_ns]
    except OSError:
        return [os.path.abspath(path), None, None]


def _first_existing(paths: list[Path]) -> Path:
    return next((path for path in paths if path.exists()), paths[0])


def _read_sidecar(path: Path, identity: dict | None) -> dict | None:
    """The sidecar at ``path`` if it is one of this version (and, given ``identity``, of exactly
    this shard set); None where it is absent or stale (the index is then rebuilt)."""
    try:
        meta = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(meta, dict) or meta.get("version") != INDEX_VERSION or not path.with_suffix(".npy").is_file():
        return None
    if identity is not None and any(meta.get(field) != value for field, value in identity.items()):
        return None
    return meta


def _member_name(shard: str, offset_data: int) -> str | None:
    """The name of the member whose data starts at ``offset_data``: read from its own 512-byte
    header; where that may not hold the whole name (100 bytes used: a long name kept in a pax or
    GNU extension header, or a '?' for non-ASCII), by scanning the shard's headers. None if the
    shard cannot be read."""
    try:
        with open(shard, "rb") as file:
            header = os.pread(file.fileno(), tarfile.BLOCKSIZE, offset_data - tarfile.BLOCKSIZE)
            try:
                info = tarfile.TarInfo.frombuf(header, "utf-8", "surrogateescape")
                if b"\0" in header[:100] and "?" not in info.name and info.isreg():
                    return info.name
            except tarfile.HeaderError:
                pass
            file.seek(0)
            with tarfile.open(fileobj=file, mode="r:") as tar:
                for info in iter(tar.next, None):
                    tar.members.clear()
                    if info.offset_data == offset_data:
                        return info.name
    except (OSError, tarfile.TarError):
        return None
    return None


def fake_index(path: str | Path, num_samples: int, num_shards: int) -> Path:
    """Write a synthetic index of ``num_samples`` rows over ``num_shards`` (absent) shards, in the
    real format, without writing the rows: the ``.npy`` is a sparse file of zeros (every row
    points into the first shard, which does not exist, so `ShardSet.load` returns
    ``missing_shard``). For benches of opening and indexing huge sets: open it with
    `ShardSet.from_index`. Returns the ``.npy`` path (the sidecar is beside it, ``.json``)."""
    path = Path(path).with_suffix(".npy")
    if num_shards < 1 or num_samples < num_shards:
        raise ValueError("fake_index needs num_shards >= 1 and num_samples >= num_shards")
    rows = np.lib.format.open_memmap(path, mode="w+", dtype=INDEX_DTYPE, shape=(num_samples,))
    rows.flush()
    del rows
    per_shard, extra = divmod(num_samples, num_shards)
    counts = [per_shard + (1 if shard < extra else 0) for shard in range(num_shards)]
    shards = [str(path.parent / "fake_shards" / f"{shard:05d}.tar") for shard in range(num_shards)]
    meta = {"version": INDEX_VERSION, "need": list(NEEDS), "fingerprint": [[s, None, None] for s in shards],
            "shards": shards, "counts": counts, "skipped": {}, "skipped_shards": {}}
    path.with_suffix(".json").write_text(json.dumps(meta))
    return path


__all__ = ["INDEX_DTYPE", "INDEX_SKIP_REASONS", "INDEX_VERSION", "ShardSet", "expand_braces", "fake_index",
           "is_shard_spec", "shard_paths"]
