"""Data-loading throughput per source type, the demo's stage-1 training rate, and the shard
index's memory and open time at 10^8 samples.

1. Loading: the same N images (256 px JPEGs, gradients + noise: photo-like, compressible) as
   an image folder, a CSV of pairs, webdataset shards (raw 256 px, written with
   ``webdataset.TarWriter``, and prepared at the demo's 32 px by ``tinyclip-ds prepare``) and a
   Hugging Face ``save_to_disk`` dataset (an ``Image`` feature holding the JPEG bytes). Each is
   read through exactly what training uses: ``training_mixture`` -> ``ImageDataset`` /
   ``PairDataset`` with the demo's train transform (32 px, RandAugment, the demo teacher's
   mean/std; the demo tokenizer for captions) -> ``GlobalBatchSampler(GlobalOrder)`` at micro
   batch 64 -> ``train_loader(num_workers=W)``. Timed after a warm-up (worker start included
   in the warm-up), one torch thread per loading process. The files are in the page cache
   after they were written: this measures decoding and transforms, not the disk.
2. Training: the demo's stage-1 image run (``launch/stage1_image.sh``, one rank, CPU, loader
   in-process: ``data.num_workers=0``) for S and 2S steps; its own samples/s log lines and
   the wall-time steady rate S*64 / (t(2S) - t(S)).
3. Index: a synthetic shard index (`shards.fake_index`, sparse) of 10^8 samples over 10^4
   shards opened with ``ShardSet.from_index``, in a fresh process: open time, RSS growth,
   look-ups, and `GlobalOrder` computing a global batch of 4096 positions. The fake index is
   sparse, so a look-up's first touch of a page costs a zero-fill, not a disk read.

    python bench/data_throughput.py                       # N = 2048: 3.5 min on 2 busy cores
    python bench/data_throughput.py --quick               # smoke run: N = 256, a 10^6-sample index
    python bench/data_throughput.py --work-dir /tmp/dt    # keep the inputs and run logs

Prints markdown tables and, last, one JSON line with every number.
"""

from __future__ import annotations

import argparse
import csv
import gc
import io
import json
import os
import platform
import re
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import tracemalloc
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
MICRO_BATCH = 64  # the demo's train.micro_batch
IMAGE_PIXELS = 256  # source images: a typical web image's short side after img2dataset's resize
GLOBAL_BATCH_POSITIONS = 4096
LOOKUPS = 10_000
GOAL_RATIO = 1.5  # loader (webdataset, 2 workers) / training samples/s
STEP_LINE = re.compile(r"^step (\d+)/(\d+) loss .* ([0-9.]+) samples/s")


# --------------------------------------------------------------------------- inputs

def synthetic_image(rng: np.random.Generator, size: int = IMAGE_PIXELS) -> Image.Image:
    """A photo-like RGB image: a two-colour diagonal gradient, a soft disc and mild noise
    (random pixels would not compress; flat colour would decode unrealistically fast)."""
    y, x = np.mgrid[0:size, 0:size].astype(np.float32) / size
    start, end = rng.uniform(0, 255, (2, 3)).astype(np.float32)
    angle = rng.uniform(0, np.pi)
    t = (np.cos(angle) * x + np.sin(angle) * y + 1.5) / 3.0
    image = start + (end - start) * t[..., None]
    cx, cy, radius = rng.uniform(0.2, 0.8, 3)
    disc = np.exp(-(((x - cx) ** 2 + (y - cy) ** 2) / (0.05 + 0.1 * radius)) * 8)
    image += disc[..., None] * rng.uniform(-120, 120, 3).astype(np.float32)
    image += rng.normal(0, 6, image.shape).astype(np.float32)
    return Image.fromarray(np.clip(image, 0, 255).astype(np.uint8))


