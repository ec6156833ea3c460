"""``tinyclip-ds prepare``: a source turned into webdataset shards, pre-resized to the training size.

Training decodes every image of every epoch; a 224 px JPEG decodes many times faster than a
multi-megapixel original, so resizing once ahead of training makes the epochs faster. The
source is any spec `tinyclip_ds.data.sources` reads (an image folder, a .csv/.tsv with an
image-path and a caption column, a COCO captions .json, a caption .txt), read by its readers.

Output layout (img2dataset's): ``OUT/00000.tar, OUT/00001.tar, ...`` and ``OUT/stats.json``.
Shard ``k`` holds the source's samples ``k * shard_size`` to ``(k + 1) * shard_size - 1``;
each sample's key is its number in the source (``%09d``), so a skipped sample leaves a gap in
the keys (as in img2dataset) and the shards do not depend on how many workers wrote them.
A sample's tar members, in this order:

- ``<key>.jpg``: the image as RGB (`transforms.to_rgb`: transparency on white, 16-bit grey
  scaled), its short side resized to ``size`` (bicubic) and centre-cropped to size x size,
  as the training transform does; JPEG at ``quality``. (Not in ``--kind captions``.)
- ``<key>.json``: ``{"key", "source": the original image path, "original_width",
  "original_height"}`` and for pairs ``"caption"`` (the first caption, img2dataset's field)
  and ``"captions"`` (every usable caption: COCO has 5 per image). (Not in ``--kind captions``.)
- ``<key>.txt``: the first caption, UTF-8. (Not in ``--kind images``.)

Members have a fixed mtime (0), owner and mode, and shards are written whole by one worker and
renamed into place, so the same source gives byte-identical shards for any number of workers.
A sample that cannot be used (an image `decode.load_image` refuses, or no non-empty caption)
is skipped and counted per reason (keys of `decode.SKIP_REASONS` /
`decode.CAPTION_SKIP_REASONS`); ``stats.json`` records the counts. Caption length is not
limited here: the recipe's ``data.max_caption_chars`` applies when training reads the shards.
"""

from __future__ import annotations

import io
import itertools
import json
import multiprocessing
import os
import re
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image, ImageOps

from tinyclip_ds.config import RecipeError
from tinyclip_ds.data import decode, sources

KINDS = ("pairs", "images", "captions")
"""What a prepared sample holds: image + captions, image only, caption only."""

SHARD_NAME = re.compile(r"^\d{5}\.tar(\.part)?$")
"""Files this command writes in its output folder (a ``.part`` is a shard being written)."""

MAX_SHARDS = 100_000  # shard names have 5 digits
SOURCE_KEY = "SOURCE"  # what the readers' errors call the source


@dataclass(frozen=True)
class Settings:
    """How samples are written (the same for every shard)."""

    kind: str
    size: int
    quality: int


@dataclass
class ShardTask:
    """One shard to write: its number, the source number of its first sample, and its samples'
    image entries (or None: captions only), captions (or None: images only) and sources."""

    index: int
    first: int
    path: str
    settings: Settings
    entries: list[decode.ImageEntry | None]
    captions: list[list[str]] | None
    origins: list[str]


@dataclass
class Report:
    """What `prepare` wrote: the numbers of ``stats.json`` and the recipe line to use."""

    out: Path
    kind: str
    source_spec: str
    source_samples: int
    written: int = 0
    shards: int = 0
    skipped: Counter[str] = field(default_factory=Counter)
    indexing: str = ""  # the reader's one-line summary (files ignored, malformed rows)

    @property
    def pattern(self) -> str:
        """The brace pattern naming every shard, for a recipe's data list."""
        return str(self.out / f"{{00000..{self.shards - 1:05d}}}.tar")

    @property
    def recipe_line(self) -> str:
        """``data.<kind>: <pattern>``: the recipe entry that trains on these shards."""
        return f"data.{self.kind}: {self.pattern}"

    def skipped_text(self) -> str:
        """``3 (missing_file: 1, truncated: 2)``, most frequent first, or ``none``."""
        if not self.skipped:
            return "none"
        counts = sorted(self.skipped.items(), key=lambda item: (-item[1], item[0]))
        return f"{sum(self.skipped.values())} ({', '.join(f'{r}: {n}' for r, n in counts)})"

    def stats(self, settings: Settings, shard_size: int) -> dict:
        """The content of ``stats.json``."""
        return {"source": self.source_spec, "kind": self.kind, "size": settings.size,
                "quality": settings.quality, "shard_size": shard_size, "shards": self.shards,
                "pattern": self.pattern, "source_samples": self.source_samples, "samples": self.written,
                "skipped": dict(sorted(self.skipped.items())), "indexing": self.indexing}


