"""``tinyclip-ds prepare``: real image folders, CSV and COCO-layout files (with a corrupt, an empty,
a non-image and a missing image) turned into webdataset shards, read back with webdataset and
tarfile: sample counts, 32 x 32 centre crops, captions, per-reason skip counts in stats.json,
byte-identical shards for 1 and 2 workers, and one-line errors for unusable arguments."""

from __future__ import annotations

import csv
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds
from PIL import Image

from tinyclip_ds.cli import main
from tinyclip_ds.prepare import prepare

SIZE = 32


def _jpeg(path: Path, width: int, height: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(path, quality=90)


def _bands(width: int, height: int) -> Image.Image:
    """Red | green | blue vertical thirds: a centre crop of a wide image is all green."""
    array = np.zeros((height, width, 3), dtype=np.uint8)
    third = width // 3
    array[:, :third, 0] = 255
    array[:, third:2 * third, 1] = 255
    array[:, 2 * third:, 2] = 255
    return Image.fromarray(array)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    """imgs/ (4 good images of various sizes and modes + truncated, empty and non-image files and
    a .txt to ignore), pairs.csv over it (a missing file, an empty caption, a repeated image, a
    malformed row) and coco/ as COCO ships it (5 captions per image, a truncated and a missing image)."""
    root = tmp_path_factory.mktemp("prepare")
    imgs = root / "imgs"
    imgs.mkdir()
    _jpeg(imgs / "a.jpg", 64, 48, 0)
    _bands(96, 32).save(imgs / "b_bands.png")
    Image.new("RGBA", (40, 90), (255, 0, 0, 0)).save(imgs / "c_clear.png")  # fully transparent: white
    _jpeg(imgs / "d.jpg", 500, 375, 1)
    good = (imgs / "a.jpg").read_bytes()
    (imgs / "e_truncated.jpg").write_bytes(good[: len(good) // 2])
    (imgs / "f_empty.jpg").write_bytes(b"")
    (imgs / "g_text.png").write_text("not an image")
    (imgs / "notes.txt").write_text("ignored: not an image file")

    with open(root / "pairs.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["filepath", "title"])
        writer.writerows([["imgs/a.jpg", "a noisy picture"], ["imgs/b_bands.png", "red green blue"],
                          ["imgs/a.jpg", "  the same picture again "], ["imgs/missing.jpg", "gone"],
                          ["imgs/e_truncated.jpg", "cut short"], ["imgs/d.jpg", "   "],
                          ["imgs/c_clear.png", "nothing to see"]])
        f.write("imgs/d.jpg,too,many,fields\n")  # malformed: left out by the reader

    coco = root / "coco"
    (coco / "annotations").mkdir(parents=True)
    (coco / "train2017").mkdir()
    for i in (1, 2):
        _jpeg(coco / "train2017" / f"{i:012d}.jpg", 80 + 40 * i, 60, i)
    (coco / "train2017" / f"{3:012d}.jpg").write_bytes(good[:300])
    images = [{"id": i, "file_name": f"{i:012d}.jpg"} for i in (1, 2, 3, 4)]  # 4: no file
    annotations = [{"id": 10 * i + j, "image_id": i, "caption": f"image {i} caption {j}"}
                   for i in (1, 2, 3, 4) for j in range(5)]
    (coco / "annotations" / "captions_train2017.json").write_text(
        json.dumps({"images": images, "annotations": annotations}))
    return root


def run(capsys, *args: str) -> tuple[int, str, str]:
    code = main(["prepare", *args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def read_samples(out: Path) -> list[dict]:
    """Every sample of the shards in ``out``, decoded by webdataset (images as PIL)."""
    stats = json.loads((out / "stats.json").read_text())
    dataset = wds.WebDataset(stats["pattern"], shardshuffle=False).decode("pil")
    return list(dataset)


def one_line_error(err: str, *expected: str) -> None:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err
    for text in expected:
        assert text in lines[0], lines[0]


def test_image_folder(data, tmp_path, capsys):
    out = tmp_path / "shards"
    code, stdout, _ = run(capsys, str(data / "imgs"), "--out", str(out), "--size", str(SIZE), "--workers", "1")
    assert code == 0
    assert f"data.images: {out}/{{00000..00000}}.tar" in stdout
    assert "skipped: 3 (not_an_image: 1, truncated: 1, zero_byte: 1)" in stdout
    stats = json.loads((out / "stats.json").read_text())
    assert stats["samples"] == 4 and stats["source_samples"] == 7 and stats["shards"] == 1
    assert stats["skipped"] == {"not_an_image": 1, "truncated": 1, "zero_byte": 1}
    assert "1 other files ignored (.txt: 1)" in stats["indexing"]

    samples = read_samples(out)
    # Keys are the source numbers (sorted paths): the skipped e, f, g (4, 5, 6) leave no sample.
    assert [s["__key__"] for s in samples] == ["000000000", "000000001", "000000002", "000000003"]
    assert all(set(s) == {"__key__", "__url__", "__local_path__", "jpg", "json"} or
               set(s) == {"__key__", "__url__", "jpg", "json"} for s in samples)
    assert all(s["jpg"].size == (SIZE, SIZE) and s["jpg"].mode == "RGB" for s in samples)
    meta = [s["json"] for s in samples]
    assert [(m["original_width"], m["original_height"]) for m in meta] == [(64, 48), (96, 32), (40, 90), (500, 375)]
    assert meta[3]["source"] == str(data / "imgs" / "d.jpg") and "caption" not in meta[3]
    bands = np.asarray(samples[1]["jpg"], dtype=float)
    assert bands[..., 1].mean() > 230 and bands[..., 0].mean() < 25 and bands[..., 2].mean() < 25  # the centre third
    assert np.asarray(samples[2]["jpg"]).min() > 240  # transparent composited on white, not black


def test_csv_pairs_with_grouped_captions(data, tmp_path, capsys):
    out = tmp_path / "shards"
    code, stdout, _ = run(capsys, str(data / "pairs.csv"), "--out", str(out), "--size", str(SIZE),
                          "--shard-size", "2", "--workers", "2")
    assert code == 0
    # 6 images (a.jpg's two rows grouped): 3 shards of 2.
    assert f"data.pairs: {out}/{{00000..00002}}.tar" in stdout
    stats = json.loads((out / "stats.json").read_text())
    assert stats["skipped"] == {"empty_caption": 1, "missing_file": 1, "truncated": 1}
    assert stats["samples"] == 3 and stats["source_samples"] == 6 and stats["shards"] == 3
    assert "1 malformed rows skipped (lines 9)" in stats["indexing"]
    samples = read_samples(out)
    by_key = {s["__key__"]: s for s in samples}
    assert sorted(by_key) == ["000000000", "000000001", "000000005"]
    first = by_key["000000000"]
    assert first["txt"] == "a noisy picture"
    assert first["json"]["captions"] == ["a noisy picture", "the same picture again"]
    assert first["json"]["caption"] == "a noisy picture"
    assert by_key["000000005"]["txt"] == "nothing to see"
    assert all(s["jpg"].size == (SIZE, SIZE) for s in samples)
    with tarfile.open(out / "00000.tar") as tar:  # img2dataset layout: key.ext members, in key order
        assert tar.getnames() == [f"00000000{k}.{ext}" for k in (0, 1) for ext in ("jpg", "json", "txt")]


def test_coco_layout_five_captions(data, tmp_path, capsys):
    out = tmp_path / "shards"
    code, stdout, _ = run(capsys, str(data / "coco" / "annotations" / "captions_train2017.json"), "--out",
                          str(out), "--size", str(SIZE), "--workers", "1")
    assert code == 0 and "data.pairs:" in stdout
    stats = json.loads((out / "stats.json").read_text())
    assert stats["skipped"] == {"missing_file": 1, "truncated": 1} and stats["samples"] == 2
    samples = read_samples(out)
    assert [s["txt"] for s in samples] == ["image 1 caption 0", "image 2 caption 0"]
    assert samples[1]["json"]["captions"] == [f"image 2 caption {j}" for j in range(5)]
    assert samples[1]["json"]["source"] == str(data / "coco" / "train2017" / f"{2:012d}.jpg")
    assert all(s["jpg"].size == (SIZE, SIZE) for s in samples)


def test_caption_text_file(tmp_path, capsys):
    source = tmp_path / "captions.txt"
    source.write_text("a dog\n\na cat on a mat\n")
    code, stdout, _ = run(capsys, str(source), "--out", str(tmp_path / "out"))
    assert code == 0 and "data.captions:" in stdout
    with tarfile.open(tmp_path / "out" / "00000.tar") as tar:
        assert tar.getnames() == ["000000000.txt", "000000001.txt"]
        assert tar.extractfile("000000001.txt").read() == b"a cat on a mat"


def test_byte_identical_for_any_worker_count(data, tmp_path):
    outs = []
    for workers, start_method in ((1, None), (2, None), (2, "spawn")):
        out = tmp_path / f"w{workers}{start_method}"
        report = prepare(str(data / "imgs"), out, size=SIZE, shard_size=2, workers=workers,
                         start_method=start_method, log=lambda line: None)
        assert report.shards == 4 and report.written == 4
        outs.append(out)
    names = sorted(p.name for p in outs[0].iterdir())
    assert names == ["00000.tar", "00001.tar", "00002.tar", "00003.tar", "stats.json"]
    for other in outs[1:]:
        assert sorted(p.name for p in other.iterdir()) == names
        for name in names[:-1]:
            assert (outs[0] / name).read_bytes() == (other / name).read_bytes(), name
    with tarfile.open(outs[0] / "00001.tar") as tar:
        assert {(m.mtime, m.uid, m.gid) for m in tar.getmembers()} == {(0, 0, 0)}


def test_a_worker_that_dies_is_an_error_not_a_hang(data, tmp_path, monkeypatch):
    import os

    import tinyclip_ds.prepare as prepare_module
    from tinyclip_ds.config import RecipeError

    # forked workers inherit the patch: each dies as the OS kills a process out of memory
    monkeypatch.setattr(prepare_module, "write_shard", lambda task, tick: os._exit(9))
    with pytest.raises(RecipeError, match="a prepare worker process died"):
        prepare(str(data / "imgs"), tmp_path / "out", size=SIZE, shard_size=2, workers=2,
                start_method="fork", log=lambda line: None)


def test_refuses_non_empty_out_dir_unless_overwrite(data, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "00007.tar").write_bytes(b"stale shard of an earlier, larger run")
    (out / "keep.md").write_text("not ours")
    code, _, err = run(capsys, str(data / "imgs"), "--out", str(out), "--size", str(SIZE))
    assert code == 2
    one_line_error(err, str(out), "not empty", "--overwrite")
    assert not (out / "00000.tar").exists()

    code, _, _ = run(capsys, str(data / "imgs"), "--out", str(out), "--size", str(SIZE), "--overwrite")
    assert code == 0
    assert sorted(p.name for p in out.iterdir()) == ["00000.tar", "keep.md", "stats.json"]


def test_one_line_errors(data, tmp_path, capsys):
    code, _, err = run(capsys, str(tmp_path / "nowhere"), "--out", str(tmp_path / "out"))
    assert code == 2
    one_line_error(err, "SOURCE", "nowhere", "does not exist")

    code, _, err = run(capsys, str(data / "imgs"), "--out", str(tmp_path / "out"), "--kind", "pairs")
    assert code == 2
    one_line_error(err, "cannot read image-caption pairs")

    code, _, err = run(capsys, str(data / "imgs"), "--out", str(tmp_path / "out"), "--quality", "0")
    assert code == 2
    one_line_error(err, "--quality")

    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "x.jpg").write_bytes(b"")
    (bad / "y.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 20)
    code, _, err = run(capsys, str(bad), "--out", str(tmp_path / "empty_out"))
    assert code == 2
    one_line_error(err, "none of its 2 samples could be used", "zero_byte: 1", "nothing written")
    assert not any((tmp_path / "empty_out").glob("*.tar"))
