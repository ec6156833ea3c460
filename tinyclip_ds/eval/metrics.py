"""Retrieval and zero-shot metrics, computed once on the full (gathered) embedding set.

Every metric is a function of the embeddings alone: ranks come from exact comparisons of fp32
cosines with ties broken by candidate index, and the row chunks that bound memory depend only
on the tensor shapes. The same embeddings therefore give bit-identical numbers however they
were batched, sharded or gathered.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import Tensor

from tinyclip_ds.progress import progress

# Elements of one (rows × candidates) score chunk: 4M fp32 = 16 MiB, plus a few masks of the
# same shape. A COCO 5k × 25k evaluation runs in ~30 chunks of ~160 rows.
CHUNK_ELEMENTS = 1 << 22

RECALL_KS = (1, 5, 10)


def _row_chunks(rows: int, cols: int) -> Iterator[slice]:
    """Slices over `rows` sized so a (chunk × cols) matrix holds at most CHUNK_ELEMENTS."""
    step = max(1, CHUNK_ELEMENTS // max(cols, 1))
    for start in range(0, rows, step):
        yield slice(start, min(start + step, rows))


def _normalized(emb: Tensor) -> Tensor:
    return F.normalize(emb.detach().float(), dim=-1)


def _best_positive_rank(scores: Tensor, positive: Tensor) -> Tensor:
    """0-based rank of each row's best positive among all candidates of that row.

    scores (R, N) fp32, positive (R, N) bool with at least one True per row. The best positive
    is the highest-scoring one (lowest index among equal scores); its rank is the number of
    candidates scoring strictly higher plus the lower-indexed candidates scoring equal. This
    is the position it takes in a stable descending sort, so rank < K means "hit at K".
    """
    best = scores.masked_fill(~positive, float("-inf")).amax(dim=1, keepdim=True)
    # argmax returns the first maximal position: the lowest-indexed positive with the best score
    equal = scores == best
    best_index = (positive & equal).int().argmax(dim=1, keepdim=True)
    index = torch.arange(scores.shape[1], device=scores.device)
    ties_before = equal & (index < best_index)
    return (scores > best).sum(dim=1) + ties_before.sum(dim=1)


def _recalls(ranks: Tensor, prefix: str) -> dict[str, float]:
    return {f"{prefix}_R@{k}": (ranks < k).sum().item() / ranks.numel() for k in RECALL_KS}


def retrieval_metrics(image_emb: Tensor, text_emb: Tensor, text_to_image: Tensor) -> dict[str, float]:
    """Image↔text retrieval recalls and cosine statistics on the full evaluation set.

    image_emb (I, E), text_emb (T, E): embeddings, normalised here. text_to_image (T,) long:
    the image each text describes; an image may have several texts (5 in COCO), and every
    image needs at least one. Scores are fp32 cosines.

    - i2t_R@K: fraction of images with any of their texts among the top K of all T texts.
    - t2i_R@K: fraction of texts whose image is among the top K of all I images.
    - mean_recall: mean of the six recalls.
    - mean_score: mean cosine of the T matching (image, text) pairs (a smooth score that moves
      before the recalls do).
    - offdiag_mean, offdiag_std: mean and population std of the I·T − T non-matching cosines.
    - score_gap: mean_score − offdiag_mean.
    Ties rank the lower-indexed candidate first.
    """
    if image_emb.ndim != 2 or text_emb.ndim != 2 or image_emb.shape[1] != text_emb.shape[1]:
        raise ValueError(f"expected image (I, E) and text (T, E) embeddings, got "
                         f"{tuple(image_emb.shape)} and {tuple(text_emb.shape)}")
    n_images, n_texts = image_emb.shape[0], text_emb.shape[0]
    if text_to_image.shape != (n_texts,):
        raise ValueError(f"text_to_image must have shape ({n_texts},), got {tuple(text_to_image.shape)}")
    if n_texts == 0:
        raise ValueError("retrieval needs at least one image and one text")
    text_to_image = text_to_image.to(device=image_emb.device, dtype=torch.long)
    if text_to_image.min() < 0 or text_to_image.max() >= n_images:
        raise ValueError(f"text_to_image holds image indices outside [0, {n_images})")
    without_text = (torch.bincount(text_to_image, minlength=n_images) == 0).nonzero().flatten()
    if without_text.numel():
        raise ValueError(f"every image needs at least one text; images {without_text[:5].tolist()} "
                         "have none (drop them from the evaluation set)")
    images, texts = _normalized(image_emb), _normalized(text_emb.to(image_emb.device))

    i2t_ranks, positive_sum, negative_sum, negative_sq_sum = [], 0.0, 0.0, 0.0
    for rows in _row_chunks(n_images, n_texts):
        scores = images[rows] @ texts.T
        image_index = torch.arange(rows.start, rows.stop, device=scores.device)
        positive = text_to_image[None, :] == image_index[:, None]
        i2t_ranks.append(_best_positive_rank(scores, positive))
        # fp64 sums: the totals run over up to 10^8 cosines
        positive_sum += scores[positive].sum(dtype=torch.float64).item()
        negative = scores.masked_fill(positive, 0.0)
        negative_sum += negative.sum(dtype=torch.float64).item()
        negative_sq_sum += negative.square().sum(dtype=torch.float64).item()

    t2i_ranks = []
    for rows in _row_chunks(n_texts, n_images):
        scores = texts[rows] @ images.T
        positive = F.one_hot(text_to_image[rows], n_images).bool()
        t2i_ranks.append(_best_positive_rank(scores, positive))

    metrics = {**_recalls(torch.cat(i2t_ranks), "i2t"), **_recalls(torch.cat(t2i_ranks), "t2i")}
    metrics["mean_recall"] = sum(metrics.values()) / len(metrics)
    metrics["mean_score"] = positive_sum / n_texts
    n_negative = n_images * n_texts - n_texts
    if n_negative:
        metrics["offdiag_mean"] = negative_sum / n_negative
        variance = negative_sq_sum / n_negative - metrics["offdiag_mean"] ** 2
        metrics["offdiag_std"] = max(variance, 0.0) ** 0.5
    else:  # a single image: every pair matches
        metrics["offdiag_mean"] = metrics["offdiag_std"] = float("nan")
    metrics["score_gap"] = metrics["mean_score"] - metrics["offdiag_mean"]
    return metrics


def zeroshot_accuracy(image_emb: Tensor, labels: Tensor, class_emb: Tensor) -> dict[str, float]:
    """Zero-shot classification accuracy: each image is assigned its most similar class embedding.

    image_emb (N, E), labels (N,) long in [0, C), class_emb (C, E); both embeddings are
    normalised here. Returns zeroshot_top1 and, when C ≥ 5, zeroshot_top5 (fractions). Ties
    rank the lower class index first.
    """
    n_images, n_classes = image_emb.shape[0], class_emb.shape[0]
    if labels.shape != (n_images,):
        raise ValueError(f"labels must have shape ({n_images},), got {tuple(labels.shape)}")
    labels = labels.to(device=image_emb.device, dtype=torch.long)
    if n_images == 0 or labels.min() < 0 or labels.max() >= n_classes:
        raise ValueError(f"zero-shot needs at least one image and labels in [0, {n_classes})")
    images, classes = _normalized(image_emb), _normalized(class_emb.to(image_emb.device))
    ranks = torch.cat([
        _best_positive_rank(images[rows] @ classes.T, F.one_hot(labels[rows], n_classes).bool())
        for rows in _row_chunks(n_images, n_classes)
    ])
    metrics = {"zeroshot_top1": (ranks < 1).sum().item() / n_images}
    if n_classes >= 5:
        metrics["zeroshot_top5"] = (ranks < 5).sum().item() / n_images
    return metrics


@torch.no_grad()
def class_embeddings(encode_text: Callable[[Tensor], Tensor], tokenizer: Callable[[list[str]], Tensor],
                     classnames: list[str], templates: list[str], batch_size: int) -> Tensor:
    """Prompt-ensemble class embeddings (C, E), normalised.

    Each class c gets normalize(mean_t normalize(encode_text(tokenizer(template_t.format(c))))),
    the CLIP prompt ensemble. Templates contain one `{}`. Prompts are encoded batch_size at a
    time; encode_text receives the tokenizer's ids as they are and must move them to its device.
    """
    if not classnames or not templates:
        raise ValueError("class_embeddings needs at least one class name and one template")
    if batch_size < 1:
        raise ValueError(f"batch_size must be ≥ 1, got {batch_size}")
    prompts = [template.format(name) for name in classnames for template in templates]
    embeddings = torch.cat([
        _normalized(encode_text(tokenizer(prompts[start:start + batch_size])))
        for start in progress(range(0, len(prompts), batch_size), desc="zero-shot class prompts", unit="batch")
    ])
    per_class = embeddings.view(len(classnames), len(templates), -1).mean(dim=1)
    return F.normalize(per_class, dim=-1)
