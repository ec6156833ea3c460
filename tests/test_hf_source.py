"""Hugging Face datasets as a part (`tinyclip_ds.data.hf`): every spec form written by the real
`datasets` library, the columns found, bad rows with their reasons, spec errors, DataLoader
workers, pickled size, and no network use."""

from __future__ import annotations

import io
import json
import os
import pickle
import socket
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch
from PIL import Image

from tinyclip_ds.config import RecipeError
from tinyclip_ds.data import decode
from tinyclip_ds.data.hf import HFSource
from tinyclip_ds.data.hf_layout import is_hf_spec


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    """Every test runs with connecting and name lookups recorded and refused, and checks that
    none was tried (datasets swallows some failures, so refusing alone would not show them)."""
    tried: list[object] = []

    def refuse(*args, **kwargs):
        tried.append(args[1:] if args else kwargs)
        raise OSError("network use in a test")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    yield
    assert tried == [], f"network use: {tried}"


def png(seed: int, size: tuple[int, int] = (8, 6)) -> bytes:
    """A PNG whose pixels depend on ``seed`` (so that rows cannot be mixed up unnoticed)."""
    pixels = (np.arange(size[0] * size[1] * 3).reshape(size[1], size[0], 3) * (seed + 1)) % 251
    buffer = io.BytesIO()
    Image.fromarray(pixels.astype(np.uint8)).save(buffer, "PNG")
    return buffer.getvalue()


def jpeg(color: tuple[int, int, int]) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (16, 16), color).save(buffer, "JPEG", quality=95)
    return buffer.getvalue()


def pixels(image: Image.Image | bytes) -> np.ndarray:
    return np.asarray(image if isinstance(image, Image.Image) else Image.open(io.BytesIO(image)))


def image_dataset(images: list[bytes | None], texts: list, column: str = "image") -> datasets.Dataset:
    """A dataset with an Image feature holding ``images`` (embedded bytes) and a text column."""
    features = datasets.Features({column: datasets.Image(), "text": datasets.Value("string")})
    cells = [None if data is None else {"bytes": data, "path": None} for data in images]
    return datasets.Dataset.from_dict({column: cells, "text": texts}, features=features)


def reasons(part: HFSource) -> tuple[Counter[str], Counter[str]]:
    """Per reason, the rows whose image / captions cannot be used."""
    images = Counter(r for r in map(part.load, range(len(part))) if isinstance(r, str))
    captions = Counter(r for r in map(part.captions_of, range(len(part))) if isinstance(r, str))
    return images, captions


def test_spec_forms_are_recognised(tmp_path):
    dataset = image_dataset([png(0), png(1)], ["a", "b"])
    dataset.save_to_disk(tmp_path / "saved")
    datasets.DatasetDict({"train": dataset, "validation": dataset}).save_to_disk(tmp_path / "dict")
    dataset.to_parquet(tmp_path / "one.parquet")
    (tmp_path / "hub" / "data").mkdir(parents=True)
    dataset.to_parquet(tmp_path / "hub" / "data" / "train-00000-of-00001.parquet")
    for name, metadata in (("jsonl", '{"file_name": "a.png", "text": "x"}\n'), ("csv", "file_name,text\na.png,x\n")):
        (tmp_path / name).mkdir()
        (tmp_path / name / "a.png").write_bytes(png(0))
        (tmp_path / name / f"metadata.{name}").write_text(metadata)
    (tmp_path / "split_folders" / "train").mkdir(parents=True)
    (tmp_path / "split_folders" / "train" / "metadata.jsonl").write_text('{"file_name": "a.png"}\n')
    for path in ("saved", "dict", "one.parquet", "hub", "jsonl", "csv", "split_folders",
                 "saved/data-00000-of-00001.arrow"):
        assert is_hf_spec(tmp_path / path), path
        assert is_hf_spec(str(tmp_path / path)), path

    (tmp_path / "plain").mkdir()  # an image folder without metadata: the image-folder source's
    (tmp_path / "plain" / "a.png").write_bytes(png(0))
    (tmp_path / "no_file_name").mkdir()
    (tmp_path / "no_file_name" / "metadata.jsonl").write_text('{"image": "a.png"}\n')
    (tmp_path / "pairs.csv").write_text("filepath,title\na.png,x\n")
    for path in ("plain", "no_file_name", "pairs.csv", "missing", "missing.parquet"):
        assert not is_hf_spec(tmp_path / path), path
    assert not is_hf_spec("demo:digit_pairs")