# --------------------------------------------------------------------------- reading the source

def default_kind(spec: str) -> str:
    """pairs for a .csv/.tsv/.json, captions for a .txt, images for anything else (a folder)."""
    suffix = Path(spec).suffix.lower()
    if suffix in (".csv", ".tsv", ".json"):
        return "pairs"
    return "captions" if suffix == ".txt" else "images"


def read_source(spec: str, kind: str, image_root: str = "", csv_image_key: str = "filepath",
                csv_caption_key: str = "title"
                ) -> tuple[list[decode.ImageEntry | None], list[list[str]] | None, list[str], str]:
    """The samples of ``spec`` for ``kind``, from the readers of `tinyclip_ds.data.sources`:
    ``(image entries, captions per sample, where each sample came from, reader summary)``.
    Entries are None for captions; captions are None for images. Errors are `RecipeError`."""
    from tinyclip_ds.data.hf_layout import is_hf_spec
    from tinyclip_ds.data.shards import is_shard_spec

    if is_shard_spec(spec) or is_hf_spec(Path(spec).expanduser()):
        what = "webdataset shards" if is_shard_spec(spec) else "a Hugging Face dataset"
        raise RecipeError(f"{SOURCE_KEY} {spec} is {what}, which training reads as it is; prepare takes an "
                          f"image folder, a .csv/.tsv, a COCO captions .json or a caption .txt")
    if kind == "captions":
        captions = sources.caption_source(spec, key=SOURCE_KEY)
        return [None] * len(captions), [[c] for c in captions], [f"{spec}#{i}" for i in range(len(captions))], \
            f"{len(captions)} captions"
    if kind == "images" and Path(spec).suffix.lower() not in (".csv", ".tsv", ".json"):
        images = sources.image_source(spec, key=SOURCE_KEY)
        return list(images.entries), None, [_origin(e, spec, i) for i, e in enumerate(images.entries)], \
            images.summary()
    pairs = sources.pair_source(spec, image_root, csv_image_key, csv_caption_key, key=SOURCE_KEY)
    entries: list[decode.ImageEntry | None] = list(pairs.entries)
    origins = [_origin(e, spec, i) for i, e in enumerate(pairs.entries)]
    return entries, (pairs.captions if kind == "pairs" else None), origins, pairs.summary()


def _origin(entry: decode.ImageEntry, spec: str, index: int) -> str:
    """Where a sample came from: its file, or ``spec#index`` for an image held in memory (demo)."""
    return str(entry) if isinstance(entry, Path) else f"{spec}#{index}"


# --------------------------------------------------------------------------- writing one shard

def square_rgb(image: Image.Image, size: int) -> Image.Image:
    """``image`` as RGB, its short side resized to ``size`` and centre-cropped to size x size
    (what the training transform's Resize + CenterCrop does). ImageOps.fit resizes only the
    centred crop box, in sub-pixel source coordinates: one resampling, no full-size copy."""
    from tinyclip_ds.data.transforms import to_rgb  # imported here: it loads torch

    return ImageOps.fit(to_rgb(image), (size, size), method=Image.Resampling.BICUBIC)


def encode_sample(task: ShardTask, i: int) -> dict[str, bytes | str] | str:
    """Sample ``i`` of ``task`` as webdataset members, or the reason it is skipped."""
    settings = task.settings
    key = f"{task.first + i:09d}"
    sample: dict[str, bytes | str] = {"__key__": key}
    captions: list[str] = []
    if task.captions is not None:
        # Caption length is left to the recipe (data.max_caption_chars) when training reads them.
        captions = decode.usable_captions(task.captions[i], sys.maxsize)
        if isinstance(captions, str):
            return captions  # why none is usable
        sample["txt"] = captions[0]
    entry = task.entries[i]
    if entry is not None:
        image = decode.load_image(entry)
        if isinstance(image, str):
            return image
        meta: dict[str, object] = {"key": key, "source": task.origins[i], "original_width": image.width,
                                   "original_height": image.height}
        if settings.kind == "pairs":
            meta |= {"caption": captions[0], "captions": captions}
        buffer = io.BytesIO()
        square_rgb(image, settings.size).save(buffer, format="JPEG", quality=settings.quality)
        sample["jpg"] = buffer.getvalue()
        sample["json"] = json.dumps(meta, ensure_ascii=False, sort_keys=True)
    return sample


