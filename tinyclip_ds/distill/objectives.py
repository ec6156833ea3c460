"""Stage objectives: the recipe's weighted loss terms, computed from tower outputs."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn

from tinyclip_ds.config import RecipeError, option
from tinyclip_ds.distill.terms import PER_LAYER, TERMS, Stage2Batch, active_terms
from tinyclip_ds.models.transformer import Request, TowerOutput, TowerShape


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


class Stage1Objective(nn.Module):
    """The stage-1 loss of one tower: the recipe's weighted terms between student and teacher.

    It owns the learned parts of its terms (TinyBERT's projections W_e/W_h, the ViTKD
    generator) so that DeepSpeed trains them together with the student. ``forward`` returns the
    total loss and every term separately (unweighted), for logging.
    """

    def __init__(self, cfg: LossConfig, kind: str, teacher: TowerShape, student: TowerShape,
                 layer_pairs: list[tuple[int, int]], key: str):
        super().__init__()
        self.cfg = cfg
        self.kind = kind
        self.terms = active_terms(cfg, "stage1")
        self.layer_pairs = layer_pairs
        self.relation_heads = cfg.relation_heads or teacher.heads
        self._check(teacher, student, key)
        for name in self.terms:
            if TERMS[name].parts is not None:
                for attribute, module in TERMS[name].parts(cfg, teacher, student, layer_pairs).items():
                    setattr(self, attribute, module)

        layers = tuple(s for s, _ in layer_pairs)
        teacher_layers = tuple(t for _, t in layer_pairs)
        wanted = {flag for name in self.terms for flag in TERMS[name].request}
        teacher_wanted = {flag for name in self.terms if TERMS[name].teacher for flag in TERMS[name].request}
        self.student_request = Request(layers=layers if wanted & set(PER_LAYER) else (),
                                       **{flag: True for flag in wanted})
        self.teacher_request = Request(layers=teacher_layers if teacher_wanted & set(PER_LAYER) else (),
                                       **{flag: True for flag in teacher_wanted})

    def _check(self, teacher: TowerShape, student: TowerShape, key: str) -> None:
        """Refuse terms the two towers cannot provide, naming the recipe key and the alternative."""
        token_terms = [t for t in self.terms if TERMS[t].one_to_one == "tokens"]
        if token_terms:
            if self.kind == "image" and student.grid != teacher.grid:
                raise RecipeError(f"loss terms {', '.join(token_terms)} compare tokens one to one, but "
                                  f"'{key}.patch_size' = {student.patch_size} gives a {student.grid}² grid "
                                  f"and the teacher a {teacher.grid}² grid; use the teacher's patch size "
                                  f"or only rep_* terms")
            if self.kind == "text" and student.context_length != teacher.context_length:
                raise RecipeError(f"loss terms {', '.join(token_terms)} compare tokens one to one, but "
                                  f"'{key}.context_length' = {student.context_length} differs from the "
                                  f"teacher's {teacher.context_length}; keep the teacher's or use only rep_* terms")
        embedding_terms = [t for t in self.terms if TERMS[t].one_to_one == "embedding"]
        if embedding_terms and student.output_dim != teacher.output_dim:
            raise RecipeError(f"{', '.join('loss.' + t for t in embedding_terms)} compare final embeddings, "
                              f"but '{key}.output_dim' = {student.output_dim} differs from the teacher's "
                              f"{teacher.output_dim}; set it to 0 (= the teacher's) or use rep_relation")
        for name in self.terms:
            term = TERMS[name]
            if self.kind not in term.towers:
                raise RecipeError(f"'loss.{name}' applies to the {' and '.join(term.towers)} tower only")
            if term.check is not None:
                term.check(self, teacher, student, key)

    def forward(self, s: TowerOutput, t: TowerOutput, mask_seed: int = 0) -> tuple[Tensor, dict[str, Tensor]]:
        """The weighted total and every term's unweighted value; ``mask_seed`` seeds ViTKD's mask."""
        values = {name: TERMS[name].compute(self, s, t, mask_seed) for name in self.terms}
        total = sum(self.terms[name] * value for name, value in values.items())
        return total, values


class Stage2Objective:
    """The batch-coupled stage-2 terms on gathered features, for this rank's rows.

    Every term is a mean over the rows of the full (gathered) batch; a rank computes the mean
    over its own ``rows`` and weights it by its share ``len(rows) / N``, so summing the ranks'
    results gives the full-batch loss exactly (the local-loss formulation). Returned terms are
    weighted the same way, so they too sum over ranks to the full-batch values.
    """

    def __init__(self, cfg: LossConfig):
        self.cfg = cfg
        self.terms = active_terms(cfg, "stage2")
        active = [TERMS[name] for name in self.terms]
        self.student_tokens = any("tokens" in term.request for term in active)
        self.teacher_tokens = any("tokens" in term.request and term.teacher for term in active)
        self.needs_teacher = any(term.teacher for term in active)

    def __call__(self, s, t, logit_scale: Tensor, rows: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        """s, t: `Features` of the whole gathered batch (student, teacher); logit_scale: the
        student's exponentiated scale; rows: LongTensor of this rank's row positions."""
        if s.image.shape[0] == 0:  # a wholly unusable batch (the training loop skips those): no loss
            return s.image.sum() * 0.0, {}
        share = len(rows) / s.image.shape[0]
        batch = Stage2Batch(self.cfg, s, t, logit_scale, rows)
        values: dict[str, Tensor] = {}
        weighted = []
        for name, weight in self.terms.items():
            value = TERMS[name].compute(batch)
            if isinstance(value, dict):  # logged in parts (affinity: i2t, t2i); the term is their mean
                values.update(value)
                weighted.append(weight / len(value) * sum(value.values()))
            else:
                values[name] = value
                weighted.append(weight * value)
        total = share * torch.stack(weighted).sum() if weighted else s.image.sum() * 0.0
        return total, {name: share * value for name, value in values.items()}
