"""How each loss term is computed: its implementation, attached by name to its declaration.

A term is declared once in `config.TERMS` (where it applies and what it asks of the towers;
torch-free, so recipe validation reads it too) and implemented once here, under the same name
in `IMPLEMENTATIONS`: how its unweighted value is computed from the objective's inputs, the
learned modules it trains and the checks it needs beyond its declaration. The formulas
themselves are the pure functions of `losses.py`.

Adding a term = one function in `losses.py`, one row in `config.TERMS`, one weight field in
`config.LossConfig` (``weight(...)``, named like the row) and one entry in `IMPLEMENTATIONS`
(the same name); ``tests/test_loss_terms.py`` fails while any of them is missing.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any, Callable, Protocol

import torch
from torch import Tensor, nn

from tinyclip_ds.config import RecipeError
from tinyclip_ds.distill import losses
from tinyclip_ds.distill.config import LossConfig
from tinyclip_ds.distill.heads import Projection, ViTKDGenerator, random_token_mask
from tinyclip_ds.models.transformer import TowerOutput, TowerShape

PER_LAYER = ("hidden", "attention", "qkv")
"""The `Request` outputs that are returned per mapped layer."""


@dataclass(frozen=True)
class Implementation:
    """How one term of `config.TERMS` is computed."""

    # stage1: (objective, student output, teacher output, mask_seed) -> Tensor.
    # stage2: (Stage2Batch) -> Tensor, or a dict of parts logged separately whose mean is the term.
    compute: Callable[..., Tensor | dict[str, Tensor]]
    # Learned modules the term trains with the student: (cfg, teacher, student, layer_pairs) ->
    # {attribute of the objective: module}.
    parts: Callable[..., dict[str, nn.Module]] | None = None
    # Stage-1 checks beyond the term's declaration: (objective, teacher, student, key) -> None or
    # RecipeError.
    check: Callable[..., None] | None = None


class Stage1View(Protocol):
    """What a stage-1 term reads of its objective (`objectives.Stage1Objective`, which imports
    this module): the loss config, the mapped layer pairs, the relation head count and, as
    attributes, the learned modules its ``parts`` made."""

    cfg: LossConfig
    layer_pairs: list[tuple[int, int]]
    relation_heads: int

    def __getattr__(self, name: str) -> nn.Module: ...


# ---- stage 1: one tower, student output vs teacher output -------------------------------------

def _emb(o: Stage1View, s: TowerOutput, t: TowerOutput, mask_seed: int) -> Tensor:
    """Embedding-output MSE through the learned projection W_e."""
    return losses.hidden_mse(o.emb_projection(s.embeddings), t.embeddings, t.token_mask)


def _hidden(o: Stage1View, s: TowerOutput, t: TowerOutput, mask_seed: int) -> Tensor:
    """Hidden-state MSE of the mapped layers, each through its projection (or the shared one)."""
    pairs = o.layer_pairs
    projections = [o.hidden_projections[0 if o.cfg.hidden_projection == "shared" else i]
                   for i in range(len(pairs))]
    return torch.stack([
        losses.hidden_mse(proj(s.hidden[sl]), t.hidden[tl], t.token_mask)
        for proj, (sl, tl) in zip(projections, pairs)]).mean()


def _attn_scores(o: Stage1View, s: TowerOutput, t: TowerOutput, mask_seed: int) -> Tensor:
    """Pre-softmax attention MSE of the mapped layers."""
    return torch.stack([
        losses.attention_scores_mse(s.attn_scores[sl], t.attn_scores[tl], t.attn_mask)
        for sl, tl in o.layer_pairs]).mean()


def _attn_probs(o: Stage1View, s: TowerOutput, t: TowerOutput, mask_seed: int) -> Tensor:
    """Attention-probability KL of the mapped layers."""
    return torch.stack([
        losses.attention_probs_kl(s.attn_probs[sl], t.attn_probs[tl], t.attn_mask)
        for sl, tl in o.layer_pairs]).mean()


def _attn_relation(o: Stage1View, s: TowerOutput, t: TowerOutput, mask_seed: int) -> Tensor:
    """MiniLM-v2: the query-query and key-key relations, averaged."""
    return torch.stack([
        losses.relation_kl(s.qkv[sl][i], t.qkv[tl][i], o.relation_heads, t.attn_mask)
        for sl, tl in o.layer_pairs for i in (0, 1)]).mean()


def _value_relation(o: Stage1View, s: TowerOutput, t: TowerOutput, mask_seed: int) -> Tensor:
    """MiniLM-v2: the value-value relation."""
    return torch.stack([
        losses.relation_kl(s.qkv[sl][2], t.qkv[tl][2], o.relation_heads, t.attn_mask)
        for sl, tl in o.layer_pairs]).mean()


def _rep_l1(o: Stage1View, s: TowerOutput, t: TowerOutput, mask_seed: int) -> Tensor:
    """L1 of the final embeddings."""
    return losses.rep_l1(s.embedding, t.embedding, o.cfg.rep_normalize)


def _rep_mse(o: Stage1View, s: TowerOutput, t: TowerOutput, mask_seed: int) -> Tensor:
    """MSE of the final embeddings."""
    return losses.rep_mse(s.embedding, t.embedding, o.cfg.rep_normalize)


def _rep_cos(o: Stage1View, s: TowerOutput, t: TowerOutput, mask_seed: int) -> Tensor:
    """1 − cosine similarity of the final embeddings."""
    return losses.rep_cos(s.embedding, t.embedding)


def _rep_kl(o: Stage1View, s: TowerOutput, t: TowerOutput, mask_seed: int) -> Tensor:
    """Temperature KL of the final embeddings."""
    return losses.rep_kl(s.embedding, t.embedding, o.cfg.rep_kl_temperature)


def _rep_relation(o: Stage1View, s: TowerOutput, t: TowerOutput, mask_seed: int) -> Tensor:
    """KL of the in-batch similarity distributions of the final embeddings."""
    return losses.rep_relation(s.embedding, t.embedding, o.cfg.rep_relation_temperature)


def _vit_kd(o: Stage1View, s: TowerOutput, t: TowerOutput, mask_seed: int) -> Tensor:
    """ViTKD: mimic the shallow mapped layers, generate the deepest from masked student tokens."""
    cfg = o.cfg
    shallow = o.layer_pairs[:cfg.vit_kd_shallow_layers]
    deep_s, deep_t = o.layer_pairs[-1]
    student_tokens = s.hidden[deep_s]
    # A generator of its own, seeded by the caller from the data position: the masks repeat on
    # resume and the global RNG is left untouched.
    generator = torch.Generator().manual_seed(mask_seed)
    mask = random_token_mask(student_tokens.shape[0], o.vit_kd_generator.grid,
                             cfg.vit_kd_mask_ratio, generator, device=student_tokens.device)
    return losses.vit_kd(
        [proj(s.hidden[sl]) for proj, (sl, _) in zip(o.vit_kd_projections, shallow)],
        [t.hidden[tl] for _, tl in shallow],
        o.vit_kd_generator(student_tokens, mask), t.hidden[deep_t], mask,
        cfg.vit_kd_alpha, cfg.vit_kd_beta)


def _emb_parts(cfg: LossConfig, teacher: TowerShape, student: TowerShape, pairs) -> dict[str, nn.Module]:
    """TinyBERT's W_e."""
    return {"emb_projection": Projection(student.width, teacher.width)}