def write_shard(task: ShardTask, tick: Callable[[int], None] = lambda n: None) -> tuple[int, int, Counter[str]]:
    """Write ``task``'s shard (to ``.part``, renamed when complete, so a crash never leaves a
    shard that looks whole); ``tick(n)`` after every n samples. Returns ``(shard index,
    samples written, skipped per reason)``."""
    from webdataset import TarWriter  # imported here: it loads torch

    written, skipped = 0, Counter()
    partial = task.path + ".part"
    # mtime fixed, owner and mode are TarWriter's constants: the bytes depend on the samples only.
    with TarWriter(partial, encoder=False, mtime=0.0) as tar:
        for i in range(len(task.origins)):
            sample = encode_sample(task, i)
            if isinstance(sample, str):
                skipped[sample] += 1
            else:
                tar.write({k: v.encode("utf-8") if isinstance(v, str) and k != "__key__" else v
                           for k, v in sample.items()})
                written += 1
            tick(1)
    os.replace(partial, task.path)
    return task.index, written, skipped


_done_counter = None  # a worker's shared count of samples done (set by `_init_worker`)


def _init_worker(counter) -> None:
    global _done_counter
    _done_counter = counter


def _tick_shared(n: int) -> None:
    with _done_counter.get_lock():
        _done_counter.value += n


def _write_shard_in_worker(task: ShardTask) -> tuple[int, int, Counter[str]]:
    return write_shard(task, _tick_shared)


# --------------------------------------------------------------------------- the command

def check_out_dir(out: Path, overwrite: bool) -> None:
    """Refuse an existing non-empty output folder unless ``overwrite``; with it, delete the
    shards and stats.json a previous prepare wrote there (nothing else)."""
    if out.exists() and not out.is_dir():
        raise RecipeError(f"--out {out} is a file; give a folder for the shards")
    if not out.is_dir() or not any(out.iterdir()):
        return
    if not overwrite:
        raise RecipeError(f"--out {out} exists and is not empty; give a new folder, or --overwrite to "
                          f"replace the shards and stats.json written there before")
    for path in out.iterdir():
        if SHARD_NAME.match(path.name) or path.name == "stats.json":
            path.unlink()


def shard_tasks(out: Path, settings: Settings, shard_size: int, entries: list, captions: list | None,
                origins: list[str]) -> Iterator[ShardTask]:
    """The shards to write: shard k takes samples k * shard_size ... (k + 1) * shard_size - 1."""
    for index, first in enumerate(range(0, len(origins), shard_size)):
        stop = first + shard_size
        yield ShardTask(index, first, str(out / f"{index:05d}.tar"), settings, entries[first:stop],
                        None if captions is None else captions[first:stop], origins[first:stop])


