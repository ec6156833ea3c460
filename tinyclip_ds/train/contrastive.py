"""Contrastive-correct large batches under DeepSpeed: one optimizer step in which every sample
is contrasted with all ``micro × accumulation × world`` samples, with the gradient of one batch
of that size.

Plain gradient accumulation would contrast each micro-batch only with itself, and contrastive
and affinity losses improve with more negatives. With accumulation 1 the step is direct: one
forward with grad, the features gathered over ranks *with gradient*, the loss, one backward.
With accumulation above 1 it is the feature-cache step (GradCache):

1. **Cache.** Each micro-batch's student features are computed without grad (the teacher's
   the caller computed, once per sample), saving the RNG state before each micro-batch.
2. **Loss on features.** The cached local features become leaf tensors, are gathered across
   ranks with gradient, and each rank computes the loss rows of its own samples against all
   columns (the local-loss formulation: the ranks' results sum to the full-batch loss). One
   backward through the loss alone gives ∂L/∂feature for every local feature (the gather's
   backward sums the contributions of all ranks) and ∂L/∂logit_scale.
3. **Recompute.** Each micro-batch runs again with grad under its saved RNG state (same dropout),
   and ``engine.backward`` gets the surrogate ⟨features, ∂L/∂features⟩, whose parameter gradient
   is exactly that micro-batch's share of the full-batch gradient.

Per-sample terms (stage-1 terms kept on in stage 2) come from the recompute's forward and are
averaged over micro-batches as usual. DeepSpeed averages gradients over ranks, while the
full-batch gradient is the *sum* of the ranks' shares: `backward_scale` undoes that.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Callable

import torch
from torch import Tensor

from tinyclip_ds import distributed
from tinyclip_ds.train.rng import rng_state, set_rng_state
from tinyclip_ds.train.engine import engine_step
from tinyclip_ds.train.task import StepResult


@dataclass
class Features:
    """One tower pair's outputs for a batch: pooled embeddings and, for FILIP, token features."""

    image: Tensor  # (B, E)
    text: Tensor  # (B, E)
    image_tokens: Tensor | None = None  # (B, Ni, E)
    text_tokens: Tensor | None = None  # (B, Nt, E)
    text_mask: Tensor | None = None  # (B, Nt) bool, True for real tokens

    def tensors(self) -> dict[str, Tensor]:
        """The fields that are set, by name."""
        return {f.name: getattr(self, f.name) for f in fields(self) if getattr(self, f.name) is not None}

    def map(self, fn: Callable[[Tensor], Tensor]) -> "Features":
        """``fn`` applied to every field that is set."""
        return replace(self, **{name: fn(value) for name, value in self.tensors().items()})

    @staticmethod
    def cat(parts: list["Features"]) -> "Features":
        """The parts' rows concatenated, field by field."""
        names = parts[0].tensors()
        return replace(parts[0], **{name: torch.cat([getattr(p, name) for p in parts]) for name in names})


# forward(m, cache): micro-batch m through the student → (features, logit scale, loss of the
# per-sample terms, those terms). cache=True: features only, for the cache pass (run without grad).
StudentForward = Callable[[int, bool], tuple[Features, Tensor, Tensor, dict[str, Tensor]]]
# objective(student features, teacher features or None, logit scale, this rank's rows) → this
# rank's share of the full-batch loss and of each term (see distill.objectives.Stage2Objective).
BatchObjective = Callable[[Features, Features | None, Tensor, Tensor], tuple[Tensor, dict[str, Tensor]]]


def backward_scale(world: int) -> float:
    """Factor on a rank's share of a full-batch loss before ``engine.backward``: DeepSpeed
    averages gradients over ranks, but the full-batch gradient is the *sum* of the shares."""
    return float(world)


def gather_features(local: Features) -> Features:
    """Every rank's rows in rank order: floating-point fields with gradient, masks without."""
    return local.map(lambda x: distributed.gather_with_grad(x) if x.is_floating_point() else distributed.gather(x))