def _hidden_parts(cfg: LossConfig, teacher: TowerShape, student: TowerShape, pairs) -> dict[str, nn.Module]:
    """TinyBERT's W_h: one per mapped layer, or one shared by all."""
    count = 1 if cfg.hidden_projection == "shared" else len(pairs)
    return {"hidden_projections": nn.ModuleList(Projection(student.width, teacher.width)
                                                for _ in range(count))}


def _vit_kd_parts(cfg: LossConfig, teacher: TowerShape, student: TowerShape, pairs) -> dict[str, nn.Module]:
    """One projection per mimicked shallow layer, and the generator of the deepest layer."""
    shallow = pairs[:cfg.vit_kd_shallow_layers]
    return {"vit_kd_projections": nn.ModuleList(Projection(student.width, teacher.width) for _ in shallow),
            "vit_kd_generator": ViTKDGenerator(student.width, teacher.width, student.grid)}


def _same_heads(o: Stage1View, teacher: TowerShape, student: TowerShape, key: str, term: str) -> None:
    """Head-by-head attention terms need the teacher's head count."""
    if student.heads != teacher.heads:
        raise RecipeError(f"'loss.{term}' compares attention head by head, but '{key}.heads' = "
                          f"{student.heads} and the teacher has {teacher.heads}; use "
                          f"'loss.attn_relation' (MiniLM relations work for any head counts)")


def _relation_heads_divide(o: Stage1View, teacher: TowerShape, student: TowerShape, key: str) -> None:
    """MiniLM relations split both widths into the same number of relation heads."""
    for who, width in (("teacher", teacher.width), ("student", student.width)):
        if width % o.relation_heads:
            raise RecipeError(f"'loss.relation_heads' = {o.relation_heads} must divide the {who} "
                              f"width {width}")


