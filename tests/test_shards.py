"""Tar shard sets (img2dataset's webdataset layout) read at random through the on-disk index.

Shards are written by `webdataset.TarWriter` as img2dataset writes them (``%09d`` keys, an image,
a ``.txt`` caption and a ``.json`` record per sample), with real JPEG/PNG/WEBP images. Every
sample must come back exactly (decoded pixels equal to decoding the bytes written); each kind of
bad sample, shard and spec must be skipped and counted under its reason, or be a RecipeError.
"""

from __future__ import annotations

import io
import json
import multiprocessing
import os
import pickle
import tarfile
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image

from tinyclip_ds.config import RecipeError
from tinyclip_ds.data import shards
from tinyclip_ds.data.shards import (INDEX_DTYPE, INDEX_SKIP_REASONS, ShardSet, fake_index,
                                     is_shard_spec, shard_paths)
from tinyclip_ds.data.decode import CAPTION_SKIP_REASONS, SKIP_REASONS

FORMATS = {"jpg": "JPEG", "png": "PNG", "webp": "WEBP"}


def image_bytes(ext: str, seed: int) -> bytes:
    """A small random-pixel image, encoded as ``ext``."""
    pixels = np.random.default_rng(seed).integers(0, 256, (9, 12, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, FORMATS[ext])
    return buffer.getvalue()


def pixels(image: Image.Image | bytes) -> np.ndarray:
    if isinstance(image, bytes):
        image = Image.open(io.BytesIO(image))
    return np.asarray(image.convert("RGB"))


def img2dataset_sample(number: int, ext: str = "jpg", caption: str | None = None, txt: bool = True) -> dict:
    """One sample as img2dataset writes it; ``txt=False`` leaves the caption only in the .json."""
    caption = caption if caption is not None else f"a photo number {number}"
    sample = {"__key__": f"{number:09d}", ext: image_bytes(ext, number),
              "json": {"caption": caption, "url": f"http://example.com/{number}.{ext}", "key": f"{number:09d}",
                       "status": "success", "width": 12, "height": 9}}
    if txt:
        sample["txt"] = caption
    return sample


def write_shard(path: Path, samples: list[dict]) -> Path:
    with wds.TarWriter(str(path)) as sink:
        for sample in samples:
            sink.write(sample)
    return path


@pytest.fixture
def good_shards(tmp_path: Path) -> tuple[Path, dict[str, dict]]:
    """3 shards of 4 samples (jpg, png, webp; one caption only in the .json, one .json caption that
    differs from the .txt, which wins), and the samples by id ``<shard file>/<key>``."""
    folder = tmp_path / "shards"
    folder.mkdir()
    written = {}
    for shard in range(3):
        samples = []
        for j in range(4):
            number = shard * 4 + j
            sample = img2dataset_sample(number, ext=list(FORMATS)[number % 3], txt=j != 1)
            if j == 2:
                sample["json"]["caption"] = "the json caption, not used"
            samples.append(sample)
            written[f"{shard:05d}.tar/{number:09d}"] = sample
        write_shard(folder / f"{shard:05d}.tar", samples)
    (folder / "00000_stats.json").write_text("{}")  # img2dataset's other outputs sit beside the shards
    (folder / "00000.parquet").write_bytes(b"PAR1")
    return folder, written


def expected_caption(sample: dict) -> str:
    return sample["txt"] if "txt" in sample else sample["json"]["caption"]


def check_samples(part: ShardSet, written: dict[str, dict]) -> None:
    """Every sample of ``part`` is one written, with its pixels and caption; none missing."""
    seen = []
    for i in range(len(part)):
        sample_id = part.sample_id(i)
        sample = written[sample_id]
        ext = next(ext for ext in FORMATS if ext in sample)
        image = part.load(i)
        assert isinstance(image, Image.Image), (sample_id, image)
        assert np.array_equal(pixels(image), pixels(sample[ext])), sample_id
        assert part.captions_of(i) == [expected_caption(sample)]
        seen.append(sample_id)
    assert seen == sorted(written)


def test_brace_pattern_reads_every_sample_exactly(good_shards):
    folder, written = good_shards
    part = ShardSet(f"{folder}/{{00000..00002}}.tar", progress=False)
    assert len(part) == 12
    check_samples(part, written)
    assert part.summary() == "3 shards, 12 samples"
    assert part.skipped == Counter()
    # PNG is lossless: what comes back is the very array that was encoded.
    png = part.load(1)
    assert np.array_equal(pixels(png), np.random.default_rng(1).integers(0, 256, (9, 12, 3), dtype=np.uint8))
    # The index: beside the shards, the documented dtype, per-shard counts in the sidecar.
    assert part.index_path.parent == folder / ".tinyclip_index"
    rows = np.load(part.index_path, mmap_mode="r")
    assert rows.dtype == INDEX_DTYPE and rows.shape == (12,)
    assert list(rows["shard"]) == [0] * 4 + [1] * 4 + [2] * 4
    assert list(rows["caption_kind"]) == [1, 2, 1, 1] * 3  # sample 1 of each shard: caption from the .json
    meta = json.loads(part.index_path.with_suffix(".json").read_text())
    assert meta["counts"] == [4, 4, 4] and meta["need"] == ["image", "text"] and meta["version"] == 1
    assert [entry[0] for entry in meta["fingerprint"]] == [str(folder / f"{s:05d}.tar") for s in range(3)]
    assert list(part.starts) == [0, 4, 8, 12]


def test_directory_and_single_file_specs(good_shards, tmp_path):
    folder, written = good_shards
    by_folder = ShardSet(str(folder), progress=False)
    check_samples(by_folder, written)
    one = ShardSet(str(folder / "00001.tar"), progress=False)
    assert [one.sample_id(i) for i in range(len(one))] == [f"00001.tar/{n:09d}" for n in range(4, 8)]
    assert [one.captions_of(i) for i in range(4)] == [[expected_caption(written[one.sample_id(i)])] for i in range(4)]

    assert is_shard_spec(f"{folder}/{{00000..00002}}.tar") and is_shard_spec(str(folder / "00000.tar"))
    assert is_shard_spec(str(folder)) and is_shard_spec("missing/{0..3}.tar")
    assert not is_shard_spec(str(tmp_path / "pairs.csv")) and not is_shard_spec("demo:digit_pairs")
    images = tmp_path / "images"
    images.mkdir()
    (images / "a.jpg").write_bytes(image_bytes("jpg", 0))
    assert not is_shard_spec(str(images))  # an image folder is not a shard set
    assert shard_paths(str(folder)) == [folder / f"{s:05d}.tar" for s in range(3)]

    for spec, message in [(str(images), "holds no .tar files"), (str(tmp_path / "gone.tar"), "does not exist"),
                          (f"{tmp_path}/gone/{{000..002}}.tar", "none of the 3 shards"),
                          ("https://host/shards/{00000..00002}.tar", "not a local path"),
                          (str(tmp_path / "x.tar.gz"), "compressed shards")]:
        with pytest.raises(RecipeError, match=message) as error:
            ShardSet(spec, key="data.images", progress=False)
        assert "'data.images'" in str(error.value)


def test_index_is_cached_and_rebuilt_when_a_shard_changes(good_shards, monkeypatch):
    folder, written = good_shards
    spec = f"{folder}/{{00000..00002}}.tar"
    scanned = []
    real_scan = shards._scan_shard

    def counting_scan(*args):
        scanned.append(args[1])
        return real_scan(*args)

    monkeypatch.setattr(shards, "_scan_shard", counting_scan)
    first = ShardSet(spec, progress=False, index_workers=1)
    assert len(scanned) == 3

    def no_scan(*args):
        raise AssertionError("the index was scanned again")

    monkeypatch.setattr(shards, "_scan_shard", no_scan)
    again = ShardSet(spec, progress=False)  # the default (process pool) path must not scan either
    assert again.index_path == first.index_path
    check_samples(again, written)

    info = (folder / "00001.tar").stat()
    os.utime(folder / "00001.tar", ns=(info.st_atime_ns, info.st_mtime_ns + 10**9))
    with pytest.raises(AssertionError, match="scanned again"):
        ShardSet(spec, progress=False, index_workers=1)
    monkeypatch.setattr(shards, "_scan_shard", counting_scan)
    rebuilt = ShardSet(spec, progress=False, index_workers=1)
    assert len(scanned) == 6 and rebuilt.index_path != first.index_path and len(rebuilt) == 12
    # A different `need` is a different index too.
    assert ShardSet(spec, need=("image",), progress=False, index_workers=1).index_path != rebuilt.index_path


def test_concurrent_builders_build_once(good_shards, tmp_path, monkeypatch):
    """Ranks that start together: one process builds, the others wait on the lock and load."""
    folder, _ = good_shards
    builds = tmp_path / "builds.log"
    real_build = ShardSet._build

    def logged_build(self, *args):
        with open(builds, "a") as log:
            log.write(f"{os.getpid()}\n")
        time.sleep(0.3)  # keep the others waiting on the lock
        return real_build(self, *args)

    monkeypatch.setattr(ShardSet, "_build", logged_build)
    context = multiprocessing.get_context("fork")  # the children see the patched _build
    with context.Pool(3) as pool:
        results = pool.map(_build_in_child, [f"{folder}/{{00000..00002}}.tar"] * 3)
    assert len(builds.read_text().splitlines()) == 1
    assert len(set(results)) == 1 and results[0][0] == 12


def _build_in_child(spec: str) -> tuple[int, str]:
    part = ShardSet(spec, progress=False, index_workers=1)
    return len(part), str(part.index_path)


def cut_tar(path: Path, member_index: int, inside_data: bool) -> None:
    """Cut ``path`` in the middle of member ``member_index``'s data, or just before its header."""
    with tarfile.open(path) as tar:
        member = tar.getmembers()[member_index]
    end = member.offset_data + member.size // 2 if inside_data else member.offset
    with open(path, "r+b") as file:
        file.truncate(end)


@pytest.fixture
def bad_shards(tmp_path: Path) -> Path:
    """6 shards: 0 has one sample of each kind of trouble (keys 1..11) around good ones; 1 is
    garbage; 2 is cut in the middle of its 4th sample's image; 3 is missing; 4 is good; 5 is cut
    cleanly before its 3rd sample (no end-of-archive block)."""
    folder = tmp_path / "bad"
    folder.mkdir()
    jpeg = image_bytes("jpg", 99)
    no_caption = img2dataset_sample(1)
    del no_caption["txt"], no_caption["json"]
    samples = [
        img2dataset_sample(0, "png"),
        no_caption,                                                          # no_caption_member
        {"__key__": f"{2:09d}", "txt": "a caption without an image"},        # no_image_member
        {**img2dataset_sample(3), "jpg": b""},                               # zero_byte
        {**img2dataset_sample(4), "jpg": jpeg[:len(jpeg) // 2]},             # truncated
        {**img2dataset_sample(5), "jpg": b"<html>403 Forbidden</html>"},     # not_an_image
        img2dataset_sample(6, "png", caption="   "),                         # empty_caption
        {**img2dataset_sample(7, "png", txt=False), "json": {"status": "success"}},   # bad_json
        {**img2dataset_sample(8, "png", txt=False), "json": b"{not json"},  # bad_json
        {**img2dataset_sample(9, "png", txt=False), "json": {"caption": None}},       # missing_caption
        {**img2dataset_sample(10, "png"), "txt": "caf\xe9".encode("latin-1")},        # not_utf8
        img2dataset_sample(11, "png", caption="x" * 50),                     # long_caption
        {**img2dataset_sample(12, "png"), "npy": b"\x93NUMPY"},             # fine; .npy ignored
    ]
    write_shard(folder / "00000.tar", samples)
    (folder / "00001.tar").write_bytes(os.urandom(3000))
    write_shard(folder / "00002.tar", [img2dataset_sample(n) for n in range(20, 26)])
    cut_tar(folder / "00002.tar", member_index=9, inside_data=True)  # members: jpg, json, txt per sample
    write_shard(folder / "00004.tar", [img2dataset_sample(n, "webp") for n in range(40, 43)])
    write_shard(folder / "00005.tar", [img2dataset_sample(n) for n in range(50, 54)])
    cut_tar(folder / "00005.tar", member_index=6, inside_data=False)
    return folder


def test_bad_samples_and_shards_are_skipped_per_reason(bad_shards):
    spec = f"{bad_shards}/{{00000..00005}}.tar"
    part = ShardSet(spec, max_caption_chars=40, progress=False)
    assert part.skipped == Counter(no_caption_member=1, no_image_member=1, unreadable_shard=1,
                                   truncated_shard=2, missing_shard=1)
    assert set(part.skipped) <= set(INDEX_SKIP_REASONS)
    ids = {part.sample_id(i): i for i in range(len(part))}
    assert sorted(ids) == sorted([f"00000.tar/{n:09d}" for n in range(13) if n not in (1, 2)]
                                 + [f"00002.tar/{n:09d}" for n in range(20, 23)]
                                 + [f"00004.tar/{n:09d}" for n in range(40, 43)]
                                 + [f"00005.tar/{n:09d}" for n in range(50, 52)])
    assert len(part) == 19
    summary = part.summary()
    assert summary.startswith("6 shards, 19 samples; skipped while indexing: truncated_shard 2 (")
    for text in (f"unreadable_shard 1 ({bad_shards}/00001.tar)", f"missing_shard 1 ({bad_shards}/00003.tar)",
                 f"truncated_shard 2 ({bad_shards}/00002.tar, {bad_shards}/00005.tar)",
                 "no_caption_member 1", "no_image_member 1"):
        assert text in summary

    def load(n: int):
        return part.load(ids[f"00000.tar/{n:09d}"])

    def captions(n: int):
        return part.captions_of(ids[f"00000.tar/{n:09d}"])

    assert [load(n) for n in (3, 4, 5)] == ["zero_byte", "truncated", "not_an_image"]
    assert [captions(n) for n in range(6, 12)] == ["empty_caption", "bad_json", "bad_json", "missing_caption",
                                                  "not_utf8", "long_caption"]
    assert set(map(load, (3, 4, 5))) <= set(SKIP_REASONS)
    assert {captions(n) for n in range(6, 12)} <= set(CAPTION_SKIP_REASONS)
    for n in (0, 6, 12):
        assert np.array_equal(pixels(load(n)), pixels(image_bytes("png", n)))
    assert captions(12) == ["a photo number 12"] and captions(3) == ["a photo number 3"]
    for i in (ids["00002.tar/000000022"], ids["00005.tar/000000051"], ids["00004.tar/000000042"]):
        assert isinstance(part.load(i), Image.Image) and len(part.captions_of(i)) == 1

    # Stage 1 image needs only images: the caption-less sample is in, the caption-only one out.
    images = ShardSet(spec, need=("image",), progress=False)
    assert images.skipped == Counter(no_image_member=1, unreadable_shard=1, truncated_shard=2, missing_shard=1)
    image_ids = {images.sample_id(i): i for i in range(len(images))}
    assert len(images) == 20 and isinstance(images.load(image_ids["00000.tar/000000001"]), Image.Image)
    assert images.captions_of(image_ids["00000.tar/000000001"]) == "missing_caption"
    # Stage 1 text needs only captions: the other way round.
    texts = ShardSet(spec, need=("text",), progress=False)
    assert texts.skipped == Counter(no_caption_member=1, unreadable_shard=1, truncated_shard=2, missing_shard=1)
    text_ids = {texts.sample_id(i): i for i in range(len(texts))}
    assert len(texts) == 20 and texts.captions_of(text_ids["00000.tar/000000002"]) == ["a caption without an image"]
    assert texts.load(text_ids["00000.tar/000000002"]) == "no_image_member" and "no_image_member" in SKIP_REASONS


def test_a_shard_deleted_after_indexing_is_a_reason_not_a_crash(good_shards):
    folder, written = good_shards
    part = ShardSet(f"{folder}/{{00000..00002}}.tar", progress=False)
    (folder / "00001.tar").unlink()
    assert part.load(5) == "missing_shard" and part.captions_of(5) == "missing_shard"
    assert part.sample_id(5) == "00001.tar/#1"
    assert isinstance(part.load(9), Image.Image)
    assert "missing_shard" in SKIP_REASONS and "missing_shard" in CAPTION_SKIP_REASONS


def test_a_fifo_is_refused_or_skipped_never_read(good_shards, tmp_path):
    """Opening a FIFO blocks until a writer comes: the indexer must not try."""
    folder, _ = good_shards
    fifo = tmp_path / "pipe.tar"
    os.mkfifo(fifo)
    with pytest.raises(RecipeError, match="pipe.tar is not a regular file"):
        ShardSet(str(fifo), progress=False, index_workers=1)
    (folder / "00001.tar").unlink()
    os.mkfifo(folder / "00001.tar")
    part = ShardSet(f"{folder}/{{00000..00002}}.tar", progress=False, index_workers=1)
    assert len(part) == 8 and part.skipped["unreadable_shard"] == 1


def test_an_index_cut_short_is_a_recipe_error(good_shards):
    folder, _ = good_shards
    part = ShardSet(f"{folder}/{{00000..00002}}.tar", progress=False, index_workers=1)
    data = Path(part.index_path).read_bytes()
    Path(part.index_path).write_bytes(data[:len(data) - 40])
    with pytest.raises(RecipeError, match="cannot be read .*delete it and its sidecar"):
        ShardSet(f"{folder}/{{00000..00002}}.tar", progress=False, index_workers=1)


def test_a_spec_with_nothing_usable_is_a_recipe_error(tmp_path):
    folder = tmp_path / "nothing"
    folder.mkdir()
    for name in ("00000.tar", "00001.tar"):
        (folder / name).write_bytes(b"\x00garbage" * 200)
    for attempt in range(2):  # the second time from the cached index: the same message
        with pytest.raises(RecipeError, match=r"'data.pairs': .*: no usable samples in 2 shards "
                                              r"\(unreadable_shard 2 \(.*00000.tar, .*00001.tar\)\)"):
            ShardSet(str(folder), progress=False)
    captions_only = tmp_path / "captions"
    captions_only.mkdir()
    write_shard(captions_only / "00000.tar", [{"__key__": f"{n:09d}", "txt": "words"} for n in range(3)])
    with pytest.raises(RecipeError, match=r"no_image_member 3\); each sample needs an image"):
        ShardSet(str(captions_only), key="data.images", need=("image",), progress=False)
    empty = tmp_path / "empty"
    empty.mkdir()
    write_shard(empty / "00000.tar", [])
    with pytest.raises(RecipeError, match="the shards hold no members"):
        ShardSet(str(empty), progress=False)


def test_an_unwritable_cache_falls_back_to_the_user_cache(good_shards, tmp_path, monkeypatch):
    folder, written = good_shards
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "user_cache"))
    user_cache = tmp_path / "user_cache" / "tinyclip_ds" / "shard_index"
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")  # (tests run as root: a file in the way, not permissions)
    part = ShardSet(str(folder), cache_dir=blocker / "index", progress=False)
    assert part.index_path.parent == user_cache
    check_samples(part, written)
    (folder / ".tinyclip_index").write_text("in the way")  # the shards folder cannot take the index
    assert ShardSet(str(folder), progress=False).index_path.parent == user_cache
    mine = tmp_path / "mine"
    assert ShardSet(str(folder), cache_dir=mine, progress=False).index_path.parent == mine


class LoadedImages(torch.utils.data.Dataset):
    """What the training datasets do with a part: load sample i in a worker."""

    def __init__(self, part: ShardSet) -> None:
        self.part = part

    def __len__(self) -> int:
        return len(self.part)

    def __getitem__(self, i: int) -> tuple[int, str, torch.Tensor, str]:
        image = self.part.load(i)
        return i, self.part.sample_id(i), torch.from_numpy(pixels(image).copy()), self.part.captions_of(i)[0]


def test_loader_workers_read_the_right_samples(good_shards):
    folder, written = good_shards
    part = ShardSet(f"{folder}/{{00000..00002}}.tar", progress=False)
    assert isinstance(part.load(0), Image.Image) and isinstance(part.load(11), Image.Image)  # fds open before fork
    loader = torch.utils.data.DataLoader(LoadedImages(part), batch_size=None, num_workers=2,
                                         sampler=list(reversed(range(len(part)))))
    seen = []
    for i, sample_id, image, caption in loader:
        sample = written[sample_id]
        ext = next(ext for ext in FORMATS if ext in sample)
        assert torch.equal(image, torch.from_numpy(pixels(sample[ext]).copy())) and caption == expected_caption(sample)
        seen.append(int(i))
    assert seen == list(reversed(range(12)))
    check_samples(part, written)  # the parent's descriptors still work


def test_pickle_round_trip_drops_handles(good_shards):
    folder, written = good_shards
    part = ShardSet(f"{folder}/{{00000..00002}}.tar", progress=False)
    part.load(3)
    assert part._fds
    data = pickle.dumps(part)
    assert len(data) < 4000  # no index rows, no descriptors
    copy = pickle.loads(data)
    assert copy._fds == {} and copy._index is None
    check_samples(copy, written)
    assert copy.summary() == part.summary()


def test_member_names_beyond_the_img2dataset_layout(tmp_path):
    """Long names (a pax header), upper-case extensions, directories and webdataset metadata."""
    long_key = "deep/" * 25 + "sample-one"
    path = tmp_path / "odd.tar"
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tar:
        def add(name: str, data: bytes) -> None:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        tar.addfile(tarfile.TarInfo("deep/"))  # a directory member
        add("__meta__", b"{}")
        add(long_key + ".PNG", image_bytes("png", 1))
        add(long_key + ".txt", b"long name")
        add("caf\u00e9.photo.jpg", image_bytes("jpg", 2))   # key 'café', extension 'photo.jpg': not an image
        add("caf\u00e9.txt", b"no image here")
        add("two.JPEG", image_bytes("jpg", 3))
        add("two.TXT", b"upper-case")
    part = ShardSet(str(path), progress=False)
    assert [part.sample_id(i) for i in range(len(part))] == [f"odd.tar/{long_key}", "odd.tar/two"]
    assert part.skipped == Counter(no_image_member=1)
    assert np.array_equal(pixels(part.load(0)), pixels(image_bytes("png", 1)))
    assert part.captions_of(0) == ["long name"] and part.captions_of(1) == ["upper-case"]


def test_fake_index_opens_without_touching_each_sample(tmp_path):
    num_samples, num_shards = 10**7, 1000
    path = fake_index(tmp_path / "fake", num_samples, num_shards)
    assert path.stat().st_size > num_samples * INDEX_DTYPE.itemsize
    assert path.stat().st_blocks * 512 < 1 << 20  # sparse: the rows were never written
    started = time.perf_counter()
    part = ShardSet.from_index(path)
    assert time.perf_counter() - started < 1.0
    assert len(part) == num_samples and part.starts[-1] == num_samples and len(part.shards) == num_shards
    assert part.index_nbytes_in_ram() < 200_000
    assert part.load(num_samples - 1) == "missing_shard"
