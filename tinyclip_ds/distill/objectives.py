"""Stage objectives: the recipe's weighted loss terms, computed from tower outputs."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn

from tinyclip_ds.config import RecipeError, option
from tinyclip_ds.distill import losses
from tinyclip_ds.distill.heads import Projection, ViTKDGenerator, random_token_mask
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


STAGE1_TERMS = ("emb", "hidden", "attn_scores", "attn_probs", "attn_relation", "value_relation",
                "rep_l1", "rep_mse", "rep_cos", "rep_kl", "rep_relation", "vit_kd")
STAGE2_TERMS = ("contrastive", "affinity", "fd", "icl", "filip", "filip_distill")
TOKEN_TERMS = ("emb", "hidden", "attn_scores", "attn_probs", "attn_relation", "value_relation", "vit_kd")


def active_terms(cfg: LossConfig, names: tuple[str, ...]) -> dict[str, float]:
    """The terms of ``names`` that the recipe switches on, with their weights."""
    return {name: getattr(cfg, name) for name in names if getattr(cfg, name) > 0}


class Stage1Objective(nn.Module):
    """The stage-1 loss of one tower: the recipe's weighted terms between student and teacher.

    It owns the learned parts (TinyBERT's projections W_e/W_h, the ViTKD generator) so that
    DeepSpeed trains them together with the student. ``forward`` returns the total loss and
    every term separately (unweighted), for logging.
    """

    def __init__(self, cfg: LossConfig, kind: str, teacher: TowerShape, student: TowerShape,
                 layer_pairs: list[tuple[int, int]], key: str):
        super().__init__()
        self.cfg = cfg
        self.kind = kind
        self.terms = active_terms(cfg, STAGE1_TERMS)
        self.layer_pairs = layer_pairs
        self._check(teacher, student, key)
        self.relation_heads = cfg.relation_heads or teacher.heads
        d_s, d_t = student.width, teacher.width
        if "emb" in self.terms:
            self.emb_projection = Projection(d_s, d_t)
        if "hidden" in self.terms:
            count = 1 if cfg.hidden_projection == "shared" else len(layer_pairs)
            self.hidden_projections = nn.ModuleList(Projection(d_s, d_t) for _ in range(count))
        if "vit_kd" in self.terms:
            shallow = layer_pairs[:cfg.vit_kd_shallow_layers]
            self.vit_kd_projections = nn.ModuleList(Projection(d_s, d_t) for _ in shallow)
            self.vit_kd_generator = ViTKDGenerator(d_s, d_t, student.grid)

        layers = tuple(s for s, _ in layer_pairs)
        teacher_layers = tuple(t for _, t in layer_pairs)
        wants = dict(
            hidden=any(t in self.terms for t in ("hidden", "vit_kd")),
            attention=any(t in self.terms for t in ("attn_scores", "attn_probs")),
            qkv=any(t in self.terms for t in ("attn_relation", "value_relation")),
            embeddings="emb" in self.terms,
        )
        per_layer = wants["hidden"] or wants["attention"] or wants["qkv"]
        self.student_request = Request(layers=layers if per_layer else (), **wants)
        self.teacher_request = Request(layers=teacher_layers if per_layer else (), **wants)

    def _check(self, teacher: TowerShape, student: TowerShape, key: str) -> None:
        """Refuse terms the two towers cannot provide, naming the recipe key and the alternative."""
        token_terms = [t for t in TOKEN_TERMS if t in self.terms]
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
        for term in ("attn_scores", "attn_probs"):
            if term in self.terms and student.heads != teacher.heads:
                raise RecipeError(f"'loss.{term}' compares attention head by head, but '{key}.heads' = "
                                  f"{student.heads} and the teacher has {teacher.heads}; use "
                                  f"'loss.attn_relation' (MiniLM relations work for any head counts)")
        relation_heads = self.cfg.relation_heads or teacher.heads
        if any(t in self.terms for t in ("attn_relation", "value_relation")):
            for who, width in (("teacher", teacher.width), ("student", student.width)):
                if width % relation_heads:
                    raise RecipeError(f"'loss.relation_heads' = {relation_heads} must divide the {who} "
                                      f"width {width}")
        rep = [t for t in ("rep_l1", "rep_mse", "rep_cos", "rep_kl") if t in self.terms]
        if rep and student.output_dim != teacher.output_dim:
            raise RecipeError(f"{', '.join('loss.' + t for t in rep)} compare final embeddings, but "
                              f"'{key}.output_dim' = {student.output_dim} differs from the teacher's "
                              f"{teacher.output_dim}; set it to 0 (= the teacher's) or use rep_relation")
        if "vit_kd" in self.terms:
            if self.kind != "image":
                raise RecipeError("'loss.vit_kd' applies to the image tower only")
            if len(self.layer_pairs) <= self.cfg.vit_kd_shallow_layers:
                raise RecipeError(f"'loss.vit_kd' mimics the {self.cfg.vit_kd_shallow_layers} shallowest "
                                  f"mapped layers and generates the deepest, so it needs more than "
                                  f"{self.cfg.vit_kd_shallow_layers} mapped layers; got {len(self.layer_pairs)} "
                                  f"(see '{key}.distill_layers' or 'loss.vit_kd_shallow_layers')")

    def forward(self, s: TowerOutput, t: TowerOutput, mask_seed: int = 0) -> tuple[Tensor, dict[str, Tensor]]:
        cfg = self.cfg
        values: dict[str, Tensor] = {}
        tokens, attention = t.token_mask, t.attn_mask
        pairs = self.layer_pairs
        if "emb" in self.terms:
            values["emb"] = losses.hidden_mse(self.emb_projection(s.embeddings), t.embeddings, tokens)
        if "hidden" in self.terms:
            projections = [self.hidden_projections[0 if cfg.hidden_projection == "shared" else i]
                           for i in range(len(pairs))]
            values["hidden"] = torch.stack([
                losses.hidden_mse(proj(s.hidden[sl]), t.hidden[tl], tokens)
                for proj, (sl, tl) in zip(projections, pairs)]).mean()
        if "attn_scores" in self.terms:
            values["attn_scores"] = torch.stack([
                losses.attention_scores_mse(s.attn_scores[sl], t.attn_scores[tl], attention)
                for sl, tl in pairs]).mean()
        if "attn_probs" in self.terms:
            values["attn_probs"] = torch.stack([
                losses.attention_probs_kl(s.attn_probs[sl], t.attn_probs[tl], attention)
                for sl, tl in pairs]).mean()
        if "attn_relation" in self.terms:
            # MiniLM-v2: the query-query and key-key relations, averaged.
            values["attn_relation"] = torch.stack([
                losses.relation_kl(s.qkv[sl][i], t.qkv[tl][i], self.relation_heads, attention)
                for sl, tl in pairs for i in (0, 1)]).mean()
        if "value_relation" in self.terms:
            values["value_relation"] = torch.stack([
                losses.relation_kl(s.qkv[sl][2], t.qkv[tl][2], self.relation_heads, attention)
                for sl, tl in pairs]).mean()
        if "rep_l1" in self.terms:
            values["rep_l1"] = losses.rep_l1(s.embedding, t.embedding, cfg.rep_normalize)
        if "rep_mse" in self.terms:
            values["rep_mse"] = losses.rep_mse(s.embedding, t.embedding, cfg.rep_normalize)
        if "rep_cos" in self.terms:
            values["rep_cos"] = losses.rep_cos(s.embedding, t.embedding)
        if "rep_kl" in self.terms:
            values["rep_kl"] = losses.rep_kl(s.embedding, t.embedding, cfg.rep_kl_temperature)
        if "rep_relation" in self.terms:
            values["rep_relation"] = losses.rep_relation(s.embedding, t.embedding, cfg.rep_relation_temperature)
        if "vit_kd" in self.terms:
            values["vit_kd"] = self._vit_kd(s, t, mask_seed)
        total = sum(self.terms[name] * value for name, value in values.items())
        return total, values

    def _vit_kd(self, s: TowerOutput, t: TowerOutput, mask_seed: int) -> Tensor:
        shallow = self.layer_pairs[:self.cfg.vit_kd_shallow_layers]
        deep_s, deep_t = self.layer_pairs[-1]
        student_tokens = s.hidden[deep_s]
        generator = torch.Generator().manual_seed(mask_seed)
        mask = random_token_mask(student_tokens.shape[0], self.vit_kd_generator.grid,
                                 self.cfg.vit_kd_mask_ratio, generator, device=student_tokens.device)
        return losses.vit_kd(
            [proj(s.hidden[sl]) for proj, (sl, _) in zip(self.vit_kd_projections, shallow)],
            [t.hidden[tl] for _, tl in shallow],
            self.vit_kd_generator(student_tokens, mask), t.hidden[deep_t], mask,
            self.cfg.vit_kd_alpha, self.cfg.vit_kd_beta)


class Stage2Objective:
    """The batch-coupled stage-2 terms on gathered features, for this rank's rows.

    Every term is a mean over the rows of the full (gathered) batch; a rank computes the mean
    over its own ``rows`` and weights it by its share ``len(rows) / N``, so summing the ranks'
    results gives the full-batch loss exactly (the local-loss formulation). Returned terms are
    weighted the same way, so they too sum over ranks to the full-batch values.
    """

    def __init__(self, cfg: LossConfig):
        self.cfg = cfg
        self.terms = active_terms(cfg, STAGE2_TERMS)
        self.student_tokens = any(t in self.terms for t in ("filip", "filip_distill"))
        self.teacher_tokens = "filip_distill" in self.terms
        self.needs_teacher = any(t in self.terms for t in ("affinity", "fd", "icl", "filip_distill"))

    def __call__(self, s, t, logit_scale: Tensor, rows: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        """s, t: `Features` of the whole gathered batch (student, teacher); logit_scale: the
        student's exponentiated scale; rows: LongTensor of this rank's row positions."""
        cfg = self.cfg
        if s.image.shape[0] == 0:  # a wholly unusable batch (the training loop skips those): no loss
            return s.image.sum() * 0.0, {}
        share = len(rows) / s.image.shape[0]
        values: dict[str, Tensor] = {}
        weighted = []
        if "contrastive" in self.terms:
            values["contrastive"] = losses.contrastive_loss(s.image, s.text, logit_scale, rows)
            weighted.append(cfg.contrastive * values["contrastive"])
        if "affinity" in self.terms:
            values["affinity_i2t"], values["affinity_t2i"] = losses.affinity_loss(
                s.image, s.text, t.image, t.text, cfg.affinity_logit_scale, rows)
            weighted.append(cfg.affinity * 0.5 * (values["affinity_i2t"] + values["affinity_t2i"]))
        if "fd" in self.terms:
            values["fd"] = losses.fd_loss(s.image[rows], t.image[rows]) + losses.fd_loss(s.text[rows], t.text[rows])
            weighted.append(cfg.fd * values["fd"])
        if "icl" in self.terms:
            values["icl"] = losses.icl_loss(s.image, s.text, t.image, t.text, logit_scale, rows)
            weighted.append(cfg.icl * values["icl"])
        if self.student_tokens:
            s_sims = losses.filip_similarity(s.image_tokens, s.text_tokens, None, s.text_mask,
                                             cfg.filip_topk, cfg.filip_chunk)
        if "filip" in self.terms:
            values["filip"] = losses.filip_loss(*s_sims, logit_scale, rows)
            weighted.append(cfg.filip * values["filip"])
        if "filip_distill" in self.terms:
            t_sims = losses.filip_similarity(t.image_tokens, t.text_tokens, None, t.text_mask,
                                             cfg.filip_topk, cfg.filip_chunk)
            values["filip_distill"] = losses.filip_distill_loss(*s_sims, *t_sims, cfg.affinity_logit_scale, rows)
            weighted.append(cfg.filip_distill * values["filip_distill"])
        total = share * torch.stack(weighted).sum() if weighted else s.image.sum() * 0.0
        return total, {name: share * value for name, value in values.items()}