def _vit_kd_layers(o: Stage1View, teacher: TowerShape, student: TowerShape, key: str) -> None:
    """ViTKD needs shallow layers to mimic and a deeper one to generate."""
    shallow = o.cfg.vit_kd_shallow_layers
    if len(o.layer_pairs) <= shallow:
        raise RecipeError(f"'loss.vit_kd' mimics the {shallow} shallowest "
                          f"mapped layers and generates the deepest, so it needs more than "
                          f"{shallow} mapped layers; got {len(o.layer_pairs)} "
                          f"(see '{key}.distill_layers' or 'loss.vit_kd_shallow_layers')")


# ---- stage 2: both towers, on the gathered batch -----------------------------------------------

@dataclass
class Stage2Batch:
    """What a stage-2 term sees: the whole gathered batch and this rank's rows of it."""

    cfg: LossConfig
    s: Any  # the student's `Features`
    t: Any  # the teacher's `Features`, None when no active term needs the teacher
    logit_scale: Tensor  # the student's exponentiated scale
    rows: Tensor  # LongTensor of this rank's row positions

    @functools.cached_property
    def student_filip(self) -> tuple[Tensor, Tensor]:
        """The student's FILIP similarities, computed once and shared by filip and filip_distill."""
        s = self.s
        return losses.filip_similarity(s.image_tokens, s.text_tokens, None, s.text_mask,
                                       self.cfg.filip_topk, self.cfg.filip_chunk)

    @functools.cached_property
    def teacher_filip(self) -> tuple[Tensor, Tensor]:
        """The teacher's FILIP similarities."""
        t = self.t
        return losses.filip_similarity(t.image_tokens, t.text_tokens, None, t.text_mask,
                                       self.cfg.filip_topk, self.cfg.filip_chunk)


def _contrastive(b: Stage2Batch) -> Tensor:
    """Symmetric InfoNCE."""
    return losses.contrastive_loss(b.s.image, b.s.text, b.logit_scale, b.rows)


def _affinity(b: Stage2Batch) -> dict[str, Tensor]:
    """TinyCLIP affinity mimicking, its two directions logged separately."""
    i2t, t2i = losses.affinity_loss(b.s.image, b.s.text, b.t.image, b.t.text, b.cfg.affinity_logit_scale,
                                    b.rows)
    return {"affinity_i2t": i2t, "affinity_t2i": t2i}


def _fd(b: Stage2Batch) -> Tensor:
    """Feature distillation of both towers' embeddings."""
    s, t, rows = b.s, b.t, b.rows
    return losses.fd_loss(s.image[rows], t.image[rows]) + losses.fd_loss(s.text[rows], t.text[rows])


def _icl(b: Stage2Batch) -> Tensor:
    """Interactive contrastive learning."""
    return losses.icl_loss(b.s.image, b.s.text, b.t.image, b.t.text, b.logit_scale, b.rows)


def _filip(b: Stage2Batch) -> Tensor:
    """FILIP token-wise contrastive."""
    return losses.filip_loss(*b.student_filip, b.logit_scale, b.rows)


def _filip_distill(b: Stage2Batch) -> Tensor:
    """FILIP token-wise affinity mimicking of the teacher."""
    return losses.filip_distill_loss(*b.student_filip, *b.teacher_filip, b.cfg.affinity_logit_scale, b.rows)


# ---- the implementations ---------------------------------------------------------------------

IMPLEMENTATIONS: dict[str, Implementation] = {
    "emb": Implementation(_emb, parts=_emb_parts),
    "hidden": Implementation(_hidden, parts=_hidden_parts),
    "attn_scores": Implementation(_attn_scores, check=functools.partial(_same_heads, term="attn_scores")),
    "attn_probs": Implementation(_attn_probs, check=functools.partial(_same_heads, term="attn_probs")),
    "attn_relation": Implementation(_attn_relation, check=_relation_heads_divide),
    "value_relation": Implementation(_value_relation, check=_relation_heads_divide),
    "rep_l1": Implementation(_rep_l1),
    "rep_mse": Implementation(_rep_mse),
    "rep_cos": Implementation(_rep_cos),
    "rep_kl": Implementation(_rep_kl),
    "rep_relation": Implementation(_rep_relation),
    "vit_kd": Implementation(_vit_kd, parts=_vit_kd_parts, check=_vit_kd_layers),
    "contrastive": Implementation(_contrastive),
    "affinity": Implementation(_affinity),
    "fd": Implementation(_fd),
    "icl": Implementation(_icl),
    "filip": Implementation(_filip),
    "filip_distill": Implementation(_filip_distill),
}
"""The implementation of every term of `config.TERMS`, by name."""
