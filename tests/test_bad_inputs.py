"""Bad image files as a real run meets them, through the real loader with 2 worker processes.

The fixture folder holds one file of each kind of trouble (empty, truncated, not an image, a
decompression bomb, a dangling symlink, a directory named like an image), images in every
awkward mode (greyscale, RGBA, palette, CMYK, 16-bit, 1x1, a PNG named .jpg), and the sidecar
files img2dataset writes. Training over whole epochs must skip exactly the unusable files, say
why, and ignore the sidecars; the odd modes must come out as sensible RGB.
"""

from __future__ import annotations

import csv
import io
import struct
import zlib
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tinyclip_ds.data.datasets import ImageDataset, PairDataset
from tinyclip_ds.data.order import GlobalOrder
from tinyclip_ds.data.sampler import GlobalBatchSampler, train_loader
from tinyclip_ds.data.decode import SKIP_REASONS, load_image
from tinyclip_ds.data.sources import image_source, pair_source
from tinyclip_ds.data.transforms import eval_transform, to_rgb, train_transform

MEAN = (0.48145466, 0.4578275, 0.40821073)
STD = (0.26862954, 0.26130258, 0.27577711)
SIZE = 16

SKIPPED = {"zero_byte": ["empty.jpg"], "truncated": ["cut.jpg", "cut.png"], "not_an_image": ["text.png"],
           "too_large": ["huge.png"], "missing_file": ["gone.jpg"]}
"""The unusable files of the bad folder, by the reason they are skipped."""
USABLE = ["UPPER.JPG", "cmyk.jpg", "folder.jpg/inner.png", "gray.png", "jpeg_named.png", "palette.png",
          "png_named.jpg", "rgb.jpg", "rgba.png", "sixteen.png", "tiny.png"]
IGNORED = {".txt": 2, ".json": 1, "": 1}  # 00000.txt, README.txt, 00000.json, LICENSE


def noise(width: int, height: int, seed: int = 0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8))


def encoded(image: Image.Image, format: str) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format)
    return buffer.getvalue()


