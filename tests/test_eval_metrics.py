"""Evaluation metrics against brute-force loops, and exactness across ranks and batch sizes."""

from __future__ import annotations

import math
import random
import statistics
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import Tensor, nn
from torch.utils.data import DistributedSampler

from tinyclip_ds.eval import metrics
from tinyclip_ds.eval.gather import gather_by_index
from tinyclip_ds.eval.metrics import class_embeddings, retrieval_metrics, zeroshot_accuracy


# ---------------------------------------------------------------------------------------------
# Brute force: Python floats and explicit loops, ranks from a full sort by (-score, index).

def _unit(v: list[float]) -> list[float]:
    norm = math.sqrt(sum(x * x for x in v))
    return [x / norm for x in v]


def _cosines(a: Tensor, b: Tensor) -> list[list[float]]:
    rows, cols = [_unit(r) for r in a.tolist()], [_unit(c) for c in b.tolist()]
    return [[sum(x * y for x, y in zip(r, c)) for c in cols] for r in rows]


def _sorted_candidates(scores: list[float]) -> list[int]:
    return sorted(range(len(scores)), key=lambda j: (-scores[j], j))


def brute_retrieval(images: Tensor, texts: Tensor, text_to_image: list[int]) -> dict[str, float]:
    scores = _cosines(images, texts)
    n_images, n_texts = len(scores), len(text_to_image)
    result = {}
    for k in (1, 5, 10):
        hits = 0
        for i in range(n_images):
            top = _sorted_candidates(scores[i])[:k]
            hits += any(text_to_image[t] == i for t in top)
        result[f"i2t_R@{k}"] = hits / n_images
    for k in (1, 5, 10):
        hits = 0
        for t in range(n_texts):
            column = [scores[i][t] for i in range(n_images)]
            hits += text_to_image[t] in _sorted_candidates(column)[:k]
        result[f"t2i_R@{k}"] = hits / n_texts
    result["mean_recall"] = sum(result.values()) / 6
    matching = [scores[text_to_image[t]][t] for t in range(n_texts)]
    others = [scores[i][t] for i in range(n_images) for t in range(n_texts) if text_to_image[t] != i]
    result["mean_score"] = sum(matching) / len(matching)
    result["offdiag_mean"] = sum(others) / len(others)
    result["offdiag_std"] = statistics.pstdev(others)
    result["score_gap"] = result["mean_score"] - result["offdiag_mean"]
    return result


def brute_zeroshot(images: Tensor, labels: list[int], classes: Tensor) -> dict[str, float]:
    scores = _cosines(images, classes)
    top1 = sum(_sorted_candidates(s)[0] == y for s, y in zip(scores, labels))
    result = {"zeroshot_top1": top1 / len(labels)}
    if classes.shape[0] >= 5:
        top5 = sum(y in _sorted_candidates(s)[:5] for s, y in zip(scores, labels))
        result["zeroshot_top5"] = top5 / len(labels)
    return result


# ---------------------------------------------------------------------------------------------
# Inputs

def tie_rich(n: int, generator: torch.Generator) -> Tensor:
    """Rows with four ±0.5 entries out of 8 (unit norm exactly), each scaled by a power of two.

    Every cosine is then an exact multiple of 1/4 in fp32 and in Python, so ties are real ties
    in both computations, and there are many of them.
    """
    rows = torch.zeros(n, 8)
    for r in range(n):
        columns = torch.randperm(8, generator=generator)[:4]
        signs = torch.randint(0, 2, (4,), generator=generator).float() * 2 - 1
        rows[r, columns] = 0.5 * signs
    scales = 2.0 ** torch.randint(-2, 3, (n, 1), generator=generator).float()
    return rows * scales


def texts_per_image(n_images: int, seed: int) -> list[int]:
    """text → image map with 1–5 texts per image, shuffled so an image's texts are not adjacent."""
    rng = random.Random(seed)
    owners = [i for i in range(n_images) for _ in range(rng.randint(1, 5))]
    rng.shuffle(owners)
    return owners


@pytest.fixture(params=[metrics.CHUNK_ELEMENTS, 5, 40], ids=["one_chunk", "row_chunks", "few_rows"])
def chunk_elements(request, monkeypatch) -> int:
    monkeypatch.setattr(metrics, "CHUNK_ELEMENTS", request.param)
    return request.param


# ---------------------------------------------------------------------------------------------
# Metrics against brute force