def contrastive_step(engine, forward: StudentForward, objective: BatchObjective,
                     teacher: list[Features | None], device: torch.device) -> StepResult:
    """One optimizer step over the micro-batches whose teacher features are ``teacher`` (one
    entry per micro-batch; None when the objective needs no teacher): direct for one
    micro-batch, feature cache for several."""
    if len(teacher) == 1:
        return direct_step(engine, forward, objective, teacher[0], device)
    return feature_cache_step(engine, forward, objective, teacher, device)


def direct_step(engine, forward: StudentForward, objective: BatchObjective, teacher: Features | None,
                device: torch.device) -> StepResult:
    """One micro-batch per step: the loss on the gathered features, back-propagated directly."""
    world = distributed.world()
    features, scale, local_loss, local_terms = forward(0, False)
    teacher_all = teacher.map(distributed.gather) if teacher is not None else None
    rows = distributed.local_rows(features.image.shape[0], device)
    loss, terms = objective(gather_features(features), teacher_all, scale, rows)
    engine.backward(backward_scale(world) * loss + local_loss)
    result = StepResult(samples=features.image.shape[0])
    result.finish(engine_step(engine))
    # Logged values are averaged over ranks; the objective's are shares that sum to the full batch.
    result.loss = loss.item() * world + local_loss.item()
    result.terms = {**{name: value.item() * world for name, value in terms.items()},
                    **{name: value.item() for name, value in local_terms.items()}}
    return result


def feature_cache_step(engine, forward: StudentForward, objective: BatchObjective,
                       teacher: list[Features | None], device: torch.device) -> StepResult:
    """Several micro-batches per step, every one contrasted with all of them (module docstring)."""
    world, accumulation = distributed.world(), len(teacher)
    # 1. Cache every micro-batch's features, remembering the RNG state each one started with.
    rng_states, student_parts = [], []
    with torch.no_grad():
        for m in range(accumulation):
            rng_states.append(rng_state())
            features, scale, _, _ = forward(m, True)
            student_parts.append(features)

    # 2. The full-batch loss on the cached features; its gradient w.r.t. each local feature.
    local = Features.cat(student_parts).map(lambda x: x.detach().float().requires_grad_()
                                            if x.is_floating_point() else x)
    teacher_all = Features.cat(teacher).map(distributed.gather) if teacher[0] is not None else None
    scale_leaf = scale.detach().requires_grad_()
    rows = distributed.local_rows(local.image.shape[0], device)
    loss, terms = objective(gather_features(local), teacher_all, scale_leaf, rows)
    loss.backward()
    feature_grads = {name: value.grad for name, value in local.tensors().items() if value.grad is not None}

    # 3. Recompute each micro-batch with grad and back-propagate its share of the gradient.
    result = StepResult(samples=local.image.shape[0])
    local_total = torch.zeros((), device=device)
    local_sums: dict[str, Tensor] = {}
    offset = 0
    for m in range(accumulation):
        set_rng_state(rng_states[m])
        features, scale, local_loss, local_terms = forward(m, False)
        n = features.image.shape[0]
        surrogate = sum((getattr(features, name).float() * grad[offset:offset + n]).sum()
                        for name, grad in feature_grads.items())
        if m == 0 and scale_leaf.grad is not None:  # the full-batch loss used the scale once: count it once
            surrogate = surrogate + scale * scale_leaf.grad
        # Per-sample terms are per-micro-batch means: averaged over the micro-batches.
        engine.backward(backward_scale(world) * surrogate + local_loss / accumulation, scale_wrt_gas=False)
        result.finish(engine_step(engine))
        offset += n
        local_total = local_total + local_loss.detach() / accumulation
        for name, value in local_terms.items():
            local_sums[name] = local_sums.get(name, 0.0) + value.detach() / accumulation
    result.loss = loss.item() * world + local_total.item()
    result.terms = {**{name: value.item() * world for name, value in terms.items()},
                    **{name: value.item() for name, value in local_sums.items()}}
    return result