def png_declaring(width: int, height: int) -> bytes:
    """A PNG whose header declares ``width`` x ``height`` RGB pixels, with no pixel data."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")


def sixteen_bit_gradient() -> np.ndarray:
    return (np.arange(32 * 32, dtype=np.uint32).reshape(32, 32) * 64).astype(np.uint16)  # 0 .. 65472


def make_bad_folder(root: Path) -> None:
    root.mkdir(parents=True)
    noise(32, 24).save(root / "rgb.jpg")
    noise(20, 20, seed=1).save(root / "UPPER.JPG")
    (root / "png_named.jpg").write_bytes(encoded(noise(20, 20, seed=2), "PNG"))  # Pillow reads content
    (root / "jpeg_named.png").write_bytes(encoded(noise(20, 20, seed=3), "JPEG"))
    noise(20, 20, seed=4).convert("L").save(root / "gray.png")
    rgba = Image.new("RGBA", (20, 20), (255, 0, 0, 255))
    rgba.paste((0, 0, 0, 0), (0, 0, 10, 20))  # left half: transparent black
    rgba.save(root / "rgba.png")
    palette = Image.new("P", (20, 20), 1)
    palette.putpalette([0, 0, 0, 0, 0, 255] + [0] * 762)  # 0: black (transparent), 1: blue
    palette.paste(0, (0, 0, 10, 20))
    palette.save(root / "palette.png", transparency=0)
    Image.new("CMYK", (20, 20), (0, 255, 255, 0)).save(root / "cmyk.jpg")  # red in CMYK
    Image.fromarray(sixteen_bit_gradient()).save(root / "sixteen.png")
    noise(1, 1, seed=5).save(root / "tiny.png")
    (root / "folder.jpg").mkdir()  # a folder named like an image is a folder
    noise(20, 20, seed=6).save(root / "folder.jpg" / "inner.png")

    (root / "empty.jpg").touch()
    (root / "cut.jpg").write_bytes(encoded(noise(64, 64, seed=7), "JPEG")[:1500])
    whole_png = encoded(noise(64, 64, seed=8), "PNG")
    (root / "cut.png").write_bytes(whole_png[:len(whole_png) // 2])
    (root / "text.png").write_text("this is not an image\n")
    (root / "huge.png").write_bytes(png_declaring(30_000, 30_000))  # 9e8 pixels, beyond Pillow's limit
    (root / "gone.jpg").symlink_to(root / "deleted.jpg")

    (root / "00000.txt").write_text("a caption")
    (root / "00000.json").write_text("{}")
    (root / "README.txt").write_text("about these images")
    (root / "LICENSE").write_text("CC-BY")
    (root / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")  # hidden: tool metadata, not counted


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("bad_inputs")
    make_bad_folder(root / "bad")
    for i in range(7):
        (root / "good").mkdir(exist_ok=True)
        noise(24, 20, seed=10 + i).save(root / "good" / f"{i:05d}.jpg")
    return root / "bad", root / "good"


def run_epochs(dataset, epochs: int, micro_batch: int, accumulation: int) -> list[dict]:
    """Every micro-batch of ``epochs`` whole epochs through the training loader with 2 workers."""
    sampler = GlobalBatchSampler(GlobalOrder([len(dataset)], seed=0), micro_batch, accumulation, world_size=1, rank=0)
    assert sampler.steps_per_epoch * sampler.global_batch == len(dataset), "the test must cover whole epochs"
    batches = iter(train_loader(dataset, sampler, num_workers=2))
    drawn = [next(batches) for _ in range(epochs * sampler.steps_per_epoch * accumulation)]
    del batches  # ends the workers
    return drawn


def totals(batches: list[dict], field: str) -> Counter:
    return sum((Counter(batch[field]) for batch in batches), Counter())


def test_training_skips_exactly_the_unusable_files_and_ignores_sidecars(folders):
    bad, good = folders
    source = image_source([str(bad), str(good)])
    assert sorted(p.relative_to(bad).as_posix() for p in source.entries if bad in p.parents) == \
        sorted(USABLE + [name for names in SKIPPED.values() for name in names])
    assert source.ignored == IGNORED
    assert source.summary() == "24 images, 4 other files ignored (.txt: 2, no extension: 1, .json: 1)"

    epochs = 3  # 24 images, 2 steps of 12 per epoch: every image is drawn 3 times
    batches = run_epochs(ImageDataset(source, train_transform(SIZE, MEAN, STD)), epochs, micro_batch=4,
                         accumulation=3)
    expected = {reason: epochs * len(names) for reason, names in SKIPPED.items()}
    assert totals(batches, "skip_reasons") == expected
    assert set(expected) <= set(SKIP_REASONS)
    assert totals(batches, "skip_sources") == {str(bad): sum(expected.values())}
    assert sum(batch["skipped"] for batch in batches) == sum(expected.values())
    used = [i for batch in batches for i in batch["index"].tolist()]
    assert Counter(source.entries[i].name for i in used) == \
        Counter({Path(name).name: epochs for name in USABLE} | {f"{i:05d}.jpg": epochs for i in range(7)})
    images = torch.cat([batch["image"] for batch in batches if "image" in batch])
    assert images.shape == (len(used), 3, SIZE, SIZE) and torch.isfinite(images).all()


def test_pairs_naming_a_folder_or_a_missing_file_are_skipped_with_their_reason(folders, tmp_path):
    bad, _ = folders
    names = USABLE + [name for names in SKIPPED.values() for name in names] + ["folder.jpg", "absent.jpg", "elsewhere/absent.png"]
    table = tmp_path / "pairs.csv"
    with open(table, "w", newline="") as f:
        csv.writer(f).writerows([("filepath", "title")] + [(name, f"caption of {name}") for name in names])
    pairs = pair_source(str(table), image_root=str(bad))
    assert len(pairs) == 20
    batches = run_epochs(PairDataset(pairs, train_transform(SIZE, MEAN, STD), lambda texts: torch.zeros(1, 8)),
                         epochs=1, micro_batch=5, accumulation=2)
    assert totals(batches, "skip_reasons") == {"zero_byte": 1, "truncated": 2, "not_an_image": 1,
                                               "too_large": 1, "missing_file": 3, "not_a_file": 1}
    assert totals(batches, "skip_sources") == {str(table): 9}


def test_every_image_mode_becomes_sensible_rgb(folders):
    bad, _ = folders
    rgb = {name: to_rgb(load_image(bad / name)) for name in USABLE}
    assert all(image.mode == "RGB" for image in rgb.values())

    # 16-bit greyscale keeps its top 8 bits (Pillow's own conversion makes 99.6% of it 255)
    sixteen = np.asarray(rgb["sixteen.png"])
    assert np.array_equal(sixteen, np.repeat((sixteen_bit_gradient() >> 8).astype(np.uint8)[..., None], 3, -1))
    assert (sixteen == 255).mean() < 0.01
    # transparency composited on white; the opaque colours kept
    rgba, palette = np.asarray(rgb["rgba.png"]), np.asarray(rgb["palette.png"])
    assert (rgba[:, :10] == 255).all() and (rgba[:, 10:] == [255, 0, 0]).all()
    assert (palette[:, :10] == 255).all() and (palette[:, 10:] == [0, 0, 255]).all()
    cmyk = np.asarray(rgb["cmyk.jpg"]).astype(int)
    assert (np.abs(cmyk - [255, 0, 0]) < 8).all()
    # content, not the extension, decides the format
    assert np.array_equal(np.asarray(rgb["png_named.jpg"]), np.asarray(noise(20, 20, seed=2)))
    # a 1x1 image goes through resize and crop
    tiny = eval_transform(SIZE, MEAN, STD)(load_image(bad / "tiny.png"))
    assert tiny.shape == (3, SIZE, SIZE) and torch.equal(tiny, tiny[:, :1, :1].expand_as(tiny))
