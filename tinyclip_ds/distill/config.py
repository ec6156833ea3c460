"""The recipe's ``loss`` section and the table of loss terms it weights.

`TERMS` declares each term once: where it applies and what it asks of the towers, read by the
objectives, the training tasks and recipe validation. How a term is computed is attached by
name in `terms.IMPLEMENTATIONS` (torch); this module stays torch-free so that recipes load and
validate without importing torch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from tinyclip_ds.config import Range, option

TermStage = Literal["stage1", "stage2"]


@dataclass(frozen=True)
class Term:
    """One loss term; ``name`` is also its weight field in `LossConfig` and its implementation's
    key in `terms.IMPLEMENTATIONS`."""

    name: str
    # stage1: one tower, student output vs teacher output; stage2: both towers on the gathered batch.
    stage: TermStage
    # `Request` flags (hidden, attention, qkv, embeddings, tokens) asked of the student tower,
    # and of the teacher tower too when ``teacher``.
    request: tuple[str, ...] = ()
    teacher: bool = True  # needs the teacher's outputs
    towers: tuple[str, ...] = ("image", "text")
    # "tokens": compares student and teacher tokens one to one (needs the same grid or context
    # length); "embedding": compares final embeddings one to one (needs the same output width).
    one_to_one: Literal["", "tokens", "embedding"] = ""
    in_batch: bool = False  # compares the samples of a micro-batch with each other


TERMS: dict[str, Term] = {term.name: term for term in (
    Term("emb", "stage1", request=("embeddings",), one_to_one="tokens"),
    Term("hidden", "stage1", request=("hidden",), one_to_one="tokens"),
    Term("attn_scores", "stage1", request=("attention",), one_to_one="tokens"),
    Term("attn_probs", "stage1", request=("attention",), one_to_one="tokens"),
    Term("attn_relation", "stage1", request=("qkv",), one_to_one="tokens"),
    Term("value_relation", "stage1", request=("qkv",), one_to_one="tokens"),
    Term("rep_l1", "stage1", one_to_one="embedding"),
    Term("rep_mse", "stage1", one_to_one="embedding"),
    Term("rep_cos", "stage1", one_to_one="embedding"),
    Term("rep_kl", "stage1", one_to_one="embedding"),
    Term("rep_relation", "stage1", in_batch=True),
    Term("vit_kd", "stage1", request=("hidden",), towers=("image",), one_to_one="tokens"),
    Term("contrastive", "stage2", teacher=False),
    Term("affinity", "stage2"),
    Term("fd", "stage2"),
    Term("icl", "stage2"),
    Term("filip", "stage2", request=("tokens",), teacher=False),
    Term("filip_distill", "stage2", request=("tokens",)),
)}
"""Every loss term, in the order the objectives compute and log them."""


def weight(term: str) -> float:
    """The weight field of a term, described as "weight of ``term``": 0.0 (off) unless a recipe
    sets it, any weight >= 0."""
    return option(0.0, f"weight of {term}", range=Range(0, note="0 = off"))


_POSITIVE = Range(0, open_low=True)


@dataclass
class LossConfig:
    # stage 1 terms (weights; 0 = off)
    emb: float = weight("the embedding-output MSE (through a learned projection)")
    hidden: float = weight("the mapped layers' hidden-state MSE (learned projection)")
    attn_scores: float = weight("the per-head pre-softmax attention MSE (masked mean)")
    attn_probs: float = weight("the per-head attention-probability KL (masked)")
    attn_relation: float = weight("the MiniLM-v2 query/key relation KL")
    value_relation: float = weight("the MiniLM-v2 value relation KL")
    rep_l1: float = weight("the L1 loss on final embeddings")
    rep_mse: float = weight("the MSE on final embeddings")
    rep_cos: float = weight("1 − cosine similarity of final embeddings")
    rep_kl: float = weight("KL(softmax(t/τ) ‖ softmax(s/τ))·τ² on final embeddings")
    rep_relation: float = weight("the in-batch similarity-distribution KL")
    vit_kd: float = weight("ViTKD (shallow mimicking + deep masked generation), image only")
    # stage 2 terms
    contrastive: float = weight("symmetric InfoNCE with the student's logit scale")
    affinity: float = weight("TinyCLIP affinity mimicking (image→text + text→image)")
    fd: float = weight("feature distillation: MSE of L2-normalised embeddings")
    icl: float = weight("interactive contrastive: student vs teacher other-modality")
    filip: float = weight("FILIP token-wise contrastive as a task loss")
    filip_distill: float = weight("FILIP token-wise affinity mimicking of the teacher")
    # parameters
    hidden_projection: Literal["per_layer", "shared"] = option(
        "per_layer", "one learned student→teacher projection per mapped layer, or one shared")
    rep_normalize: bool = option(True, "L2-normalise final embeddings before rep_l1/rep_mse")
    rep_kl_temperature: float = option(1.0, "τ of rep_kl", range=_POSITIVE)
    rep_relation_temperature: float = option(0.1, "temperature of rep_relation's similarity softmax",
                                             range=_POSITIVE)
    relation_heads: int = option(0, "relation heads of attn/value_relation; 0 = the teacher's heads",
                                 range=Range(0, note="0 = the teacher's heads"))
    vit_kd_alpha: float = option(3e-5, "ViTKD weight of the shallow-layer mimicking part", range=Range(0))
    vit_kd_beta: float = option(3e-6, "ViTKD weight of the deepest-layer generation part", range=Range(0))
    vit_kd_mask_ratio: float = option(0.5, "ViTKD fraction of student tokens masked before generation",
                                      range=Range(0, 1, open_high=True))
    vit_kd_shallow_layers: int = option(2, "ViTKD: number of shallowest mapped layers mimicked", range=Range(0))
    logit_scale_init: float = option(14.285714, "initial student logit scale (1/temperature)", range=_POSITIVE)
    logit_scale_max: float = option(100.0, "clamp of the learnable logit scale", range=_POSITIVE)
    affinity_logit_scale: float = option(50.0, "fixed logit scale of affinity mimicking (TinyCLIP: 50)",
                                         range=_POSITIVE)
    filip_topk: int = option(0, "FILIP: keep only the k most similar tokens per side; 0 = all",
                             range=Range(0, note="0 = all"))
    filip_chunk: int = option(64, "FILIP: rows of the similarity matrix computed at once (memory bound)",
                              range=Range(1))


def active_terms(cfg: LossConfig, stage: TermStage) -> dict[str, float]:
    """The terms of ``stage`` that the recipe switches on, with their weights (in table order)."""
    return {name: getattr(cfg, name) for name, term in TERMS.items()
            if term.stage == stage and getattr(cfg, name) > 0}