def caption(i: int) -> str:
    """Captions in the demo teacher's vocabulary (so the tokenizer does its normal work)."""
    from tinyclip_ds.data.digits import pair_caption

    return pair_caption(i % 10, (i // 10) % 10)


@dataclass
class Inputs:
    """The same N samples in every source form, and how long each form took to write."""

    folder: Path
    csv: Path
    raw_shards: str
    prepared_shards: str
    hf: Path
    bytes_per_image: float
    write_s: dict[str, float]


def write_inputs(work: Path, n: int, shards: int) -> Inputs:
    """Write the N images and every source form of them under ``work``."""
    import datasets
    from webdataset import TarWriter

    from tinyclip_ds.prepare import prepare

    write_s: dict[str, float] = {}
    started = time.perf_counter()
    folder = work / "images"
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    jpegs: list[bytes] = []
    for i in range(n):
        buffer = io.BytesIO()
        synthetic_image(rng).save(buffer, format="JPEG", quality=90)
        jpegs.append(buffer.getvalue())
        (folder / f"{i:06d}.jpg").write_bytes(jpegs[-1])
    write_s["image folder"] = time.perf_counter() - started

    table = work / "pairs.csv"  # relative paths: resolved against the CSV's folder
    with table.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["filepath", "title"])
        writer.writerows([f"images/{i:06d}.jpg", caption(i)] for i in range(n))

    started = time.perf_counter()
    raw = work / "shards_raw"
    raw.mkdir(exist_ok=True)
    per_shard = -(-n // shards)
    for shard, first in enumerate(range(0, n, per_shard)):
        # img2dataset's layout: <key>.jpg, <key>.txt, <key>.json
        with TarWriter(str(raw / f"{shard:05d}.tar"), encoder=False) as tar:
            for i in range(first, min(n, first + per_shard)):
                key = f"{i:09d}"
                tar.write({"__key__": key, "jpg": jpegs[i], "txt": caption(i).encode(),
                           "json": json.dumps({"key": key, "caption": caption(i)}).encode()})
    write_s["webdataset raw"] = time.perf_counter() - started

    started = time.perf_counter()
    prepared = work / "shards_32"
    report = prepare(str(table), prepared, size=32, kind="pairs", shard_size=per_shard,
                     workers=min(2, os.cpu_count() or 1), log=lambda line: None)
    write_s["tinyclip-ds prepare (32 px)"] = time.perf_counter() - started

    started = time.perf_counter()
    hf = work / "hf_saved"
    datasets.disable_progress_bars()  # a bench's output: tables, not bars
    features = datasets.Features({"image": datasets.Image(), "text": datasets.Value("string")})
    dataset = datasets.Dataset.from_dict({"image": [{"bytes": b, "path": None} for b in jpegs],
                                          "text": [caption(i) for i in range(n)]}, features=features)
    dataset.save_to_disk(str(hf))
    write_s["Hugging Face save_to_disk"] = time.perf_counter() - started
    return Inputs(folder, table, str(raw / f"{{00000..{shards - 1:05d}}}.tar"), report.pattern, hf,
                  sum(map(len, jpegs)) / n, write_s)


# --------------------------------------------------------------------------- 1. loading

@dataclass
class LoadRow:
    """One source read for one stage at each worker count."""

    source: str
    kind: str  # "images" (stage 1 image) or "pairs" (stage 2)
    open_s: float  # training_mixture(): the first open (a shard set's index is built here)
    samples_per_s: dict[int, float]
    skipped: int


def measure_loading(name: str, kind: str, spec: str, worker_counts: list[int], warmup: int, timed: int,
                    index_cache: Path) -> LoadRow:
    """Samples/s of ``spec`` read as ``kind`` through the training data path, per worker count."""
    import torch

    from tinyclip_ds.data.config import DataConfig
    from tinyclip_ds.data.datasets import ImageDataset, PairDataset
    from tinyclip_ds.data.mixture import training_mixture
    from tinyclip_ds.data.order import GlobalOrder
    from tinyclip_ds.data.sampler import GlobalBatchSampler, train_loader
    from tinyclip_ds.data.transforms import train_transform
    from tinyclip_ds.data.digits import IMAGE_SIZE
    from tinyclip_ds.demo.teacher import IMAGE_MEAN, IMAGE_STD, demo_tokenizer

    data = DataConfig(**{kind: [spec]}, index_cache=str(index_cache))
    started = time.perf_counter()
    mixture = training_mixture(kind, data)
    open_s = time.perf_counter() - started
    transform = train_transform(IMAGE_SIZE, IMAGE_MEAN, IMAGE_STD, data.randaugment, data.randaugment_ops,
                                data.randaugment_magnitude)
    dataset = (ImageDataset(mixture, transform) if kind == "images"
               else PairDataset(mixture, transform, demo_tokenizer()))
    rates: dict[int, float] = {}
    skipped = 0
    torch.set_num_threads(1)  # as in a loader worker (PyTorch sets 1 there): the 0-worker rows compare
    for workers in worker_counts:
        sampler = GlobalBatchSampler(GlobalOrder(mixture.sizes, seed=0), micro_batch=MICRO_BATCH,
                                     accumulation=1, world_size=1, rank=0)
        batches = train_loader(dataset, sampler, num_workers=workers)
        try:
            # Warm-up: worker start-up and the first prefetched batches stay out of the timing.
            for _ in range(warmup + 2 * workers):
                next(batches)
            started = time.perf_counter()
            samples = 0
            for _ in range(timed):
                batch = next(batches)
                samples += len(batch["index"])
                skipped += batch["skipped"]
            rates[workers] = samples / (time.perf_counter() - started)
        finally:
            batches.close()
        print(f"  {name} ({kind}), {workers} worker(s): {rates[workers]:.0f} samples/s", flush=True)
    return LoadRow(name, kind, open_s, rates, skipped)


# --------------------------------------------------------------------------- 2. training

@dataclass
class TrainRun:
    """One finished demo stage-1 image run."""

    steps: int
    wall_s: float
    step_rates: list[float]  # samples/s of each log line, in order


def run_training(steps: int, log_every: int, run_dir: Path, log: Path) -> TrainRun:
    """``launch/stage1_image.sh`` (its Python half, one rank, as vs_open_clip.py runs stage 2)
    for ``steps`` steps; exits the bench with the output tail if it fails."""
    command = [sys.executable, str(ROOT / "launch" / "stage1_image.sh"), "--set", f"train.steps={steps}",
               "--set", "eval.every=0", "--set", "data.num_workers=0", "--set", f"run_dir={run_dir}",
               "--set", f"train.log_every={log_every}"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "DS_ACCELERATOR": "cpu"}
    started = time.perf_counter()
    result = subprocess.run(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    wall = time.perf_counter() - started
    log.parent.mkdir(parents=True, exist_ok=True)
    log.write_text(result.stdout)
    if result.returncode != 0:
        tail = "\n".join(result.stdout.splitlines()[-30:])
        sys.exit(f"training failed ({result.returncode}): {shlex.join(command)}\n{tail}")
    rates = [float(m.group(3)) for m in map(STEP_LINE.match, result.stdout.splitlines()) if m]
    return TrainRun(steps, wall, rates)


# --------------------------------------------------------------------------- 3. the index at scale

def _status_kib() -> dict[str, int]:
    """VmRSS, RssAnon and RssFile of this process (KiB), from /proc/self/status."""
    values = {}
    with open("/proc/self/status") as f:
        for line in f:
            name, _, rest = line.partition(":")
            if name in ("VmRSS", "RssAnon", "RssFile"):
                values[name] = int(rest.split()[0])
    return values


def _growth_mib(before: dict[str, int], after: dict[str, int]) -> dict[str, float]:
    """Each `_status_kib` field's growth from ``before`` to ``after``, in MiB."""
    return {name: (after[name] - before[name]) / 1024 for name in before}


def measure_index(folder: Path, samples: int, shards: int) -> dict:
    """Run in a fresh process (so that memory freed by earlier work cannot hide growth): write
    a fake index, open it, look samples up, compute a global batch; remove the index files."""
    from tinyclip_ds.data.mixture import Mixture
    from tinyclip_ds.data.order import GlobalOrder
    from tinyclip_ds.data.shards import ShardSet, fake_index

    folder.mkdir(parents=True, exist_ok=True)
    result: dict = {"samples": samples, "shards": shards}
    npy = folder / "fake_index.npy"
    try:
        started = time.perf_counter()
        npy = fake_index(npy, samples, shards)
        result["write_s"] = time.perf_counter() - started
        files = [npy, npy.with_suffix(".json")]
        result["apparent_bytes"] = sum(os.stat(path).st_size for path in files)
        result["disk_bytes"] = sum(os.stat(path).st_blocks * 512 for path in files)
        gc.collect()
        before = _status_kib()

        started = time.perf_counter()
        part = ShardSet.from_index(npy, spec="fake")
        result["open_s"] = time.perf_counter() - started
        result["index_nbytes_in_ram"] = part.index_nbytes_in_ram()
        opened = _status_kib()
        result["rss_growth_open_mib"] = _growth_mib(before, opened)

        # What a load does before it reads a shard: the mixture's locate, then the part's index
        # row (memory-mapped: the OS pages in one 4 KiB page per row read, file-backed).
        mixture = Mixture([part])
        positions = np.random.default_rng(0).integers(0, samples, LOOKUPS)
        started = time.perf_counter()
        found = 0
        for i in positions.tolist():
            assert len(part) == samples
            owner, local = mixture.locate(i)
            found += int(owner._row(local)["shard"]) >= 0
        result["lookup_us"] = (time.perf_counter() - started) / LOOKUPS * 1e6
        assert found == LOOKUPS
        result["rss_growth_lookups_mib"] = _growth_mib(before, _status_kib())

        gc.collect()
        before_order = _status_kib()
        started = time.perf_counter()
        order = GlobalOrder([samples], seed=0)
        result["order_init_ms"] = (time.perf_counter() - started) * 1e3
        order.indices(0, 0, GLOBAL_BATCH_POSITIONS)  # the permutation's round keys are made once
        times = []
        tracemalloc.start()  # numpy reports its buffers to tracemalloc
        for step in np.random.default_rng(1).integers(0, samples // GLOBAL_BATCH_POSITIONS, 20).tolist():
            tracemalloc.reset_peak()
            started = time.perf_counter()
            batch = order.indices(0, step * GLOBAL_BATCH_POSITIONS, (step + 1) * GLOBAL_BATCH_POSITIONS)
            times.append((time.perf_counter() - started) * 1e3)
            assert len(np.unique(batch)) == GLOBAL_BATCH_POSITIONS
        result["order_peak_traced_kib"] = tracemalloc.get_traced_memory()[1] / 1024
        tracemalloc.stop()
        result["order_batch_ms"] = statistics.median(times)
        result["rss_growth_order_mib"] = _growth_mib(before_order, _status_kib())["VmRSS"]
        del part, mixture
    finally:
        for path in (npy, npy.with_suffix(".json")):  # sparse, but GBs of apparent size
            path.unlink(missing_ok=True)
    return result


# --------------------------------------------------------------------------- report

def machine() -> str:
    """One line: CPUs, model, memory, OS, Python, torch."""
    import psutil
    import torch

    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    model = platform.processor() or ""
    try:
        with open("/proc/cpuinfo") as f:
            model = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), model)
    except OSError:
        pass
    return (f"{cpus} CPU(s) ({model}), {psutil.virtual_memory().total / 2 ** 30:.0f} GiB RAM, "
            f"{platform.system()} {platform.release()}, Python {platform.python_version()}, torch {torch.__version__}")


def load_average() -> str:
    """The 1, 5 and 15-minute load averages (other work on a shared machine shows here)."""
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def loading_table(rows: list[LoadRow], worker_counts: list[int]) -> str:
    """The loading rows as a markdown table: samples/s per worker count."""
    head = ("| source | read as | open s | " + " | ".join(f"{w} worker{'s' if w != 1 else ''}"
                                                       for w in worker_counts) + " | skipped |")
    lines = [head, "|" + "---|" * (4 + len(worker_counts))]
    for row in rows:
        rates = " | ".join(f"{row.samples_per_s[w]:,.0f}" for w in worker_counts)
        lines.append(f"| {row.source} | {row.kind} | {row.open_s:.2f} | {rates} | {row.skipped} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Write the inputs, measure loading, training and the index, print the tables."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work-dir", default=None, help="where inputs and logs go (default: a temp dir, removed)")
    parser.add_argument("--samples", type=int, default=None, help="N images (default 2048; --quick 256)")
    parser.add_argument("--quick", action="store_true", help="smoke run: N=256, fewer batches and steps, "
                                                             "a 10^6-sample index")
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2], help="loader worker counts")
    parser.add_argument("--steps", type=int, default=None, help="S: training runs S and 2S steps "
                                                                "(default 20; --quick 4)")
    parser.add_argument("--index-samples", type=int, default=None, help="fake index size (default 10^8; "
                                                                        "--quick 10^6)")
    parser.add_argument("--index-shards", type=int, default=10_000)
    parser.add_argument("--child-index", nargs=3, metavar=("DIR", "SAMPLES", "SHARDS"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child_index:
        folder, samples, shards = args.child_index
        print(json.dumps(measure_index(Path(folder), int(samples), int(shards))))
        return 0

    n = args.samples or (256 if args.quick else 2048)
    steps = args.steps or (4 if args.quick else 20)
    index_samples = args.index_samples or (10 ** 6 if args.quick else 10 ** 8)
    if n < MICRO_BATCH:
        parser.error(f"--samples must be at least one micro batch ({MICRO_BATCH})")
    warmup = 2 if args.quick else 3
    timed = max(4, n // MICRO_BATCH)  # one epoch's worth of batches
    shards = 4 if args.quick else 8
    work = Path(args.work_dir) if args.work_dir else Path(tempfile.mkdtemp(prefix="data_throughput_"))
    work.mkdir(parents=True, exist_ok=True)
    load_start = load_average()
    print(f"command: {shlex.join([sys.executable, *sys.argv])}")
    print(f"machine: {machine()}; load average at start {load_start}")
    print(f"work dir {work}; N = {n} images of {IMAGE_PIXELS} px; micro batch {MICRO_BATCH}; {warmup} (+2 per "
          f"worker) warm-up batches, {timed} timed; training S = {steps}", flush=True)
    try:
        inputs = write_inputs(work, n, shards)
        print(f"inputs written ({inputs.bytes_per_image / 1024:.1f} KiB per JPEG): "
              + ", ".join(f"{name} {s:.1f} s" for name, s in inputs.write_s.items()), flush=True)

        sources = [("image folder, 256 px JPEG", "images", str(inputs.folder)),
                   ("CSV pairs, 256 px JPEG files", "pairs", str(inputs.csv)),
                   ("webdataset raw, 256 px", "images", inputs.raw_shards),
                   ("webdataset raw, 256 px", "pairs", inputs.raw_shards),
                   ("webdataset prepared, 32 px", "images", inputs.prepared_shards),
                   ("webdataset prepared, 32 px", "pairs", inputs.prepared_shards),
                   ("Hugging Face save_to_disk, 256 px JPEG bytes", "images", str(inputs.hf)),
                   ("Hugging Face save_to_disk, 256 px JPEG bytes", "pairs", str(inputs.hf))]
        print("loading:", flush=True)
        rows = [measure_loading(name, kind, spec, args.workers, warmup, timed, work / "index_cache")
                for name, kind, spec in sources]

        print("training:", flush=True)
        runs = {}
        for s in (steps, 2 * steps):
            runs[s] = run_training(s, max(1, steps // 2), work / "runs" / f"steps_{s}", work / "logs" / f"train_{s}.log")
            print(f"  {s} steps: {runs[s].wall_s:.1f} s; step lines: "
                  f"{', '.join(f'{r:.0f}' for r in runs[s].step_rates)} samples/s", flush=True)
        extra_s = runs[2 * steps].wall_s - runs[steps].wall_s
        # t(2S) <= t(S) only when noise (a busy machine) exceeds S steps' time: no rate then.
        wall_rate = steps * MICRO_BATCH / extra_s if extra_s > 0 else float("nan")
        # The first log window of a run holds the first steps' one-off costs: left out.
        steady_lines = runs[steps].step_rates[1:] + runs[2 * steps].step_rates[1:]
        line_rate = statistics.median(steady_lines) if steady_lines else float("nan")

        print("index:", flush=True)
        child = subprocess.run([sys.executable, __file__, "--child-index", str(work / "fake_index"),
                                str(index_samples), str(args.index_shards)],
                               stdout=subprocess.PIPE, text=True, check=True)
        index = json.loads(child.stdout.strip().splitlines()[-1])
    finally:
        shutil.rmtree(work / "fake_index", ignore_errors=True)  # also with --work-dir: sparse but huge
        if not args.work_dir:
            shutil.rmtree(work, ignore_errors=True)

    load_end = load_average()
    print()
    print(f"## Loading throughput (samples/s; N = {n}, micro batch {MICRO_BATCH}, demo train transform at 32 px)")
    print()
    print(loading_table(rows, args.workers))
    print()
    print("read as: images = stage 1 image (ImageDataset), pairs = stage 2 (PairDataset: + caption, "
          "demo tokenizer). open s: training_mixture() the first time (shards: index built). One torch "
          "thread per process; files in the page cache (decode + transform bound, not disk).")
    print()
    print("## Demo stage-1 image training (launch/stage1_image.sh, 1 rank, CPU, data.num_workers=0)")
    print()
    print("| measure | samples/s |")
    print("|---|---|")
    print(f"| its step lines (median of the log windows after the first, {len(steady_lines)} windows) "
          f"| {line_rate:,.0f} |")
    print(f"| wall time: {steps} x 64 / (t({2 * steps}) - t({steps})) = {steps * MICRO_BATCH} / "
          f"({runs[2 * steps].wall_s:.1f} - {runs[steps].wall_s:.1f}) s | {wall_rate:,.0f} |")
    print()
    ratio_rows = [row for row in rows if row.source.startswith("webdataset") and row.kind == "images"]
    print(f"## Loader / training (goal >= {GOAL_RATIO}; training = the step-line rate)")
    print()
    print("| loader (stage 1 image, 2 workers) | samples/s | / training (step lines) | goal | "
          "/ training (wall time) |")
    print("|---|---|---|---|---|")
    ratios = {}
    for row in ratio_rows:
        if 2 in row.samples_per_s:
            ratios[row.source] = row.samples_per_s[2] / line_rate
            print(f"| {row.source} | {row.samples_per_s[2]:,.0f} | {ratios[row.source]:.2f} | "
                  f"{'met' if ratios[row.source] >= GOAL_RATIO else 'NOT met'} (>= {GOAL_RATIO}) | "
                  f"{row.samples_per_s[2] / wall_rate:.2f} |")
    print()
    print(f"## Shard index at {index['samples']:.0e} samples over {index['shards']:,} shards "
          f"(fake_index + ShardSet.from_index, fresh process)")
    print()
    grow_open, grow_look = index["rss_growth_open_mib"], index["rss_growth_lookups_mib"]
    print("| measure | value |")
    print("|---|---|")
    print(f"| index files, apparent size (.npy + .json) | {index['apparent_bytes'] / 2 ** 30:.2f} GiB |")
    print(f"| index files, on disk (sparse) | {index['disk_bytes'] / 2 ** 20:.2f} MiB |")
    print(f"| ShardSet.from_index open | {index['open_s'] * 1e3:.0f} ms |")
    print(f"| index_nbytes_in_ram() | {index['index_nbytes_in_ram'] / 2 ** 20:.2f} MiB |")
    print(f"| RSS growth, open (total / anon / file) | {grow_open['VmRSS']:.1f} / {grow_open['RssAnon']:.1f} / "
          f"{grow_open['RssFile']:.1f} MiB |")
    print(f"| RSS growth, open + {LOOKUPS:,} random len/locate/row look-ups (total / anon / file) | "
          f"{grow_look['VmRSS']:.1f} / {grow_look['RssAnon']:.1f} / {grow_look['RssFile']:.1f} MiB |")
    print(f"| one look-up | {index['lookup_us']:.1f} us |")
    print(f"| GlobalOrder init | {index['order_init_ms']:.2f} ms |")
    print(f"| GlobalOrder global batch of {GLOBAL_BATCH_POSITIONS} positions (median of 20) | "
          f"{index['order_batch_ms']:.2f} ms |")
    print(f"| its memory: tracemalloc peak / RSS growth | {index['order_peak_traced_kib']:.0f} KiB / "
          f"{index['rss_growth_order_mib']:.1f} MiB |")
    print()
    print("file-backed RSS = index pages the OS mapped in (shared page cache, reclaimable); anon = the "
          "process's own memory.")
    print(f"load average at start {load_start}, at end {load_end}")
    print(json.dumps({"bench": "data_throughput", "command": sys.argv, "machine": machine(),
                      "load_average": [load_start, load_end], "samples": n, "micro_batch": MICRO_BATCH,
                      "inputs_write_s": inputs.write_s, "bytes_per_image": inputs.bytes_per_image,
                      "loading": [asdict(row) for row in rows],
                      "training": {"steps": [steps, 2 * steps], "wall_s": [runs[s].wall_s for s in (steps, 2 * steps)],
                                   "step_line_rates": {s: runs[s].step_rates for s in runs},
                                   "step_line_samples_per_s": line_rate,
                                   "wall_samples_per_s": wall_rate if wall_rate == wall_rate else None},
                      "ratio_loader_2_workers_over_training": ratios, "goal_ratio": GOAL_RATIO,
                      "index": index}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