def test_saved_dataset_rows(tmp_path):
    images = [png(i) for i in range(4)] + [jpeg((200, 30, 10))]
    texts = ["zero", "  one  ", "two", "three", "a red square"]
    image_dataset(images, texts).save_to_disk(tmp_path / "saved")

    part = HFSource(str(tmp_path / "saved"))
    assert len(part) == 5 and part.skipped == Counter()
    for i in range(4):
        assert np.array_equal(pixels(part.load(i)), pixels(images[i]))  # PNG: pixel-exact
    red = pixels(part.load(4).convert("RGB")).reshape(-1, 3).mean(axis=0)
    assert np.allclose(red, (200, 30, 10), atol=4)  # JPEG: lossy, but the colour survives
    assert [part.captions_of(i) for i in range(5)] == [["zero"], ["one"], ["two"], ["three"], ["a red square"]]
    assert part.sample_id(3) == "saved/3"
    assert part.image_column == "image" and part.image_kind == "feature" and part.caption_column == "text"
    assert part.summary().startswith("5 samples (Hugging Face saved; image column ")
    assert part.summary().endswith("; 0 skipped while indexing (rows are checked when loaded)")

    # the .arrow file save_to_disk wrote is a spec of its own
    arrow = HFSource(str(tmp_path / "saved" / "data-00000-of-00001.arrow"), key="data.images", need=("image",))
    assert len(arrow) == 5 and np.array_equal(pixels(arrow.load(2)), pixels(images[2]))


