"""The data layer: transforms, sources, datasets, the world-size-independent sampler."""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms as T

from tinyclip_ds.config import RecipeError
from tinyclip_ds.data.datasets import ImageDataset, PairDataset, TextDataset, collate
from tinyclip_ds.data.order import GlobalOrder
from tinyclip_ds.data.sampler import GlobalBatchSampler, sample_seed, train_loader
from tinyclip_ds.data.decode import SKIP_REASONS
from tinyclip_ds.data.sources import (ImageSource, PairSource, caption_source, classification_source, eval_pairs,
                                      image_source, pair_source)
from tinyclip_ds.data.transforms import GEOMETRIC_OPS, GeometricRandAugment, eval_transform, to_rgb, train_transform

MEAN = (0.48145466, 0.4578275, 0.40821073)
STD = (0.26862954, 0.26130258, 0.27577711)
SIZE = 16


def char_tokenizer(texts: list[str], ctx: int = 24) -> torch.Tensor:
    """A stand-in tokenizer: character codes, zero padded."""
    out = torch.zeros(len(texts), ctx, dtype=torch.long)
    for row, text in enumerate(texts):
        codes = [ord(c) for c in text[:ctx]]
        out[row, :len(codes)] = torch.tensor(codes)
    return out


def random_image(width: int, height: int, seed: int, mode: str = "RGB") -> Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    return Image.fromarray(pixels).convert(mode)