def prepare(spec: str, out: str | Path, size: int = 224, kind: str | None = None, shard_size: int = 10_000,
            workers: int = 1, quality: int = 95, image_root: str = "", csv_image_key: str = "filepath",
            csv_caption_key: str = "title", overwrite: bool = False, start_method: str | None = None,
            log: Callable[[str], None] = print) -> Report:
    """Write ``spec``'s samples as shards in ``out`` (see the module docstring) with ``workers``
    processes (``start_method``: multiprocessing's, None = the platform's default), and
    ``stats.json``. Problems with the arguments or the source are `RecipeError`."""
    # Loaded before the clock starts and before workers fork (they inherit it): webdataset and
    # transforms load torch, seconds per process.
    import webdataset  # noqa: F401

    import tinyclip_ds.data.transforms  # noqa: F401
    from tinyclip_ds.progress import progress

    kind = kind or default_kind(spec)
    if kind not in KINDS:
        raise RecipeError(f"--kind {kind!r} is unknown; give one of {', '.join(KINDS)}")
    if not 1 <= quality <= 100:
        raise RecipeError(f"--quality {quality} is out of range; give a JPEG quality from 1 to 100 (95 is good)")
    for name, value in (("--size", size), ("--shard-size", shard_size), ("--workers", workers)):
        if value < 1:
            raise RecipeError(f"{name} must be a positive integer, got {value}")
    out = Path(out).expanduser()
    entries, captions, origins, indexing = read_source(spec, kind, image_root, csv_image_key, csv_caption_key)
    shard_count = -(-len(origins) // shard_size)
    if shard_count > MAX_SHARDS:
        raise RecipeError(f"--shard-size {shard_size} makes {shard_count} shards of {len(origins)} samples; "
                          f"shard names allow {MAX_SHARDS}: give a larger --shard-size")
    check_out_dir(out, overwrite)
    out.mkdir(parents=True, exist_ok=True)
    settings = Settings(kind, size, quality)
    report = Report(out=out, kind=kind, source_spec=spec, source_samples=len(origins), indexing=indexing)
    log(f"source: {spec}: {indexing}")
    tasks = shard_tasks(out, settings, shard_size, entries, captions, origins)
    workers = min(workers, shard_count)
    started = time.perf_counter()
    try:
        with progress(total=len(origins), desc="prepare", unit="sample") as bar:
            if workers == 1:  # in this process: no worker start-up, same bytes
                results = (write_shard(task, bar.update) for task in tasks)
                for _, written, skipped in results:
                    report.written += written
                    report.skipped += skipped
            else:
                _run_pool(tasks, workers, start_method, bar, report)
    finally:
        for path in out.glob("*.tar.part"):  # a shard left unfinished by an error or Ctrl-C
            path.unlink()
    report.shards = shard_count
    if report.written == 0:
        for path in out.iterdir():
            if SHARD_NAME.match(path.name):
                path.unlink()
        raise RecipeError(f"{SOURCE_KEY} {spec}: none of its {len(origins)} samples could be used "
                          f"(skipped: {report.skipped_text()}); nothing written to {out}")
    (out / "stats.json").write_text(json.dumps(report.stats(settings, shard_size), indent=2) + "\n")
    seconds = time.perf_counter() - started
    log(f"prepared {report.written} of {len(origins)} samples in {shard_count} shard(s) of {size}x{size} "
        f"in {seconds:.1f} s ({len(origins) / max(seconds, 1e-9):.0f} samples/s, {workers} worker(s)); "
        f"skipped: {report.skipped_text()}; stats: {out / 'stats.json'}")
    return report


def _run_pool(tasks: Iterator[ShardTask], workers: int, start_method: str | None, bar, report: Report) -> None:
    """Write the shards with a pool of ``workers`` processes, updating ``bar`` from a shared
    count of samples done (a shard holds thousands of samples: per-shard steps would be coarse).

    A `ProcessPoolExecutor`, not a `multiprocessing.Pool`: a worker that dies (killed for memory
    on a huge image, a crashing decoder) breaks the executor, where a Pool waits for its result
    forever. At most two shards per worker are in flight, so tasks are drawn as workers free up."""
    context = multiprocessing.get_context(start_method)
    done = context.Value("q", 0)
    with ProcessPoolExecutor(workers, mp_context=context, initializer=_init_worker, initargs=(done,)) as pool:
        pending: set = set()
        tasks = iter(tasks)
        while True:
            for task in itertools.islice(tasks, 2 * workers - len(pending)):
                pending.add(pool.submit(_write_shard_in_worker, task))
            if not pending:
                break
            finished, pending = wait(pending, timeout=0.5, return_when=FIRST_COMPLETED)
            for future in finished:
                try:
                    _, written, skipped = future.result()
                except BrokenProcessPool:
                    raise RecipeError(f"a prepare worker process died (killed for memory?) after {report.written} "
                                      f"samples were written; run again with --overwrite and fewer --workers or a "
                                      f"smaller --shard-size") from None
                report.written += written
                report.skipped += skipped
            bar.update(done.value - bar.n)


def cli_default_workers() -> int:
    """``--workers`` default: min(8, CPUs this process may use)."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, min(8, cpus))