def test_bad_rows_give_reasons(tmp_path):
    good = png(0, size=(64, 64))
    images = [good, b"this is not an image", good[: len(good) // 2], b"", None, good, good, good, good]
    texts = ["ok", "ok", "ok", "ok", "ok", "", "   ", None, "x" * 50]
    image_dataset(images, texts).save_to_disk(tmp_path / "bad")

    part = HFSource(str(tmp_path / "bad"), max_caption_chars=40)
    assert len(part) == 9 and part.skipped == Counter()  # nothing is checked at open
    image_reasons, caption_reasons = reasons(part)
    assert image_reasons == Counter({"not_an_image": 1, "truncated": 1, "zero_byte": 1, "no_image": 1})
    assert caption_reasons == Counter({"empty_caption": 2, "missing_caption": 1, "long_caption": 1})
    assert set(image_reasons) <= set(decode.SKIP_REASONS)
    assert set(caption_reasons) <= set(decode.CAPTION_SKIP_REASONS)
    assert np.array_equal(pixels(part.load(0)), pixels(good))


def test_dataset_dict_splits(tmp_path):
    train = image_dataset([png(0), png(1)], ["train 0", "train 1"])
    validation = image_dataset([png(7)], ["validation 0"])
    datasets.DatasetDict({"train": train, "validation": validation}).save_to_disk(tmp_path / "dict")

    assert len(HFSource(str(tmp_path / "dict"))) == 2  # split "train" by default
    part = HFSource(str(tmp_path / "dict"), split="validation")
    assert len(part) == 1 and part.captions_of(0) == ["validation 0"]
    assert np.array_equal(pixels(part.load(0)), pixels(png(7)))
    assert part.sample_id(0) == "dict/validation/0"
    with pytest.raises(RecipeError, match=r"'data.pairs': .*dict has no split 'test'; its splits: "
                                          r"train, validation\. Set 'data.split'"):
        HFSource(str(tmp_path / "dict"), split="test")


def test_evaluation_never_reads_the_training_split(tmp_path):
    """eval.data of several splits takes eval.split ('' = refused, naming it), not data.split;
    a dataset of one split needs none."""
    from tinyclip_ds.data.config import DataConfig
    from tinyclip_ds.data.mixture import retrieval_pairs

    train = image_dataset([png(0), png(1)], ["train 0", "train 1"])
    validation = image_dataset([png(7)], ["validation 0"])
    datasets.DatasetDict({"train": train, "validation": validation}).save_to_disk(tmp_path / "dict")
    datasets.DatasetDict({"train": train}).save_to_disk(tmp_path / "one_split")
    data = DataConfig(split="train")
    with pytest.raises(RecipeError, match=r"'eval.data': .*dict has several splits; its splits: train, "
                                          r"validation\. Set 'eval.split'"):
        retrieval_pairs(str(tmp_path / "dict"), "", data)
    _, captions, _ = retrieval_pairs(str(tmp_path / "dict"), "", data, split="validation")
    assert captions == ["validation 0"]
    _, captions, _ = retrieval_pairs(str(tmp_path / "one_split"), "", data)
    assert captions == ["train 0", "train 1"]


def test_parquet_file_and_folder(tmp_path):
    images = [png(i) for i in range(3)]
    dataset = image_dataset(images, ["p0", "p1", "p2"])
    dataset.to_parquet(tmp_path / "one.parquet")
    cache = str(tmp_path / "cache")

    part = HFSource(str(tmp_path / "one.parquet"), cache_dir=cache)
    assert len(part) == 3 and part.image_kind == "feature" and part.captions_of(1) == ["p1"]
    assert np.array_equal(pixels(part.load(2)), pixels(images[2]))
    assert part.sample_id(0) == "one.parquet/0"

    # the Hub layout: split names in the file names
    (tmp_path / "hub" / "data").mkdir(parents=True)
    dataset.to_parquet(tmp_path / "hub" / "data" / "train-00000-of-00002.parquet")
    dataset.select([0]).to_parquet(tmp_path / "hub" / "data" / "train-00001-of-00002.parquet")
    dataset.select([1]).to_parquet(tmp_path / "hub" / "data" / "validation-00000-of-00001.parquet")
    (tmp_path / "hub" / "README.md").write_text("# a dataset card, not data\n")
    assert len(HFSource(str(tmp_path / "hub"), cache_dir=cache)) == 4
    validation = HFSource(str(tmp_path / "hub"), split="validation", cache_dir=cache)
    assert len(validation) == 1 and validation.captions_of(0) == ["p1"]
    with pytest.raises(RecipeError, match="has no split 'test'; its splits: train, validation"):
        HFSource(str(tmp_path / "hub"), split="test", cache_dir=cache)


@pytest.mark.parametrize("metadata", ["jsonl", "csv"])
def test_imagefolder(tmp_path, metadata):
    folder = tmp_path / "folder"
    folder.mkdir()
    images = {f"{i}.png": png(i) for i in range(3)}
    for name, data in images.items():
        (folder / name).write_bytes(data)
    (folder / "broken.png").write_bytes(b"\x89PNG but nothing more")
    rows = [(name, f"caption of {name}") for name in images] + [("broken.png", "broken"), ("gone.png", "gone")]
    if metadata == "jsonl":
        (folder / "metadata.jsonl").write_text("".join(json.dumps({"file_name": n, "text": t}) + "\n" for n, t in rows))
    else:
        (folder / "metadata.csv").write_text("file_name,caption\n" + "".join(f"{n},{t}\n" for n, t in rows))

    part = HFSource(str(folder), cache_dir=str(tmp_path / "cache"))
    assert len(part) == 5 and part.split == ""
    by_caption = {part.captions_of(i)[0]: i for i in range(len(part))}
    for name, data in images.items():
        assert np.array_equal(pixels(part.load(by_caption[f"caption of {name}"])), pixels(data))
    assert part.load(by_caption["broken"]) == "not_an_image"
    assert part.load(by_caption["gone"]) == "missing_file"  # listed in the metadata, not on disk
    assert reasons(part) == (Counter({"not_an_image": 1, "missing_file": 1}), Counter())


def test_imagefolder_split_folders(tmp_path):
    for split, count in (("train", 3), ("validation", 2)):
        (tmp_path / "set" / split).mkdir(parents=True)
        lines = []
        for i in range(count):
            (tmp_path / "set" / split / f"{i}.png").write_bytes(png(i))
            lines.append(json.dumps({"file_name": f"{i}.png", "text": f"{split} {i}"}) + "\n")
        (tmp_path / "set" / split / "metadata.jsonl").write_text("".join(lines))
    part = HFSource(str(tmp_path / "set"), split="validation", cache_dir=str(tmp_path / "cache"))
    assert len(part) == 2 and sorted(part.captions_of(i)[0] for i in range(2)) == ["validation 0", "validation 1"]


def test_path_and_bytes_columns_and_caption_lists(tmp_path):
    absolute = tmp_path / "elsewhere.png"
    absolute.write_bytes(png(5))
    datasets.Dataset.from_dict({
        "filepath": ["images/0.png", "images/1.png", "images/none.png", str(absolute), ""],
        "sentences": [["a cat", "  ", "a small cat"], ["x" * 3000], [], None, ["ok"]],
    }).save_to_disk(tmp_path / "paths")
    (tmp_path / "paths" / "images").mkdir()  # relative paths: inside the dataset's folder
    for i in range(2):
        (tmp_path / "paths" / "images" / f"{i}.png").write_bytes(png(i))

    part = HFSource(str(tmp_path / "paths"))
    assert part.image_column == "filepath" and part.image_kind == "path"
    assert part.caption_column == "sentences" and part.caption_kind == "list"
    assert np.array_equal(pixels(part.load(1)), pixels(png(1)))  # relative: against the dataset folder
    assert np.array_equal(pixels(part.load(3)), pixels(png(5)))  # absolute
    assert part.load(2) == "missing_file" and part.load(4) == "no_image"
    assert part.captions_of(0) == ["a cat", "a small cat"]  # the blank one left out
    assert [part.captions_of(i) for i in (1, 2, 3)] == ["long_caption", "missing_caption", "missing_caption"]

    # image_root: relative paths resolved there instead
    (tmp_path / "root" / "images").mkdir(parents=True)
    (tmp_path / "root" / "images" / "0.png").write_bytes(png(9))
    rooted = HFSource(str(tmp_path / "paths"), image_root=str(tmp_path / "root"))
    assert np.array_equal(pixels(rooted.load(0)), pixels(png(9)))

    # raw bytes in a binary column, the caption found case-insensitively (LAION's "TEXT")
    raw_dataset = datasets.Dataset.from_dict({"jpg": [png(3), b"\x00" * 10], "TEXT": ["three", "zeros"]})
    raw_dataset.save_to_disk(tmp_path / "raw")
    raw = HFSource(str(tmp_path / "raw"))
    assert raw.image_kind == "bytes" and raw.caption_column == "TEXT"
    assert np.array_equal(pixels(raw.load(0)), pixels(png(3))) and raw.load(1) == "not_an_image"


def test_column_errors(tmp_path):
    datasets.Dataset.from_dict({"picture": [png(0)], "label": [3], "words": ["hi"]}).save_to_disk(tmp_path / "odd")
    spec = str(tmp_path / "odd")
    with pytest.raises(RecipeError) as error:
        HFSource(spec, key="data.pairs[1]")
    message = str(error.value)
    assert message.startswith("'data.pairs[1]': ") and "has no image column (looked for image, jpg" in message
    assert "columns found: 'picture', 'label', 'words'" in message and "Set 'data.image_column'" in message

    with pytest.raises(RecipeError, match=r"has no caption column .*Set 'data.caption_column' to the column holding text"):
        HFSource(spec, image_column="picture")
    with pytest.raises(RecipeError, match=r"has no usable column 'label' \(named by 'data.caption_column'\)"):
        HFSource(spec, image_column="picture", caption_column="label")  # integers are not captions
    part = HFSource(spec, image_column="picture", caption_column="words")
    assert part.captions_of(0) == ["hi"] and np.array_equal(pixels(part.load(0)), pixels(png(0)))
    only_images = HFSource(spec, key="data.images", need=("image",), image_column="picture")
    assert only_images.caption_column is None and len(only_images) == 1
    assert "caption column" not in only_images.summary()
    with pytest.raises(ValueError, match="opened without captions"):
        only_images.captions_of(0)


def test_spec_errors(tmp_path):
    with pytest.raises(RecipeError, match="'data.pairs': .*nothing.arrow does not exist"):
        HFSource(str(tmp_path / "nothing.arrow"))
    (tmp_path / "junk.arrow").write_bytes(b"not arrow at all")
    with pytest.raises(RecipeError, match=r"'data.pairs': cannot read .*junk.arrow as a Hugging Face dataset"):
        HFSource(str(tmp_path / "junk.arrow"))
    (tmp_path / "junk.parquet").write_bytes(b"not parquet either")
    with pytest.raises(RecipeError, match="cannot read .*junk.parquet as a Hugging Face dataset"):
        HFSource(str(tmp_path / "junk.parquet"), cache_dir=str(tmp_path / "cache"))
    (tmp_path / "plain").mkdir()
    with pytest.raises(RecipeError, match="is not a Hugging Face dataset; accepted: a save_to_disk folder"):
        HFSource(str(tmp_path / "plain"))


@pytest.fixture(scope="module")
def ten_thousand(tmp_path_factory) -> Path:
    """A 10,000-row saved dataset of small PNGs (built once for the tests below)."""
    path = tmp_path_factory.mktemp("big") / "big"
    palette = [png(i, size=(12, 12)) for i in range(50)]
    image_dataset([palette[i % 50] for i in range(10_000)], [f"caption {i}" for i in range(10_000)]).save_to_disk(path)
    return path


def test_pickles_by_reference_and_opens_fast(ten_thousand):
    started = time.perf_counter()
    part = HFSource(str(ten_thousand))
    opened = time.perf_counter() - started
    assert len(part) == 10_000 and opened < 2.0

    table_bytes = part._images.data.nbytes
    pickled = pickle.dumps(part)
    assert table_bytes > 1_000_000 and len(pickled) < 20_000  # file names and replayed steps, not the table
    copy = pickle.loads(pickled)
    assert copy.captions_of(9_999) == ["caption 9999"]
    assert np.array_equal(pixels(copy.load(123)), pixels(png(123 % 50, size=(12, 12))))
    assert 0 < part.index_nbytes_in_ram() < table_bytes

    started = time.perf_counter()
    for i in range(0, 10_000, 10):
        part.captions_of(i)
        part._images[i]
    per_row = (time.perf_counter() - started) / 1000
    assert per_row < 0.002  # ~40 us on a free core: row access is not a table scan


class Rows(torch.utils.data.Dataset):
    def __init__(self, part: HFSource) -> None:
        self.part = part

    def __len__(self) -> int:
        return len(self.part)

    def __getitem__(self, i: int):
        return os.getpid(), np.asarray(self.part.load(i)), self.part.captions_of(i)[0]


def test_dataloader_workers(ten_thousand):
    part = HFSource(str(ten_thousand))
    indices = list(range(0, 10_000, 250))
    loader = torch.utils.data.DataLoader(torch.utils.data.Subset(Rows(part), indices), batch_size=4,
                                         num_workers=2, collate_fn=lambda batch: batch)
    rows = [row for batch in loader for row in batch]
    assert len({pid for pid, _, _ in rows}) == 2 and os.getpid() not in {pid for pid, _, _ in rows}
    for i, (_, image, caption) in zip(indices, rows):
        assert caption == f"caption {i}"
        assert np.array_equal(image, pixels(png(i % 50, size=(12, 12))))


def test_opens_with_datasets_offline(tmp_path):
    """The forms that run a datasets builder also open in a process where datasets is offline."""
    (tmp_path / "folder").mkdir()
    (tmp_path / "folder" / "a.png").write_bytes(png(0))
    (tmp_path / "folder" / "metadata.jsonl").write_text('{"file_name": "a.png", "text": "offline"}\n')
    image_dataset([png(1)], ["parquet"]).to_parquet(tmp_path / "one.parquet")
    script = (f"from tinyclip_ds.data.hf import HFSource\n"
              f"for spec in {[str(tmp_path / 'folder'), str(tmp_path / 'one.parquet')]!r}:\n"
              f"    part = HFSource(spec, cache_dir={str(tmp_path / 'cache')!r})\n"
              f"    print(part.captions_of(0)[0], part.load(0).size)\n")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                            env={**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.split("\n")[:2] == ["offline (8, 6)", "parquet (8, 6)"]
