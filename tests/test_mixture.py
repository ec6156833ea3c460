"""A weighted mixture of a webdataset shard set and a Hugging Face dataset, read as training reads
it: the global order decides every sample on any number of ranks and loader workers, and a run
stopped after k steps and resumed on another number of ranks draws the samples of the run that
never stopped (real DeepSpeed launches, 2 ranks x 2 workers)."""

from __future__ import annotations

import io
import json

import datasets
import numpy as np
import pytest
import torch
import webdataset
from PIL import Image

from conftest import launch
from tinyclip_ds.config import RecipeError
from tinyclip_ds.data.config import DataConfig
from tinyclip_ds.data.datasets import PairDataset, TextDataset
from tinyclip_ds.data.mixture import Mixture, Part, read_part, training_mixture
from tinyclip_ds.data.sources import TextTable
from tinyclip_ds.data.order import GlobalOrder
from tinyclip_ds.data.sampler import GlobalBatchSampler, train_loader
from tinyclip_ds.data.transforms import eval_transform


SHARD_SAMPLES, HF_ROWS = 30, 18
CAPTIONS = [f"a photo of the number {n}." for n in
            ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")]


def png(value: int) -> bytes:
    """A 4x4 PNG whose pixels all hold ``value`` (the sample's identity, read back exactly)."""
    buffer = io.BytesIO()
    Image.new("RGB", (4, 4), (value, 255 - value, 7)).save(buffer, format="PNG")
    return buffer.getvalue()


def caption_of(sample: int) -> str:
    return CAPTIONS[sample % 10] + f" #{sample}"


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    """A 3-shard set (samples 0..29) and a saved dataset (samples 100..117): each sample's image
    and caption name it. Shard 1 has one sample without a caption (left out while indexing)."""
    root = tmp_path_factory.mktemp("mixture")
    (root / "shards").mkdir()
    for shard in range(3):
        with webdataset.TarWriter(str(root / "shards" / f"{shard:05d}.tar")) as writer:
            for sample in range(shard * 10, shard * 10 + 10):
                writer.write({"__key__": f"{sample:09d}", "png": png(sample), "txt": caption_of(sample)})
            if shard == 1:
                writer.write({"__key__": "000000999", "png": png(99)})
    rows = range(100, 100 + HF_ROWS)
    table = datasets.Dataset.from_dict({"image": [{"bytes": png(s), "path": None} for s in rows],
                                        "text": [caption_of(s) for s in rows]})
    table.cast_column("image", datasets.Image()).save_to_disk(str(root / "hf"))
    return [str(root / "shards" / "{00000..00002}.tar"), str(root / "hf")]


def identity(image: torch.Tensor) -> int:
    """The sample a decoded, untransformed image names (its red channel)."""
    return int(round(float(image[0, 0, 0]) * 255))


def test_a_mixture_reads_each_source_and_says_what_it_holds(sources, tmp_path):
    mixture = training_mixture("pairs", DataConfig(pairs=sources, index_cache=str(tmp_path)))
    assert mixture.sizes == [SHARD_SAMPLES, HF_ROWS]
    summary = mixture.summary()
    assert summary.splitlines()[0] == f"{SHARD_SAMPLES + HF_ROWS} samples in 2 source(s); skipped while indexing: no_caption_member 1"
    assert sources[0] in summary and sources[1] in summary
    truth = list(range(SHARD_SAMPLES)) + list(range(100, 100 + HF_ROWS))
    for index in (0, 17, 29, 30, 47):
        assert mixture.captions_of(index) == [caption_of(truth[index])]
        assert np.asarray(mixture.load(index))[0, 0, 0] == truth[index]
        assert mixture.source_of(index) == sources[index >= SHARD_SAMPLES]
    images_only = training_mixture("images", DataConfig(images=sources, index_cache=str(tmp_path)))
    assert images_only.sizes == [SHARD_SAMPLES + 1, HF_ROWS]  # the caption-less sample has an image


def test_every_reader_is_a_part(sources, tmp_path):
    """One part of each reader, read by its spec as training reads it: each is a `Part`, named by
    its spec from the start, and says which sample it means in messages."""
    (tmp_path / "folder").mkdir()
    (tmp_path / "folder" / "a.png").write_bytes(png(5))
    (tmp_path / "pairs.csv").write_text("filepath,title\nfolder/a.png,five\n")
    (tmp_path / "captions.txt").write_text("five\nsix\n")
    data = DataConfig(index_cache=str(tmp_path))
    read = {(str(tmp_path / "folder"), "images"): str(tmp_path / "folder" / "a.png"),
            (str(tmp_path / "pairs.csv"), "pairs"): str(tmp_path / "folder" / "a.png"),
            (str(tmp_path / "captions.txt"), "captions"): f"{tmp_path / 'captions.txt'} #0",
            (sources[0], "pairs"): f"00000.tar/000000000 of {sources[0]}",
            (sources[1], "pairs"): f"hf/0 of {sources[1]}",
            ("demo:digits", "images"): "demo:digits #0"}
    parts = []
    for (spec, kind), first in read.items():
        part = read_part(spec, kind, data, key="data.x")
        assert isinstance(part, Part), type(part)
        assert part.spec == spec and len(part) > 0 and part.describe(0) == first and part.summary()
        parts.append(part)
    assert {type(part).__name__ for part in parts} == {"ImageSource", "PairSource", "CaptionList", "ShardSet",
                                                       "HFSource"}
    mixture = Mixture(parts)
    assert [mixture.describe(start) for start in mixture.starts] == list(read.values())
    assert not isinstance(TextTable(["five"]), Part)  # the check fails for what is not a reader


def test_stage_one_reads_half_of_a_pairs_file(tmp_path):
    (tmp_path / "a.png").write_bytes(png(5))
    (tmp_path / "b.png").write_bytes(png(6))
    (tmp_path / "pairs.csv").write_text("filepath,title\na.png,five\nb.png,six\na.png,cinq\n")
    images = training_mixture("images", DataConfig(images=[str(tmp_path / "pairs.csv")]))
    assert len(images) == 2 and np.asarray(images.load(1))[0, 0, 0] == 6
    captions = training_mixture("captions", DataConfig(captions=[str(tmp_path / "pairs.csv")]))
    assert captions.captions_of(0) == ["five", "cinq"] and captions.captions_of(1) == ["six"]


def test_retrieval_sets_from_shards_and_datasets(sources, tmp_path):
    from tinyclip_ds.data.mixture import retrieval_pairs
    from tinyclip_ds.eval.evaluator import check_images

    for spec, first in ((sources[0], 0), (sources[1], 100)):
        images, captions, text_to_image = retrieval_pairs(spec, "", DataConfig(index_cache=str(tmp_path)))
        assert captions[0] == caption_of(first) and text_to_image == list(range(len(images)))
        assert np.asarray(images.load(0))[0, 0, 0] == first
        check_images(images, "eval.data")  # every image decodes
    broken = tmp_path / "broken"
    (broken / "shards").mkdir(parents=True)
    with webdataset.TarWriter(str(broken / "shards" / "00000.tar")) as writer:
        writer.write({"__key__": "000000001", "png": png(1), "txt": "one"})
        writer.write({"__key__": "000000002", "png": b"not a png", "txt": "two"})
        writer.write({"__key__": "000000003", "png": png(3), "txt": " "})
    with pytest.raises(RecipeError, match=r"'eval.data': sample 00000.tar/000000003 of .* has no usable caption \(empty_caption\)"):
        retrieval_pairs(str(broken / "shards"), "", DataConfig(index_cache=str(tmp_path)))
    with webdataset.TarWriter(str(broken / "shards" / "00000.tar")) as writer:
        writer.write({"__key__": "000000001", "png": png(1), "txt": "one"})
        writer.write({"__key__": "000000002", "png": b"not a png", "txt": "two"})
    images, _, _ = retrieval_pairs(str(broken / "shards"), "", DataConfig(index_cache=str(tmp_path)))
    with pytest.raises(RecipeError, match=r"evaluation image 00000.tar/000000002 of .* cannot be used \(not_an_image\)"):
        check_images(images, "eval.data")


def test_weights_must_match_the_sources(sources, tmp_path):
    with pytest.raises(RecipeError, match="'data.weights' has 1 weights for the 2 sources of 'data.pairs'"):
        training_mixture("pairs", DataConfig(pairs=sources, weights=[1.0], index_cache=str(tmp_path)))


@pytest.mark.parametrize("workers", [0, 2])
def test_two_ranks_draw_exactly_the_global_order(sources, tmp_path, workers):
    """Every rank x worker draws its slice of the weighted global order, sample by sample (by the
    identity each image and caption carries), across an epoch boundary."""
    mixture = training_mixture("pairs", DataConfig(pairs=sources, weights=[1, 3], index_cache=str(tmp_path)))
    truth = list(range(SHARD_SAMPLES)) + list(range(100, 100 + HF_ROWS))
    to_tensor = eval_transform(4, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0))
    dataset = PairDataset(mixture, to_tensor, lambda texts: torch.tensor([[ord(c) for c in texts[0].ljust(40)]]))
    order = GlobalOrder(mixture.sizes, seed=11, weights=[1, 3])
    micro, world, accumulation, steps = 4, 2, 2, 4  # global batch 16; an epoch of 48 is 3 steps
    drawn: dict[int, list] = {}
    for rank in range(world):
        sampler = GlobalBatchSampler(order, micro, accumulation, world, rank)
        batches = iter(train_loader(dataset, sampler, num_workers=workers))
        drawn[rank] = [next(batches) for _ in range(steps * accumulation)]
    for step in range(steps):
        epoch, start = divmod(step * 16, order.epoch_length)
        expected = order.indices(epoch, start, start + 16).tolist()
        got = [drawn[r][step * accumulation + m] for m in range(accumulation) for r in range(world)]
        indices = [i for batch in got for i in batch["index"].tolist()]
        assert indices == expected, step
        images = [identity(image) for batch in got for image in batch["image"]]
        texts = ["".join(map(chr, text.tolist())).strip() for batch in got for text in batch["text"]]
        assert images == [truth[i] for i in expected]
        assert texts == [caption_of(truth[i]) for i in expected]
    hf_share = np.mean([i >= SHARD_SAMPLES for i in order.indices(0, 0, order.epoch_length)])
    assert hf_share == 0.75  # weights 1 : 3


