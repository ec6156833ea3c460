"""Stage objectives: the recipe's weighted loss terms, computed from tower outputs."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from tinyclip_ds.config import RecipeError
from tinyclip_ds.distill.config import TERMS, LossConfig, active_terms
from tinyclip_ds.distill.terms import IMPLEMENTATIONS, PER_LAYER, Stage2Batch
from tinyclip_ds.models.transformer import Request, TowerOutput, TowerShape


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
            parts = IMPLEMENTATIONS[name].parts
            if parts is not None:
                for attribute, module in parts(cfg, teacher, student, layer_pairs).items():
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
            check = IMPLEMENTATIONS[name].check
            if check is not None:
                check(self, teacher, student, key)

    def forward(self, s: TowerOutput, t: TowerOutput, mask_seed: int = 0) -> tuple[Tensor, dict[str, Tensor]]:
        """The weighted total and every term's unweighted value; ``mask_seed`` seeds ViTKD's mask."""
        values = {name: IMPLEMENTATIONS[name].compute(self, s, t, mask_seed) for name in self.terms}
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
            value = IMPLEMENTATIONS[name].compute(batch)
            if isinstance(value, dict):  # logged in parts (affinity: i2t, t2i); the term is their mean
                values.update(value)
                weighted.append(weight / len(value) * sum(value.values()))
            else:
                values[name] = value
                weighted.append(weight * value)
        total = share * torch.stack(weighted).sum() if weighted else s.image.sum() * 0.0
        return total, {name: share * value for name, value in values.items()}