def test_retrieval_matches_brute_force_with_ties(chunk_elements: int) -> None:
    g = torch.Generator().manual_seed(0)
    owners = texts_per_image(14, seed=1)
    images = tie_rich(14, g)
    images[5] = images[2] * 2  # an image identical to another one in direction
    texts = tie_rich(len(owners), g)
    texts[7] = texts[3]
    texts[9] = images[owners[9]]  # a perfect match, tied with any duplicate of that image
    got = retrieval_metrics(images, texts, torch.tensor(owners))
    want = brute_retrieval(images, texts, owners)
    assert got.keys() == want.keys()
    for key in want:
        if "R@" in key or key in ("mean_recall", "mean_score", "offdiag_mean"):
            assert got[key] == want[key], key  # counts and sums of multiples of 1/4: exact
        else:
            assert got[key] == pytest.approx(want[key], abs=1e-12), key


def test_retrieval_matches_brute_force_random(chunk_elements: int) -> None:
    g = torch.Generator().manual_seed(2)
    owners = texts_per_image(25, seed=3)
    images = torch.randn(25, 16, generator=g) * 3
    texts = images[torch.tensor(owners)] + torch.randn(len(owners), 16, generator=g) * 6
    got = retrieval_metrics(images, texts, torch.tensor(owners))
    want = brute_retrieval(images, texts, owners)
    assert 0 < got["i2t_R@1"] < got["i2t_R@10"] < 1  # a non-degenerate case
    for key in want:
        # counts are exact: these inputs' smallest top-k margins (1.6e-4) dwarf fp32 rounding
        tolerance = 0 if ("R@" in key or key == "mean_recall") else 1e-5
        assert got[key] == pytest.approx(want[key], abs=tolerance), key


def test_retrieval_one_text_per_image_ranks_of_the_diagonal() -> None:
    g = torch.Generator().manual_seed(4)
    images = tie_rich(12, g)
    texts = tie_rich(12, g)
    owners = list(range(12))
    assert retrieval_metrics(images, texts, torch.tensor(owners)) == pytest.approx(
        brute_retrieval(images, texts, owners), abs=1e-12)


@pytest.mark.parametrize("n_classes", [3, 7])
def test_zeroshot_matches_brute_force(chunk_elements: int, n_classes: int) -> None:
    g = torch.Generator().manual_seed(5)
    classes = tie_rich(n_classes, g)
    labels = torch.randint(0, n_classes, (40,), generator=g)
    images = tie_rich(40, g)
    images[:10] = classes[labels[:10]] * 4  # some images exactly on their class direction
    got = zeroshot_accuracy(images, labels, classes)
    assert got == brute_zeroshot(images, labels.tolist(), classes)
    assert ("zeroshot_top5" in got) == (n_classes >= 5)


def test_metrics_reject_bad_inputs() -> None:
    emb = torch.randn(3, 4)
    with pytest.raises(ValueError, match="at least one text"):
        retrieval_metrics(emb, torch.randn(2, 4), torch.tensor([0, 0]))
    with pytest.raises(ValueError, match="outside"):
        retrieval_metrics(emb, torch.randn(2, 4), torch.tensor([0, 3]))
    with pytest.raises(ValueError, match="labels"):
        zeroshot_accuracy(emb, torch.tensor([0, 1, 5]), torch.randn(5, 4))


# ---------------------------------------------------------------------------------------------
# Prompt ensemble

def char_tokenizer(prompts: list[str]) -> Tensor:
    return torch.tensor([[ord(c) % 50 for c in p.ljust(32)[:32]] for p in prompts])