def write_png(path, seed: int, size: tuple[int, int] = (20, 20)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    random_image(*size, seed).save(path)


# --------------------------------------------------------------------------- transforms

@pytest.mark.parametrize("mode", ["RGB", "L", "RGBA"])
def test_eval_transform_is_clip_preprocessing(mode):
    image = random_image(40, 24, seed=1, mode=mode)
    out = eval_transform(SIZE, MEAN, STD)(image)
    assert out.shape == (3, SIZE, SIZE) and out.dtype == torch.float32
    # direct computation: shorter side to SIZE with PIL bicubic, centre crop, [0, 1], normalise
    resized = image.convert("RGB").resize((int(SIZE * 40 / 24), SIZE), Image.BICUBIC)
    left = round((resized.width - SIZE) / 2)
    pixels = np.asarray(resized, dtype=np.float32)[:, left:left + SIZE] / 255
    expected = (pixels - np.array(MEAN, dtype=np.float32)) / np.array(STD, dtype=np.float32)
    torch.testing.assert_close(out, torch.from_numpy(expected).permute(2, 0, 1), atol=1e-5, rtol=0)


def test_train_transform_keeps_only_geometric_ops():
    space = GeometricRandAugment()._augmentation_space(31, (SIZE, SIZE))
    assert set(space) == set(GEOMETRIC_OPS)
    colour_ops = {"Brightness", "Color", "Contrast", "Sharpness", "Posterize", "Solarize",
                  "AutoContrast", "Equalize", "Invert"}
    assert not colour_ops & set(space)

    # Behaviour: on a one-colour image the centre pixel survives any shear, translation or
    # rotation at the default magnitude, but not a colour operation.
    flat = Image.new("RGB", (SIZE, SIZE), (200, 60, 30))
    expected = (torch.tensor([200, 60, 30]) / 255 - torch.tensor(MEAN)) / torch.tensor(STD)

    def centre_pixels(transform) -> list[torch.Tensor]:
        dataset = ImageDataset(ImageSource([flat]), transform)
        return [dataset[(0, seed)]["image"][:, SIZE // 2, SIZE // 2] for seed in range(40)]

    geometric = train_transform(SIZE, MEAN, STD)
    assert all(torch.allclose(p, expected, atol=1e-5) for p in centre_pixels(geometric))
    # the same check catches torchvision's full RandAugment, which includes colour ops
    full = T.Compose([T.RandAugment(), T.ToTensor(), T.Normalize(MEAN, STD)])
    assert not all(torch.allclose(p, expected, atol=1e-5) for p in centre_pixels(full))


def test_train_transform_depends_only_on_sample_seed():
    dataset = ImageDataset(ImageSource([random_image(24, 24, seed=2)]), train_transform(SIZE, MEAN, STD))
    torch.manual_seed(123)
    before = torch.random.get_rng_state()
    first = dataset[(0, 7)]["image"]
    assert torch.equal(torch.random.get_rng_state(), before), "the caller's RNG must be untouched"
    torch.manual_seed(999)  # a different global state changes nothing
    assert torch.equal(dataset[(0, 7)]["image"], first)
    others = [dataset[(0, seed)]["image"] for seed in range(8, 16)]
    assert any(not torch.equal(first, other) for other in others), "augmentation never varied"
    no_augment = ImageDataset(dataset.source, train_transform(SIZE, MEAN, STD, randaugment=False))
    torch.testing.assert_close(no_augment[(0, 7)]["image"], eval_transform(SIZE, MEAN, STD)(dataset.source.load(0)))


# --------------------------------------------------------------------------- sources

def test_image_folder_is_recursive_and_sorted(tmp_path):
    for rel, seed in [("b.png", 0), ("a/x.png", 1), ("a/deep/er/y.png", 2)]:
        write_png(tmp_path / rel, seed)
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "z.jpg").write_bytes(b"not a jpeg at all")
    (tmp_path / ".hidden.png").write_bytes(b"ignored")
    source = image_source([str(tmp_path)])
    assert [p.relative_to(tmp_path).as_posix() for p in source.entries] == \
        ["a/deep/er/y.png", "a/x.png", "b.png", "c/z.jpg"]
    assert np.array_equal(np.asarray(source.load(0)), np.asarray(random_image(20, 20, seed=2)))
    assert source.load(3) == "not_an_image"  # garbage bytes: reported, not raised

    # two specs are concatenated
    assert len(image_source([str(tmp_path), str(tmp_path / "a")])) == 4 + 2


def test_unreadable_image_is_skipped_and_counted(tmp_path):
    for i in range(6):
        write_png(tmp_path / f"{i}.png", seed=i)
    (tmp_path / "3.png").write_bytes(b"\x89PNG garbage")
    truncated = (tmp_path / "0.png").read_bytes()
    (tmp_path / "5.png").write_bytes(truncated[:len(truncated) // 2])
    dataset = ImageDataset(image_source(str(tmp_path)), train_transform(SIZE, MEAN, STD))
    assert dataset[(3, 0)] == {"index": 3, "skipped": "not_an_image", "source": str(tmp_path)}
    assert dataset[(5, 0)] == {"index": 5, "skipped": "truncated", "source": str(tmp_path)}

    sampler = GlobalBatchSampler(GlobalOrder([6], seed=0), micro_batch=6, accumulation=1, world_size=1, rank=0)
    for workers in (0, 2):
        batch = next(iter(train_loader(dataset, sampler, num_workers=workers)))
        keys = sampler.micro_batch_keys(0, 0)
        good = [(i, s) for i, s in keys if i not in (3, 5)]
        assert batch["skipped"] == 2
        assert batch["skip_reasons"] == {"not_an_image": 1, "truncated": 1}
        assert batch["skip_sources"] == {str(tmp_path): 2}
        assert batch["index"].tolist() == [i for i, _ in good]
        torch.testing.assert_close(batch["image"], torch.stack([dataset[k]["image"] for k in good]))

    everything_bad = collate([{"index": 1, "skipped": "zero_byte", "source": "x"}])
    assert everything_bad["skipped"] == 1 and everything_bad["index"].numel() == 0
    assert everything_bad["skip_reasons"] == {"zero_byte": 1} and everything_bad["skip_sources"] == {"x": 1}


def test_each_unusable_file_is_logged_once_per_process(tmp_path, caplog):
    (tmp_path / "empty.png").touch()
    source = ImageSource([tmp_path / "empty.png"])
    assert [source.load(0) for _ in range(3)] == ["zero_byte"] * 3
    assert [r.getMessage() for r in caplog.records] == [f"skipping image {tmp_path / 'empty.png'} (zero_byte): "
                                                        f"{SKIP_REASONS['zero_byte']}"]


def test_source_of_names_the_spec_of_each_entry(tmp_path):
    for folder, n in [("one", 2), ("two", 3)]:
        for i in range(n):
            write_png(tmp_path / folder / f"{i}.png", seed=i)
    specs = [str(tmp_path / "one"), str(tmp_path / "two"), str(tmp_path / "one")]
    source = image_source(specs)
    assert [source.source_of(i) for i in range(len(source))] == [specs[0]] * 2 + [specs[1]] * 3 + [specs[2]] * 2

    for name in ("a.csv", "b.csv"):
        (tmp_path / name).write_text("filepath,title\none/0.png,x\nmissing.png,y\n")
    pairs = pair_source([str(tmp_path / "a.csv"), str(tmp_path / "b.csv")])
    batch = collate([PairDataset(pairs, eval_transform(SIZE, MEAN, STD), char_tokenizer)[i] for i in range(4)])
    assert batch["skip_reasons"] == {"missing_file": 2}
    assert batch["skip_sources"] == {str(tmp_path / "a.csv"): 1, str(tmp_path / "b.csv"): 1}


def test_text_and_coco_captions(tmp_path):
    (tmp_path / "caps.txt").write_text("a dog\n\n  a cat on a mat  \n\n")
    coco = {"images": [{"id": 1, "file_name": "one.jpg"}, {"id": 2, "file_name": "two.jpg"},
                       {"id": 3, "file_name": "no_caption.jpg"}],
            "annotations": [{"image_id": 2, "id": 10, "caption": "two a "},
                            {"image_id": 1, "id": 11, "caption": "one a"},
                            {"image_id": 2, "id": 12, "caption": "two b"},
                            {"image_id": 1, "id": 13, "caption": "one b"},
                            {"image_id": 2, "id": 14, "caption": "two c"}]}
    (tmp_path / "captions.json").write_text(json.dumps(coco))
    captions = caption_source([str(tmp_path / "caps.txt"), str(tmp_path / "captions.json")])
    assert captions == ["a dog", "a cat on a mat", "two a", "one a", "two b", "one b", "two c"]

    pairs = pair_source(str(tmp_path / "captions.json"))
    assert pairs.entries == [tmp_path / "one.jpg", tmp_path / "two.jpg"]
    assert pairs.captions == [["one a", "one b"], ["two a", "two b", "two c"]]
    moved = pair_source([str(tmp_path / "captions.json")], image_root=str(tmp_path / "images"))
    assert moved.entries[0] == tmp_path / "images" / "one.jpg"

    images, flat, text_to_image = eval_pairs(str(tmp_path / "captions.json"))
    assert flat == ["one a", "one b", "two a", "two b", "two c"]
    assert [images.entries[i].name for i in text_to_image] == ["one.jpg"] * 2 + ["two.jpg"] * 3


@pytest.mark.parametrize("suffix,delimiter", [(".csv", ","), (".tsv", "\t")])
def test_csv_and_tsv_pairs(tmp_path, suffix, delimiter):
    rows = [("img/a.png", "an a, quoted"), ("/abs/b.png", "a b"), ("img/a.png", "another a")]
    path = tmp_path / f"pairs{suffix}"
    with open(path, "w", newline="") as f:
        writer = csv.writer(f, delimiter=delimiter)
        writer.writerow(["url", "path", "text"])
        writer.writerows([("http://x", p, c) for p, c in rows])
    pairs = pair_source(str(path), csv_image_key="path", csv_caption_key="text")
    assert pairs.entries == [tmp_path / "img" / "a.png", tmp_path / "/abs/b.png"]
    assert pairs.captions == [["an a, quoted", "another a"], ["a b"]]

    with pytest.raises(RecipeError) as error:
        pair_source([str(path)])  # default keys: filepath / title
    message = str(error.value)
    assert "data.pairs[0]" in message and "'filepath'" in message and "data.csv_image_key" in message
    assert all(column in message for column in ("'url'", "'path'", "'text'"))
    with pytest.raises(RecipeError, match="'title'.*data.csv_caption_key"):
        pair_source(str(path), csv_image_key="path")


def test_pair_dataset_draws_a_caption_from_the_sample_seed(tmp_path):
    write_png(tmp_path / "a.png", seed=0)
    source = PairSource([tmp_path / "a.png"], [["first", "second", "third"]])
    dataset = PairDataset(source, train_transform(SIZE, MEAN, STD), char_tokenizer)
    texts = {seed: dataset[(0, seed)]["text"] for seed in range(30)}
    chosen = {tuple(t.tolist()) for t in texts.values()}
    assert chosen == {tuple(char_tokenizer([c])[0].tolist()) for c in source.captions[0]}
    assert all(torch.equal(dataset[(0, seed)]["text"], text) for seed, text in texts.items())
    assert torch.equal(dataset[0]["text"], char_tokenizer(["first"])[0])  # evaluation: first caption

    batch = collate([TextDataset(["x", "yy"], char_tokenizer)[(i, 0)] for i in (1, 0)])
    assert batch["index"].tolist() == [1, 0] and batch["skipped"] == 0
    assert torch.equal(batch["text"], char_tokenizer(["yy", "x"]))


def test_tsv_is_read_without_quoting(tmp_path):
    """CC3M and img2dataset write bare quotes: an opening quote must not swallow the rows after it."""
    captions = [f"caption {i}" for i in range(10)]
    captions[2] = '"Quoted" start, then an unmatched " and more'
    captions[5] = '"an unmatched quote at the start'
    path = tmp_path / "cc3m.tsv"
    path.write_text("title\tfilepath\n" + "".join(f"{c}\timages/{i}.jpg\n" for i, c in enumerate(captions)))
    pairs = pair_source(str(path))
    assert [entry.name for entry in pairs.entries] == [f"{i}.jpg" for i in range(10)]
    assert [c for per_image in pairs.captions for c in per_image] == captions
    assert pairs.bad_rows == {}


def test_csv_rows_of_the_wrong_shape_are_skipped_and_reported(tmp_path):
    path = tmp_path / "pairs.csv"
    path.write_text('filepath,title\n'
                    'a.png,one\n'
                    'b.png,two,and a stray field\n'  # line 3: three fields
                    'c.png,three\n'
                    'd.png,"four, quoted"\n'
                    ',no image path\n'  # line 6
                    'e.png,"five with an unmatched quote\n'  # line 7: swallows the lines after it
                    'f.png,six\n'
                    'g.png,seven\n')
    pairs = pair_source(str(path))
    assert [entry.name for entry in pairs.entries] == ["a.png", "c.png", "d.png"]
    assert pairs.captions == [["one"], ["three"], ["four, quoted"]]
    assert pairs.bad_rows == {str(path): [3, 6, 7]}
    assert pairs.summary() == f"3 images with 3 captions; {path}: 3 malformed rows skipped (lines 3, 6, 7)"

    # most rows malformed: the wrong delimiter, say; an error naming the file and lines
    path.write_text("filepath,title\na.png,one\n" + "".join(f"{i}.png,x,y\n" for i in range(7)))
    with pytest.raises(RecipeError, match=rf"data.pairs': {path}: 7 of 8 rows are malformed \(lines 3, 4, 5, 6, 7, "
                                          rf"\.\.\. \(7 in all\).*delimiter"):
        pair_source(str(path))


def test_text_files_with_a_bom_are_read_and_other_encodings_are_named(tmp_path):
    excel = tmp_path / "excel.csv"  # Excel's "CSV UTF-8" starts with a byte-order mark
    excel.write_text("filepath,title\na.png,café\n", encoding="utf-8-sig")
    assert pair_source(str(excel)).captions == [["café"]]
    captions = tmp_path / "captions.txt"
    captions.write_text("a dog\na cat\n", encoding="utf-8-sig")
    assert caption_source(str(captions)) == ["a dog", "a cat"]
    coco = tmp_path / "captions.json"
    coco.write_text(json.dumps({"annotations": [{"image_id": 1, "caption": "a dog"}]}), encoding="utf-8-sig")
    assert caption_source(str(coco)) == ["a dog"]

    captions.write_text("a dog\na cat\na café\n", encoding="latin-1")
    with pytest.raises(RecipeError, match=rf"data.captions': {captions} line 3 is not UTF-8.*iconv"):
        caption_source(str(captions))
    excel.write_text("filepath,title\na.png,one\nb.png,café\n", encoding="latin-1")
    with pytest.raises(RecipeError, match=rf"data.pairs': {excel} line 3 is not UTF-8"):
        pair_source(str(excel))
    coco.write_text('{"annotations": [\n{"image_id": 1, "caption": "café"}]}', encoding="latin-1")
    with pytest.raises(RecipeError, match=rf"eval.data': {coco} line 2 is not UTF-8"):
        eval_pairs(str(coco))


def test_coco_annotation_without_caption_or_image_id_is_named(tmp_path):
    path = tmp_path / "captions.json"
    images = [{"id": 1, "file_name": "1.jpg"}]
    path.write_text(json.dumps({"images": images, "annotations": [{"image_id": 1, "caption": "ok"},
                                                                  {"image_id": 1, "id": 7}]}))
    for read, key in [(caption_source, "data.captions"), (pair_source, "data.pairs"), (eval_pairs, "eval.data")]:
        with pytest.raises(RecipeError, match=rf"{key}': {path}: \"annotations\"\[1\] has no .*'caption' "
                                              rf"\(found {{\"image_id\": 1, \"id\": 7}}\)"):
            read(str(path))
    # captions alone need no image_id; pairs do
    path.write_text(json.dumps({"images": images, "annotations": [{"caption": "no image id"}]}))
    assert caption_source(str(path)) == ["no image id"]
    with pytest.raises(RecipeError, match=r"\"annotations\"\[0\] has no 'image_id' and 'caption'"):
        pair_source(str(path))
    path.write_text(json.dumps({"images": images, "annotations": [{"image_id": 1, "caption": None}]}))
    with pytest.raises(RecipeError, match=r"\"annotations\"\[0\] has no 'caption'"):
        caption_source(str(path))
    path.write_text(json.dumps({"images": [{"id": 1}], "annotations": [{"image_id": 1, "caption": "x"}]}))
    with pytest.raises(RecipeError, match=r"\"images\"\[0\] has no \"id\" and \"file_name\""):
        pair_source(str(path))


def test_image_folders_hold_image_files_by_extension(tmp_path):
    """img2dataset's output: 00000.jpg with 00000.txt and 00000.json sidecars, and a parquet."""
    for i in range(3):
        write_png(tmp_path / "00000" / f"{i:05d}.jpg", seed=i)
        (tmp_path / "00000" / f"{i:05d}.txt").write_text(f"caption {i}")
        (tmp_path / "00000" / f"{i:05d}.json").write_text("{}")
    write_png(tmp_path / "00000" / "shouting.JPEG", seed=3)
    (tmp_path / "00000.parquet").write_bytes(b"PAR1")
    (tmp_path / "._00000.jpg").write_bytes(b"macOS metadata")  # hidden: neither image nor counted
    source = image_source(str(tmp_path))
    assert [p.name for p in source.entries] == ["00000.jpg", "00001.jpg", "00002.jpg", "shouting.JPEG"]
    assert source.ignored == {".txt": 3, ".json": 3, ".parquet": 1}
    assert source.summary() == "4 images, 7 other files ignored (.json: 3, .txt: 3, .parquet: 1)"

    only_sidecars = tmp_path / "captions_only"
    only_sidecars.mkdir()
    (only_sidecars / "00000.txt").write_text("a caption")
    with pytest.raises(RecipeError, match=r"data.images.*contains no images, only 1 other files \(\.txt\); "
                                          r"images are \.bmp, \.gif, \.jpeg, \.jpg"):
        image_source(str(only_sidecars))

    # class folders of a zero-shot set likewise: a stray README.txt is not an image of the class
    for cls in ("cat", "dog"):
        write_png(tmp_path / "classes" / cls / "0.png", seed=0)
    (tmp_path / "classes" / "dog" / "README.txt").write_text("where these came from")
    images, labels, classnames, _ = classification_source(str(tmp_path / "classes"))
    assert labels == [0, 1] and classnames == ["cat", "dog"] and images.ignored == {".txt": 1}


def test_16_bit_png_is_scaled_to_8_bits_not_clipped(tmp_path):
    gradient = (np.arange(40 * 24, dtype=np.uint32).reshape(24, 40) * 68).astype(np.uint16)
    Image.fromarray(gradient).save(tmp_path / "x.png")  # a 16-bit greyscale PNG
    image = image_source(str(tmp_path)).load(0)
    assert image.mode.startswith("I")
    expected = Image.fromarray((gradient >> 8).astype(np.uint8)).convert("RGB")
    assert np.array_equal(np.asarray(to_rgb(image)), np.asarray(expected))
    torch.testing.assert_close(eval_transform(SIZE, MEAN, STD)(image), eval_transform(SIZE, MEAN, STD)(expected))
    big_endian = Image.frombytes("I;16B", (40, 24), gradient.astype(">u2").tobytes())
    assert np.array_equal(np.asarray(to_rgb(big_endian)), np.asarray(expected))


def test_coco_layout_resolves_its_own_image_folder(tmp_path):
    """COCO as shipped: annotations/captions_<split>.json, images in <split>/."""
    coco = tmp_path / "coco"
    annotations = {"images": [{"id": 1, "file_name": "000000000001.jpg"}, {"id": 2, "file_name": "000000000002.jpg"}],
                   "annotations": [{"image_id": i, "caption": f"image {i}"} for i in (1, 2)]}
    (coco / "annotations").mkdir(parents=True)
    for split in ("train2017", "val2017"):
        (coco / "annotations" / f"captions_{split}.json").write_text(json.dumps(annotations))
        for i in (1, 2):
            write_png(coco / split / f"{i:012d}.jpg", seed=i)
    images, captions, _ = eval_pairs(str(coco / "annotations" / "captions_val2017.json"))
    assert images.entries == [coco / "val2017" / "000000000001.jpg", coco / "val2017" / "000000000002.jpg"]
    assert all(isinstance(images.load(i), Image.Image) for i in range(len(images)))
    train = pair_source(str(coco / "annotations" / "captions_train2017.json"))
    assert train.entries[0] == coco / "train2017" / "000000000001.jpg"
    # an explicit root wins; a file outside the COCO layout keeps its own folder
    assert eval_pairs(str(coco / "annotations" / "captions_val2017.json"),
                      image_root=str(tmp_path))[0].entries[0] == tmp_path / "000000000001.jpg"
    (coco / "annotations" / "captions_test.json").write_text(json.dumps(annotations))  # no test/ folder
    assert eval_pairs(str(coco / "annotations" / "captions_test.json"))[0].entries[0] == \
        coco / "annotations" / "000000000001.jpg"


def test_classification_folder(tmp_path):
    for cls, n in [("golden_retriever", 2), ("tabby", 3)]:
        for i in range(n):
            write_png(tmp_path / cls / f"{i}.png", seed=i)
    images, labels, classnames, templates = classification_source(str(tmp_path))
    assert classnames == ["golden retriever", "tabby"] and templates is None
    assert labels == [0, 0, 1, 1, 1]
    assert [p.parent.name for p in images.entries] == ["golden_retriever"] * 2 + ["tabby"] * 3
    (tmp_path / "classnames.txt").write_text("dog\ncat\n")
    assert classification_source(str(tmp_path))[2] == ["dog", "cat"]
    (tmp_path / "classnames.txt").write_text("dog\n")
    with pytest.raises(RecipeError, match="eval.zeroshot.*1 names.*2 class folders"):
        classification_source(str(tmp_path))


def test_bad_specs_name_the_recipe_key(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "notes.md").write_text("hi")
    (tmp_path / "blank.txt").write_text("\n\n")
    write_png(tmp_path / "good" / "a.png", seed=0)
    with pytest.raises(RecipeError, match=r"data.images\[1\].*does not exist"):
        image_source([str(tmp_path / "good"), str(tmp_path / "missing")])
    with pytest.raises(RecipeError, match=r"data.images.*is a file.*image folder"):
        image_source(str(tmp_path / "notes.md"))
    with pytest.raises(RecipeError, match=r"data.images\[0\].*contains no images"):
        image_source([str(tmp_path / "empty")])
    with pytest.raises(RecipeError, match=r"data.captions.*accepted: \.txt.*\.json"):
        caption_source(str(tmp_path / "notes.md"))
    with pytest.raises(RecipeError, match=r"data.captions.*contains no captions"):
        caption_source(str(tmp_path / "blank.txt"))
    with pytest.raises(RecipeError, match=r"data.pairs.*accepted: \.csv / \.tsv"):
        pair_source(str(tmp_path / "blank.txt"))
    with pytest.raises(RecipeError, match="eval.data.*does not exist"):
        eval_pairs(str(tmp_path / "missing.csv"))
    with pytest.raises(RecipeError, match="eval.zeroshot.*no sub-folders"):
        classification_source(str(tmp_path / "empty"))
    with pytest.raises(RecipeError, match="data.images.*unknown demo data 'demo:digts'.*demo:digits"):
        image_source("demo:digts")
    with pytest.raises(RecipeError, match=r"data.images' is empty"):
        image_source([])


# --------------------------------------------------------------------------- sampler

WORLDS = [(1, 4), (2, 2), (4, 1)]  # (world size, accumulation): same micro and global batch
MICRO = 3


def micro_batches_of_step(world: int, accumulation: int, num_samples: int, step: int,
                          start_step: int = 0) -> list[list[tuple[int, int]]]:
    """The micro-batches of global step ``step`` in k order, gathered from every rank's sampler."""
    per_rank = []
    for rank in range(world):
        iterator = iter(GlobalBatchSampler(GlobalOrder([num_samples], seed=5), MICRO, accumulation, world,
                                           rank, start_position=start_step * accumulation))
        batches = [next(iterator) for _ in range((step - start_step + 1) * accumulation)]
        per_rank.append(batches[-accumulation:])
    # k = m * world + r
    return [per_rank[r][m] for m in range(accumulation) for r in range(world)]


def test_global_steps_are_independent_of_world_size():
    num_samples = 50  # G = 12: 4 steps per epoch, 2 samples dropped per epoch
    for step in (0, 3, 4, 9):
        layouts = [micro_batches_of_step(w, a, num_samples, step) for w, a in WORLDS]
        assert layouts[0] == layouts[1] == layouts[2]
        sampler = GlobalBatchSampler(GlobalOrder([num_samples], seed=5), MICRO, 4, 1, 0)
        assert [i for batch in layouts[0] for i, _ in batch] == sampler.global_batch_indices(step)
        epoch, start = sampler.epoch_of(step), (step % sampler.steps_per_epoch) * 12
        seeds = [s for batch in layouts[0] for _, s in batch]
        assert seeds == [sample_seed(5, epoch, start + p) for p in range(12)]


def test_each_epoch_is_a_permutation_without_repeats():
    sampler = GlobalBatchSampler(GlobalOrder([50], seed=5), MICRO, 2, 2, 0)
    assert sampler.steps_per_epoch == 4 and sampler.epoch_of(3) == 0 and sampler.epoch_of(4) == 1
    epochs = [[i for step in range(e * 4, e * 4 + 4) for i in sampler.global_batch_indices(step)]
              for e in range(3)]
    for seen in epochs:
        assert len(seen) == len(set(seen)) == 48 and set(seen) <= set(range(50))
    assert epochs[0] != epochs[1] != epochs[2]
    other_seed = GlobalBatchSampler(GlobalOrder([50], seed=6), MICRO, 2, 2, 0)
    assert other_seed.global_batch_indices(0) != sampler.global_batch_indices(0)


@pytest.mark.parametrize("world,accumulation", WORLDS)
def test_start_step_continues_an_uninterrupted_run(world, accumulation):
    for rank in range(world):
        full = iter(GlobalBatchSampler(GlobalOrder([50], seed=5), MICRO, accumulation, world, rank))
        uninterrupted = [next(full) for _ in range(11 * accumulation)]
        resumed = iter(GlobalBatchSampler(GlobalOrder([50], seed=5), MICRO, accumulation, world, rank,
                                           start_position=6 * accumulation))
        assert [next(resumed) for _ in range(5 * accumulation)] == uninterrupted[6 * accumulation:]


def test_resume_on_another_world_size_sees_the_same_augmented_samples(tmp_path):
    for i in range(26):
        write_png(tmp_path / f"{i:02d}.png", seed=i, size=(20, 18))
    dataset = ImageDataset(image_source(str(tmp_path)), train_transform(SIZE, MEAN, STD))
    step = 2  # epoch 1 (G = 12, 2 steps per epoch): resumed there on each world size
    tensors = []
    for world, accumulation in WORLDS:
        batches = micro_batches_of_step(world, accumulation, len(dataset), step, start_step=step)
        tensors.append(torch.cat([collate([dataset[k] for k in keys])["image"] for keys in batches]))
    assert torch.equal(tensors[0], tensors[1]) and torch.equal(tensors[0], tensors[2])


def test_too_little_data_for_one_global_batch():
    with pytest.raises(RecipeError, match="fewer than one global batch of 24"):
        GlobalBatchSampler(GlobalOrder([20], seed=0), micro_batch=3, accumulation=4, world_size=2, rank=0)


# --------------------------------------------------------------------------- the digits demo

@pytest.fixture(scope="module")
def digits():
    return pytest.importorskip("tinyclip_ds.data.digits")


def test_demo_sources(digits):
    singles = digits.digit_images("train")
    source = image_source("demo:digits")
    assert len(source) == len(singles)
    assert np.array_equal(np.asarray(source.load(5)), np.asarray(singles[5][0]))

    captions = caption_source(["demo:digits"])
    pair_captions = [c for _, c in digits.digit_pairs("train")]
    assert captions == digits.single_captions() + pair_captions

    pairs = pair_source(["demo:digit_pairs"])
    assert [c for per_image in pairs.captions for c in per_image] == pair_captions

    images, flat, text_to_image = eval_pairs("demo:digit_pairs")
    held_out = digits.digit_pairs("heldout")
    assert len(images) == len(set(flat)) == 100 and text_to_image == list(range(100))
    assert flat == [c for _, c in held_out]

    images, labels, classnames, templates = classification_source("demo:digits")
    assert labels == [label for _, label in digits.digit_images("heldout")]
    assert classnames == digits.DIGIT_NAMES and templates == digits.SINGLE_TEMPLATES

    from tinyclip_ds.demo.teacher import demo_tokenizer

    tokenizer = demo_tokenizer()
    dataset = PairDataset(pairs, train_transform(digits.IMAGE_SIZE, MEAN, STD), tokenizer)
    sample = dataset[(0, 3)]
    assert sample["image"].shape == (3, digits.IMAGE_SIZE, digits.IMAGE_SIZE)
    assert torch.equal(sample["text"], tokenizer([pairs.captions[0][0]])[0])


# --------------------------------------------------------------------------- compact indexes

def test_paths_and_captions_are_packed_in_a_fraction_of_the_memory_of_lists():
    import tracemalloc

    from tinyclip_ds.data.sources import CaptionTable, PathTable

    names = [f"/data/imagenet/train/n{i % 1000:08d}/n{i % 1000:08d}_{i}.JPEG" for i in range(20_000)]
    names.append(os.fsdecode(b"/data/caf\xe9.jpg"))  # not UTF-8: kept as the file system gives it
    tracemalloc.start()
    as_list = [Path(name) for name in names]
    for path in as_list:
        path.name  # a Path parses its parts on first use, as the loader's reads do
    list_bytes = tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()
    table = PathTable(names)
    assert table == as_list and table[-1] == as_list[-1] and table[5:7] == as_list[5:7]
    assert table.texts.nbytes < list_bytes / 3

    captions = CaptionTable([["a dog", "a dog on grass"], [], ["café ☕"]])
    assert len(captions) == 3 and captions == [["a dog", "a dog on grass"], [], ["café ☕"]]
    assert captions[-1] == ["café ☕"]
    # a lone surrogate (a JSON "\ud800" escape) cannot be encoded: it becomes "?", the rest is kept
    assert CaptionTable([["a\ud800b", "ok"]]) == [["a?b", "ok"]]
