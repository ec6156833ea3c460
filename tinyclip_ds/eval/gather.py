"""Sharding an evaluation set over ranks and gathering the results back in sample order.

Each rank embeds its share of an evaluation set and tags every row with its sample index;
gather_by_index gives every rank the full set in sample order, so metrics are computed once on
exactly the same tensor whatever the world size and batch size.
"""

from __future__ import annotations

import torch
from torch import Tensor

from tinyclip_ds import distributed


def gather_by_index(local: Tensor, indices: Tensor, total: int) -> Tensor:
    """Every rank's rows, placed by sample index: (n_local, ...) on each rank → (total, ...) on all.

    indices (n_local,) long gives the sample index of each local row. Ranks may hold different
    numbers of rows. An index seen more than once (a sampler that padded its shards) keeps its
    first copy, in rank order then local order; an index in [0, total) that no rank holds is an
    error. Without an initialised process group this is the single-rank case. With NCCL the
    exchange runs on the current CUDA device; the result is on `local`'s device.
    """
    if indices.shape != (local.shape[0],):
        raise ValueError(f"indices must have shape ({local.shape[0]},) to tag each local row, "
                         f"got {tuple(indices.shape)}")
    indices = indices.to(dtype=torch.long)
    if distributed.world() > 1:
        device = distributed.collective_device()
        rows = torch.cat(distributed.gather_uneven(local.detach().to(device))).to(local.device)
        indices = torch.cat(distributed.gather_uneven(indices.to(device))).to(local.device)
    else:
        rows, indices = local.detach(), indices.to(local.device)

    if indices.numel() and (indices.min() < 0 or indices.max() >= total):
        raise ValueError(f"sample indices must lie in [0, {total}); got {indices.min().item()}"
                         f"..{indices.max().item()}")
    # A stable sort keeps equal indices in arrival order, so the first of each run is the first copy.
    sorted_indices, order = torch.sort(indices, stable=True)
    first = torch.ones_like(sorted_indices, dtype=torch.bool)
    first[1:] = sorted_indices[1:] != sorted_indices[:-1]
    kept = sorted_indices[first]
    if kept.numel() != total:
        present = torch.zeros(total, dtype=torch.bool, device=kept.device)
        present[kept] = True
        missing = (~present).nonzero().flatten()
        raise ValueError(f"{missing.numel()} of {total} samples were embedded by no rank "
                         f"(first missing: {missing[:10].tolist()}); every sample index in "
                         f"[0, {total}) must be on some rank")
    return rows[order[first]]