def test_text_stage_reads_captions_of_both_sources(sources, tmp_path):
    mixture = training_mixture("captions", DataConfig(captions=sources, index_cache=str(tmp_path)))
    dataset = TextDataset(mixture, lambda texts: torch.tensor([[len(texts[0])]]))
    assert int(dataset[(31, 0)]["text"][0]) == len(caption_of(101))


K = 2


def samples_by_step(run_dir) -> dict[int, list[int]]:
    lines = (run_dir / "samples.jsonl").read_text().splitlines()
    return {record["step"]: record["samples"] for record in map(json.loads, lines)}


def test_resume_on_one_rank_draws_what_two_ranks_would_have(sources, tmp_path):
    """stage 1 text on the mixture, 2 ranks x 2 workers, checkpoint at step K; resumed on 1 rank
    from it: steps K+1..2K draw the same samples, which are the global order's."""
    common = ["--set", f"data.captions={json.dumps(sources)}", "--set", "data.weights=[2, 1]",
              "--set", f"data.index_cache={tmp_path / 'index'}", "--set", "data.num_workers=2",
              "--set", "train.micro_batch=4", "--set", "train.global_batch=8", "--set", "train.accumulation=0",
              "--set", f"train.steps={2 * K}", "--set", "train.log_samples=true", "--set", "train.log_every=1",
              "--set", "eval.every=0", "--set", "eval.data=", "--set", "eval.zeroshot=",
              "--set", f"checkpoint.every={K}", "--set", "checkpoint.keep_last=0", "--set", "seed=3"]
    reference, resumed = tmp_path / "uninterrupted", tmp_path / "resumed"
    result = launch("stage1_text", *common, "--set", f"run_dir={reference}", ranks=2)
    assert "48 samples in 2 source(s)" in result.stdout
    checkpoint = reference / "checkpoints" / f"step_{K:08d}"
    launch("stage1_text", *common, "--set", f"run_dir={resumed}", "--resume", str(checkpoint), ranks=1)
    changed = launch("stage1_text", *common, "--set", "data.weights=[1, 1]", "--set", f"run_dir={tmp_path / 'changed'}",
                     "--resume", str(checkpoint), ranks=1, check=False)
    assert changed.returncode == 2
    assert "the training data changed since the checkpoint" in changed.stdout + changed.stderr
    reseeded = launch("stage1_text", *common, "--set", "seed=4", "--set", f"run_dir={tmp_path / 'reseeded'}",
                      "--resume", str(checkpoint), ranks=1, check=False)
    assert reseeded.returncode == 2
    assert "and seed 3, now" in reseeded.stdout + reseeded.stderr
    expected, got = samples_by_step(reference), samples_by_step(resumed)
    assert sorted(got) == list(range(K + 1, 2 * K + 1))
    for step in got:
        assert got[step] == expected[step], step
    order = GlobalOrder([SHARD_SAMPLES, HF_ROWS], seed=3, weights=[2, 1])
    for step in range(1, 2 * K + 1):  # step s draws positions 8(s-1) .. 8s-1 of epoch 0 (of 48)
        assert expected[step] == order.indices(0, 8 * (step - 1), 8 * step).tolist(), step
