"""Contrastive-correct large batches under DeepSpeed.

Contrastive and affinity losses improve with more negatives, but plain gradient accumulation
only lets each micro-batch see itself. Here every optimizer step sees all
``micro × accumulation × world`` samples at once, with the gradient of one batch of that size:

1. **Cache.** Each micro-batch's student and teacher features are computed without grad
   (teacher: once per sample, ever) and kept; the RNG state before each micro-batch is saved.
2. **Loss on features.** The cached local features become leaf tensors, are gathered across
   ranks *with gradient* (`gather_with_grad`), and each rank computes the loss rows of its own
   samples against all columns (the local-loss formulation: Σ_ranks = the full-batch loss).
   One backward through the loss alone gives ∂L/∂feature for every local feature (the gather's
   backward sums the contributions of all ranks) and ∂L/∂logit_scale.
3. **Recompute.** Each micro-batch is run again with grad under its saved RNG state, and
   ``engine.backward`` gets the surrogate ⟨features, ∂L/∂features⟩, whose parameter gradient
   is exactly that micro-batch's share of the full-batch gradient (GradCache).

DeepSpeed's ``engine.backward`` divides by the accumulation steps and averages over ranks;
`backward_scale` states the factor that undoes both for a full-batch loss. ``plain`` mode
(each micro-batch contrasted with itself only, gathered over ranks) stays for comparison.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace

import torch
import torch.distributed as dist
from torch import Tensor

from tinyclip_ds.eval.gather import all_gather_uneven


@dataclass
class Features:
    """One tower pair's outputs for a batch: pooled embeddings and, for FILIP, token features."""

    image: Tensor  # (B, E)
    text: Tensor  # (B, E)
    image_tokens: Tensor | None = None  # (B, Ni, E)
    text_tokens: Tensor | None = None  # (B, Nt, E)
    text_mask: Tensor | None = None  # (B, Nt) bool, True for real tokens

    def tensors(self) -> dict[str, Tensor]:
        return {f.name: getattr(self, f.name) for f in fields(self) if getattr(self, f.name) is not None}

    def map(self, fn) -> "Features":
        return replace(self, **{name: fn(value) for name, value in self.tensors().items()})

    @staticmethod
    def cat(parts: list["Features"]) -> "Features":
        names = parts[0].tensors()
        return replace(parts[0], **{name: torch.cat([getattr(p, name) for p in parts]) for name in names})


class _GatherWithGrad(torch.autograd.Function):
    """all_gather whose backward sums every rank's gradient for each rank's rows.

    Written with all_gather + all_reduce (rather than reduce_scatter) so it works on gloo too.
    Ranks may hold different numbers of rows.
    """

    @staticmethod
    def forward(ctx, local: Tensor) -> Tensor:
        parts = all_gather_uneven(local)
        ctx.sizes = [len(part) for part in parts]
        ctx.rank = dist.get_rank()
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        grad = grad.contiguous()
        dist.all_reduce(grad)
        start = sum(ctx.sizes[:ctx.rank])
        return grad[start:start + ctx.sizes[ctx.rank]]


def gather_with_grad(local: Tensor) -> Tensor:
    """Concatenate every rank's rows (rank order); gradients flow back to their owners."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return local
    return _GatherWithGrad.apply(local)


def local_rows(local_count: int, device: torch.device) -> Tensor:
    """Positions of this rank's rows in the gathered (rank-ordered) batch."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return torch.arange(local_count, device=device)
    sizes = [torch.zeros(1, dtype=torch.long, device=device) for _ in range(dist.get_world_size())]
    dist.all_gather(sizes, torch.tensor([local_count], device=device))
    start = sum(int(s.item()) for s in sizes[:dist.get_rank()])
    return torch.arange(start, start + local_count, device=device)


def backward_scale(world: int) -> float:
    """Factor on a rank's share of a full-batch loss before ``engine.backward(...,
    scale_wrt_gas=False)``: DeepSpeed averages gradients over ranks, but the full-batch
    gradient is the *sum* of the ranks' shares."""
    return float(world)
