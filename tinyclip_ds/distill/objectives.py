"""Stage objectives: the recipe's weighted loss terms, computed from tower outputs."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from tinyclip_ds.config import option


@dataclass
class LossConfig:
    # stage 1 terms (weights; 0 = off)
    emb: float = option(0.0, "weight of the embedding-output MSE (through a learned projection)")
    hidden: float = option(0.0, "weight of the mapped layers' hidden-state MSE (learned projection)")
    attn_scores: float = option(0.0, "weight of the per-head pre-softmax attention MSE (masked mean)")
    attn_probs: float = option(0.0, "weight of the per-head attention-probability KL (masked)")
    attn_relation: float = option(0.0, "weight of the MiniLM-v2 query/key relation KL")
    value_relation: float = option(0.0, "weight of the MiniLM-v2 value relation KL")
    rep_l1: float = option(0.0, "weight of the L1 loss on final embeddings")
    rep_mse: float = option(0.0, "weight of the MSE on final embeddings")
    rep_cos: float = option(0.0, "weight of 1 − cosine similarity of final embeddings")
    rep_kl: float = option(0.0, "weight of KL(softmax(t/τ) ‖ softmax(s/τ))·τ² on final embeddings")
    rep_relation: float = option(0.0, "weight of the in-batch similarity-distribution KL")
    vit_kd: float = option(0.0, "weight of ViTKD (shallow mimicking + deep masked generation), image only")
    # stage 2 terms
    contrastive: float = option(0.0, "weight of symmetric InfoNCE with the student's logit scale")
    affinity: float = option(0.0, "weight of TinyCLIP affinity mimicking (image→text + text→image)")
    fd: float = option(0.0, "weight of feature distillation: MSE of L2-normalised embeddings")
    icl: float = option(0.0, "weight of interactive contrastive: student vs teacher other-modality")
    filip: float = option(0.0, "weight of FILIP token-wise contrastive as a task loss")
    filip_distill: float = option(0.0, "weight of FILIP token-wise affinity mimicking of the teacher")
    # parameters
    hidden_projection: Literal["per_layer", "shared"] = option(
        "per_layer", "one learned student→teacher projection per mapped layer, or one shared")
    rep_normalize: bool = option(True, "L2-normalise final embeddings before rep_l1/rep_mse")
    rep_kl_temperature: float = option(1.0, "τ of rep_kl")
    rep_relation_temperature: float = option(0.1, "temperature of rep_relation's similarity softmax")
    relation_heads: int = option(0, "relation heads of attn/value_relation; 0 = the teacher's heads")
    vit_kd_alpha: float = option(3e-5, "ViTKD weight of the shallow-layer mimicking part")
    vit_kd_beta: float = option(3e-6, "ViTKD weight of the deepest-layer generation part")
    vit_kd_mask_ratio: float = option(0.5, "ViTKD fraction of student tokens masked before generation")
    vit_kd_shallow_layers: int = option(2, "ViTKD: number of shallowest mapped layers mimicked")
    logit_scale_init: float = option(14.285714, "initial student logit scale (1/temperature)")
    logit_scale_max: float = option(100.0, "clamp of the learnable logit scale")
    affinity_logit_scale: float = option(50.0, "fixed logit scale of affinity mimicking (TinyCLIP: 50)")
    filip_topk: int = option(0, "FILIP: keep only the k most similar tokens per side; 0 = all")
    filip_chunk: int = option(64, "FILIP: rows of the similarity matrix computed at once (memory bound)")