class BagOfTokens(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(6)
        self.embed = nn.Embedding(50, 12)
        self.proj = nn.Linear(12, 6)

    def forward(self, ids: Tensor) -> Tensor:
        return self.proj(self.embed(ids).mean(dim=1)) * 3  # deliberately not unit norm


@pytest.mark.parametrize("batch_size", [1, 4, 100])
def test_class_embeddings_is_the_normalised_mean_of_normalised_prompts(batch_size: int) -> None:
    encoder = BagOfTokens()
    classnames = ["cat", "dog", "tree frog"]
    templates = ["a photo of a {}.", "{}", "a drawing of the {}"]
    got = class_embeddings(encoder, char_tokenizer, classnames, templates, batch_size)
    assert got.shape == (3, 6)
    for c, name in enumerate(classnames):
        total = [0.0] * 6
        for template in templates:
            one = encoder(char_tokenizer([template.replace("{}", name)]))[0].tolist()
            total = [a + b for a, b in zip(total, _unit(one))]
        assert got[c].tolist() == pytest.approx(_unit([x / len(templates) for x in total]), abs=1e-6)


# ---------------------------------------------------------------------------------------------
# Gathering

def test_gather_single_process_orders_dedups_and_reports_missing() -> None:
    rows = torch.arange(12.0).view(6, 2)
    got = gather_by_index(rows, torch.tensor([4, 0, 2, 1, 3, 0]), total=5)
    # index 0 arrives twice (rows 1 and 5): the first copy is kept
    assert torch.equal(got, rows[[1, 3, 2, 4, 0]])
    with pytest.raises(ValueError, match=r"1 of 6 samples.*\[5\]"):
        gather_by_index(rows, torch.tensor([4, 0, 2, 1, 3, 0]), total=6)
    with pytest.raises(ValueError, match=r"\[0, 3\)"):
        gather_by_index(rows, torch.tensor([4, 0, 2, 1, 3, 0]), total=3)
    with pytest.raises(ValueError, match="shape"):
        gather_by_index(rows, torch.tensor([0, 1]), total=2)


class RowwiseEncoder(nn.Module):
    """Sample id → embedding with few distinct values (so scores tie).

    Only a row lookup and an elementwise product: each output is exactly rounded whatever the
    batch. A matmul or a transcendental could legitimately change in the last bit with the
    batch shape (different kernels or vectorised tails), which is a property of the model,
    not of the metrics tested here.
    """

    def __init__(self, n: int, dim: int, levels: int, seed: int) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.table = nn.Parameter(torch.randint(-levels, levels + 1, (n, dim), generator=g).float())
        self.scale = nn.Parameter(torch.rand(dim, generator=g) + 0.5)

    def forward(self, ids: Tensor) -> Tensor:
        return self.table[ids] * self.scale


def eval_set(n_images: int) -> tuple[list[int], Tensor, RowwiseEncoder, RowwiseEncoder, Tensor]:
    """text → image map, zero-shot labels, image and text encoders, class embeddings."""
    owners = texts_per_image(n_images, seed=n_images)
    labels = torch.arange(n_images) % 6
    image_encoder = RowwiseEncoder(n_images, 4, levels=1, seed=10)
    text_encoder = RowwiseEncoder(len(owners), 4, levels=1, seed=11)
    classes = RowwiseEncoder(6, 4, levels=2, seed=12)(torch.arange(6))
    return owners, labels, image_encoder, text_encoder, classes.detach()


@torch.no_grad()
def embed(encoder: nn.Module, indices: list[int], batch_size: int) -> Tensor:
    batches = [torch.tensor(indices[s:s + batch_size]) for s in range(0, len(indices), batch_size)]
    return torch.cat([encoder(b) for b in batches])


def evaluate(images: Tensor, texts: Tensor, n_images: int) -> dict[str, float]:
    owners, labels, _, _, classes = eval_set(n_images)
    return {**retrieval_metrics(images, texts, torch.tensor(owners)),
            **zeroshot_accuracy(images, labels, classes)}


def shard(n: int, rank: int, world: int, padded: bool) -> list[int]:
    if padded:  # a shuffling sampler that pads the shards to equal length with repeats
        return list(DistributedSampler(range(n), num_replicas=world, rank=rank, shuffle=True, seed=3))
    return list(range(rank, n, world))  # strided, unpadded


CASES = [(40, False), (37, False), (37, True)]  # (images, padded sampler)


def distributed_worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        batch_size = (7, 64)[rank]
        results = []
        for n_images, padded in CASES:
            owners, _, image_encoder, text_encoder, _ = eval_set(n_images)
            image_ids = shard(n_images, rank, world, padded)
            text_ids = shard(len(owners), rank, world, padded)
            images = gather_by_index(embed(image_encoder, image_ids, batch_size),
                                     torch.tensor(image_ids), n_images)
            texts = gather_by_index(embed(text_encoder, text_ids, batch_size),
                                    torch.tensor(text_ids), len(owners))
            results.append((images, texts, evaluate(images, texts, n_images)))
        # one sample, two ranks: rank 1 holds nothing
        lonely = gather_by_index(torch.full((1 - rank, 3), 5.0), torch.zeros(1 - rank, dtype=torch.long), 1)
        torch.save({"results": results, "lonely": lonely}, Path(out_dir) / f"rank{rank}.pt")
        try:
            gather_by_index(torch.ones(1, 3), torch.tensor([rank]), 3)  # no rank holds sample 2
        except ValueError as error:
            torch.save(str(error), Path(out_dir) / f"error{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_two_ranks_with_different_batch_sizes_match_one_process_exactly(tmp_path: Path) -> None:
    assert len(shard(37, 0, 2, padded=True) + shard(37, 1, 2, padded=True)) == 38  # one repeat
    mp.spawn(distributed_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    for rank in range(2):
        saved = torch.load(tmp_path / f"rank{rank}.pt")
        for (n_images, _), (images, texts, got) in zip(CASES, saved["results"]):
            owners, _, image_encoder, text_encoder, _ = eval_set(n_images)
            full_images = embed(image_encoder, list(range(n_images)), n_images)
            full_texts = embed(text_encoder, list(range(len(owners))), len(owners))
            assert torch.equal(images, full_images) and torch.equal(texts, full_texts)
            assert got == evaluate(full_images, full_texts, n_images)
        assert torch.equal(saved["lonely"], torch.full((1, 3), 5.0))
        assert "first missing: [2]" in torch.load(tmp_path / f"error{rank}.pt")
