"""Distillation and contrastive loss terms, each a pure function of tensors.

Conventions shared by every term:

- Reductions run in fp32 whatever the input dtype (bf16 inputs are upcast); each function
  returns an fp32 scalar (``affinity_loss``: two scalars).
- Masks select, they never multiply. Masked positions are replaced by a neutral value with
  ``torch.where`` *before* any arithmetic and left out of every sum and count, so the values
  stored there (``-inf`` from a causal softmax, padding garbage) change neither the loss nor
  its gradient, and their gradient is exactly 0.
- Attention layout: per-head tensors ``(B, H, N, Dh)``, attention ``(B, H, N, N)``, masks
  ``(B, 1, N, N)`` bool, True where a query may attend a key (None = everything allowed). A
  query row with no allowed key (a padded token) is not a row of the loss.
- Batch-coupled stage-2 terms take ``rows``: the rows of the (possibly gathered) batch this
  caller computes, None = all. They return the mean over those rows of the full-batch
  definition, so ranks that each compute their own rows against the gathered batch and
  average get the full-batch value.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.checkpoint import checkpoint


# --------------------------------------------------------------------------- helpers

def _masked_mean(values: Tensor, mask: Tensor | None) -> Tensor:
    """Mean of ``values`` over the positions where ``mask`` (broadcast to it) is True; 0 if none."""
    if mask is None:
        return values.mean()
    mask = mask.expand_as(values)
    return torch.where(mask, values, 0.0).sum() / mask.sum().clamp_min(1)


def _masked_log_softmax(logits: Tensor, mask: Tensor | None) -> Tensor:
    """log-softmax over the allowed entries of the last dim; 0 (finite) at masked entries."""
    if mask is None:
        return logits.log_softmax(dim=-1)
    # The lowest finite value, not -inf: it has exactly zero probability and keeps an empty
    # row finite (uniform), so no NaN can reach the gradient.
    filled = torch.where(mask, logits, torch.finfo(logits.dtype).min)
    return torch.where(mask, filled.log_softmax(dim=-1), 0.0)


def _kl_rows(log_teacher: Tensor, log_student: Tensor, mask: Tensor | None = None) -> Tensor:
    """Σ_k p_t (log p_t − log p_s) over the (allowed) last dim: KL(teacher ‖ student) per row."""
    terms = log_teacher.exp() * (log_teacher - log_student)
    if mask is not None:
        terms = torch.where(mask, terms, 0.0)
    return terms.sum(dim=-1)


def _logit_kl_rows(teacher_logits: Tensor, student_logits: Tensor,
                   mask: Tensor | None = None) -> Tensor:
    """KL(softmax(teacher) ‖ softmax(student)) per row, over the allowed entries of the last dim."""
    return _kl_rows(_masked_log_softmax(teacher_logits.float(), mask),
                    _masked_log_softmax(student_logits.float(), mask), mask)


def _valid_rows(attn_mask: Tensor | None) -> Tensor | None:
    """(B, 1, N): query rows with at least one allowed key."""
    return None if attn_mask is None else attn_mask.any(dim=-1)


def _unit(x: Tensor) -> Tensor:
    return F.normalize(x.float(), dim=-1)


def _select(x: Tensor, rows: Tensor | None) -> Tensor:
    return x if rows is None else x[rows]


def _info_nce(logits: Tensor, rows: Tensor | None) -> Tensor:
    """Cross-entropy of (selected) rows whose target is their own index in the full batch."""
    targets = torch.arange(logits.shape[0], device=logits.device) if rows is None else rows
    return F.cross_entropy(logits, targets.to(logits.device))


# --------------------------------------------------------------------------- stage 1

def hidden_mse(student: Tensor, teacher: Tensor, token_mask: Tensor | None = None) -> Tensor:
    """MSE over real tokens: mean over (b, n real, d) of (s − t)².

    student, teacher: (B, N, D), the student already projected to the teacher width.
    token_mask: (B, N) bool, True for real tokens; None = all tokens.
    """
    student, teacher = student.float(), teacher.float()
    if token_mask is not None:
        mask = token_mask[..., None]
        student, teacher = torch.where(mask, student, 0.0), torch.where(mask, teacher, 0.0)
        return _masked_mean((student - teacher).square(), mask)
    return (student - teacher).square().mean()


def attention_scores_mse(student: Tensor, teacher: Tensor, attn_mask: Tensor | None = None) -> Tensor:
    """Per-head MSE of pre-softmax attention scores over the allowed (query, key) positions.

    mean over (b, h, q, k allowed) of (s − t)². student, teacher: (B, H, N, N) raw q·kᵀ/√d with
    the same H (different head counts: use `relation_kl`). attn_mask: (B, 1, N, N) or None.
    """
    if student.shape != teacher.shape:
        raise ValueError(f"attention_scores_mse needs the same attention shape (same number of "
                         f"heads), got student {tuple(student.shape)} and teacher "
                         f"{tuple(teacher.shape)}; use the attn_relation term instead")
    student, teacher = student.float(), teacher.float()
    if attn_mask is not None:
        student, teacher = torch.where(attn_mask, student, 0.0), torch.where(attn_mask, teacher, 0.0)
    return _masked_mean((student - teacher).square(), attn_mask)


def attention_probs_kl(student_probs: Tensor, teacher_probs: Tensor,
                       attn_mask: Tensor | None = None) -> Tensor:
    """Per-head attention KL: mean over (b, h, allowed query q) of Σ_k∈allowed t (log t − log s).

    student_probs, teacher_probs: (B, H, N, N) softmax-ed attention (rows sum to 1 over the
    allowed keys), same H. attn_mask: (B, 1, N, N) or None. Probabilities are clamped at the
    smallest normal fp32 number before the log so a zero never produces inf.
    """
    if student_probs.shape != teacher_probs.shape:
        raise ValueError(f"attention_probs_kl needs the same attention shape (same number of "
                         f"heads), got student {tuple(student_probs.shape)} and teacher "
                         f"{tuple(teacher_probs.shape)}; use the attn_relation term instead")
    tiny = torch.finfo(torch.float32).tiny

    def log_probs(p: Tensor) -> Tensor:
        p = p.float() if attn_mask is None else torch.where(attn_mask, p.float(), 1.0)
        return p.clamp_min(tiny).log()

    kl = _kl_rows(log_probs(teacher_probs), log_probs(student_probs), attn_mask)
    return _masked_mean(kl, _valid_rows(attn_mask))


def _relation_logits(x: Tensor, relation_heads: int, who: str) -> Tensor:
    """(B, H, N, Dh) → heads concatenated, split into R relation heads → x xᵀ/√d_r (B, R, N, N)."""
    batch, heads, n, head_dim = x.shape
    width = heads * head_dim
    if relation_heads <= 0 or width % relation_heads:
        raise ValueError(f"relation_heads={relation_heads} must divide the {who} width {width} "
                         f"(heads × head_dim); choose a common divisor of both towers' widths")
    x = x.float().transpose(1, 2).reshape(batch, n, relation_heads, width // relation_heads)
    x = x.transpose(1, 2)
    return (x @ x.transpose(-2, -1)) / math.sqrt(width // relation_heads)


def relation_kl(student_x: Tensor, teacher_x: Tensor, relation_heads: int,
                attn_mask: Tensor | None = None) -> Tensor:
    """MiniLM-v2 self-attention relation KL.

    Heads are concatenated to (B, N, H·Dh) and split into R = ``relation_heads`` relation heads
    of width d_r; relation = softmax over allowed keys of x_r x_rᵀ/√d_r, (B, R, N, N) (d_r is
    each model's own). Loss = mean over (b, r, allowed query q) of KL(rel_t[q] ‖ rel_s[q]).
    student_x: (B, Hs, N, Dhs), teacher_x: (B, Ht, N, Dht): head counts and widths may differ;
    R must divide both widths. attn_relation averages this over queries and over keys,
    value_relation applies it to values.
    """
    if attn_mask is not None:
        # Tokens outside every allowed pair (padding) are zeroed so that even inf there
        # cannot turn into a NaN gradient through x xᵀ.
        used = (attn_mask.any(dim=-1) | attn_mask.any(dim=-2))[..., None]  # (B, 1, N, 1)
        student_x = torch.where(used, student_x, 0.0)
        teacher_x = torch.where(used, teacher_x, 0.0)
    student = _relation_logits(student_x, relation_heads, "student")
    teacher = _relation_logits(teacher_x, relation_heads, "teacher")
    return _masked_mean(_logit_kl_rows(teacher, student, attn_mask), _valid_rows(attn_mask))


def rep_l1(student: Tensor, teacher: Tensor, normalize: bool = True) -> Tensor:
    """Mean absolute error of the final embeddings (B, E), optionally L2-normalised first."""
    student, teacher = student.float(), teacher.float()
    if normalize:
        student, teacher = _unit(student), _unit(teacher)
    return (student - teacher).abs().mean()


def rep_mse(student: Tensor, teacher: Tensor, normalize: bool = True) -> Tensor:
    """Mean squared error of the final embeddings (B, E), optionally L2-normalised first."""
    student, teacher = student.float(), teacher.float()
    if normalize:
        student, teacher = _unit(student), _unit(teacher)
    return (student - teacher).square().mean()


def rep_cos(student: Tensor, teacher: Tensor) -> Tensor:
    """mean_b (1 − cos(s_b, t_b)) of the final embeddings (B, E)."""
    return (1.0 - F.cosine_similarity(student.float(), teacher.float(), dim=-1)).mean()


def rep_kl(student: Tensor, teacher: Tensor, temperature: float = 1.0) -> Tensor:
    """KL(softmax(t/τ) ‖ softmax(s/τ))·τ² over the embedding dimension, mean over the batch.

    student, teacher: (B, E) raw (not normalised) final embeddings.
    """
    kl = _logit_kl_rows(teacher.float() / temperature, student.float() / temperature)
    return kl.mean() * temperature ** 2


def rep_relation(student: Tensor, teacher: Tensor, temperature: float = 0.1,
                 rows: Tensor | None = None) -> Tensor:
    """In-batch similarity-distribution KL (one modality).

    For each sample i: p(i, ·) = softmax_{j≠i}(cos(x_i, x_j)/τ) over the other samples of the
    batch; loss = mean over the (selected) rows i of KL(p_teacher(i, ·) ‖ p_student(i, ·)).
    student, teacher: (B, E), B ≥ 2 (widths may differ). rows: LongTensor of row indices or None.
    """
    if student.shape[0] < 2:
        raise ValueError("rep_relation needs a batch of at least 2 samples")
    student, teacher = _unit(student), _unit(teacher)
    logits_s = _select(student, rows) @ student.T / temperature
    logits_t = _select(teacher, rows) @ teacher.T / temperature
    row_ids = torch.arange(student.shape[0], device=student.device)
    not_self = _select(row_ids, rows)[:, None] != row_ids[None, :]
    return _logit_kl_rows(logits_t, logits_s, not_self).mean()


def vit_kd(student_shallow: Sequence[Tensor], teacher_shallow: Sequence[Tensor],
           generated_deep: Tensor, teacher_deep: Tensor, mask: Tensor,
           alpha: float, beta: float) -> Tensor:
    """ViTKD (Yang et al. 2022): shallow-layer mimicking + deep-layer masked generation.

    With ViTKD's own reduction (squared error summed over tokens and channels, batch mean),
    which its defaults α = 3e-5, β = 3e-6 were tuned for:

        α · Σ_l Σ_{n,c} (s_l − t_l)² / B  +  β · Σ_{masked (b,n)} Σ_c (g − t)² / (B · ρ)

    ρ = fraction of tokens masked (M masked of B·N), so the second part is
    β · N · (mean over masked tokens of Σ_c (g − t)²); it is 0 when nothing is masked.
    student_shallow / teacher_shallow: equal-length sequences of (B, N, D_t), the student
    already projected. generated_deep, teacher_deep: (B, N, D_t); generated_deep comes from
    the masked student tokens through `heads.ViTKDGenerator`. mask: (B, N) bool, True = masked.
    """
    if len(student_shallow) != len(teacher_shallow):
        raise ValueError(f"vit_kd got {len(student_shallow)} student and {len(teacher_shallow)} "
                         f"teacher shallow layers; they must pair up")
    batch, tokens = mask.shape
    mimic = sum((s.float() - t.float()).square().sum()
                for s, t in zip(student_shallow, teacher_shallow))
    selected = mask[..., None]
    generated = torch.where(selected, generated_deep.float(), 0.0)
    target = torch.where(selected, teacher_deep.float(), 0.0)
    generation = (generated - target).square().sum() * tokens / mask.sum().clamp_min(1)
    return alpha * mimic / batch + beta * generation


# --------------------------------------------------------------------------- stage 2

def contrastive_loss(image: Tensor, text: Tensor, logit_scale: Tensor | float,
                     rows: Tensor | None = None) -> Tensor:
    """Symmetric InfoNCE (CLIP): ½ [CE(s·Î T̂ᵀ, diag) + CE(s·T̂ Îᵀ, diag)].

    image, text: (B, E) paired embeddings (L2-normalised here); logit_scale: the exponentiated
    scale s. rows: which rows of both logit matrices to compute (target of row i = column i).
    """
    image, text = _unit(image), _unit(text)
    i2t = _info_nce(logit_scale * (_select(image, rows) @ text.T), rows)
    t2i = _info_nce(logit_scale * (_select(text, rows) @ image.T), rows)
    return (i2t + t2i) / 2


def affinity_loss(s_image: Tensor, s_text: Tensor, t_image: Tensor, t_text: Tensor,
                  logit_scale: Tensor | float, rows: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """TinyCLIP affinity mimicking, returned as (image→text, text→image).

    image→text: mean over rows i of KL(softmax(s·t_Î t_T̂ᵀ)[i] ‖ softmax(s·s_Î s_T̂ᵀ)[i]);
    text→image: the same with the roles of image and text swapped. All embeddings (B, E) are
    L2-normalised here (student and teacher widths may differ); s is the fixed affinity scale.
    """
    s_image, s_text, t_image, t_text = _unit(s_image), _unit(s_text), _unit(t_image), _unit(t_text)
    i2t = _logit_kl_rows(logit_scale * (_select(t_image, rows) @ t_text.T),
                         logit_scale * (_select(s_image, rows) @ s_text.T))
    t2i = _logit_kl_rows(logit_scale * (_select(t_text, rows) @ t_image.T),
                         logit_scale * (_select(s_text, rows) @ s_image.T))
    return i2t.mean(), t2i.mean()


def fd_loss(student: Tensor, teacher: Tensor) -> Tensor:
    """CLIP-KD feature distillation: MSE of L2-normalised embeddings, mean_(b, e) (ŝ − t̂)².

    student, teacher: (B, E) of one modality (same E). This is CLIP-KD's ``F.mse_loss`` on
    normalised features, the reduction their weight (~2000) is tuned for; the squared L2
    distance ‖ŝ − t̂‖² is E times this value.
    """
    return (_unit(student) - _unit(teacher)).square().mean()


def icl_loss(s_image: Tensor, s_text: Tensor, t_image: Tensor, t_text: Tensor,
             logit_scale: Tensor | float, rows: Tensor | None = None) -> Tensor:
    """CLIP-KD interactive contrastive: ½ [CE(s·ŝ_I t̂_Tᵀ, diag) + CE(s·ŝ_T t̂_Iᵀ, diag)].

    Student embeddings are the anchors, the teacher's other-modality embeddings the
    candidates. All (B, E), L2-normalised here; rows select anchors.
    """
    s_image, s_text, t_image, t_text = _unit(s_image), _unit(s_text), _unit(t_image), _unit(t_text)
    i2t = _info_nce(logit_scale * (_select(s_image, rows) @ t_text.T), rows)
    t2i = _info_nce(logit_scale * (_select(s_text, rows) @ t_image.T), rows)
    return (i2t + t2i) / 2


def _token_mean(values: Tensor, mask: Tensor, topk: int) -> Tensor:
    """Mean over the last dim of the real entries, or of the ``topk`` largest real ones."""
    mask = mask.expand_as(values)
    if 0 < topk < values.shape[-1]:
        values, index = torch.where(mask, values, float("-inf")).topk(topk, dim=-1)
        mask = mask.gather(-1, index)
    return torch.where(mask, values, 0.0).sum(dim=-1) / mask.sum(dim=-1).clamp_min(1)


def _filip_block(image: Tensor, text: Tensor, image_mask: Tensor, text_mask: Tensor,
                 topk: int) -> tuple[Tensor, Tensor]:
    """FILIP similarities of a block of images against all texts: 2 × (c, Bt)."""
    sim = torch.einsum("ine,jme->ijnm", image, text)  # (c, Bt, Ni, Nt)
    image_real = image_mask[:, None, :, None]
    text_real = text_mask[None, :, None, :]
    best_text = torch.where(text_real, sim, float("-inf")).amax(dim=3)  # (c, Bt, Ni)
    best_image = torch.where(image_real, sim, float("-inf")).amax(dim=2)  # (c, Bt, Nt)
    return (_token_mean(best_text, image_mask[:, None, :], topk),
            _token_mean(best_image, text_mask[None, :, :], topk))


def filip_similarity(image_tokens: Tensor, text_tokens: Tensor, image_mask: Tensor | None,
                     text_mask: Tensor, topk: int = 0, chunk: int = 64) -> tuple[Tensor, Tensor]:
    """FILIP token-wise late-interaction similarities (sim_i2t, sim_t2i), both (Bi, Bt).

    Token features are L2-normalised. sim_i2t[i, j] = mean over image i's real tokens x of
    max over text j's real tokens y of ⟨x, y⟩; sim_t2i[i, j] = mean over text j's real tokens
    of max over image i's real tokens. Padding is excluded from both the max and the mean.
    topk > 0: average only the k largest of those per-token maxima (all real tokens when a
    sample has fewer than k); 0 = all.
    image_tokens: (Bi, Ni, E); text_tokens: (Bt, Nt, E); image_mask: (Bi, Ni) bool or None
    (all real); text_mask: (Bt, Nt) bool. Every sample needs at least one real token.
    Computed in blocks of ``chunk`` images (recomputed in backward when gradients are needed),
    so the peak memory is O(chunk · Bt · Ni · Nt).
    """
    if chunk < 1:
        raise ValueError(f"filip chunk must be at least 1, got {chunk}")
    if image_mask is None:
        image_mask = torch.ones(image_tokens.shape[:2], dtype=torch.bool, device=image_tokens.device)
    # Zero the padding first so that whatever it holds (even inf) cannot reach a max or a gradient.
    image = _unit(torch.where(image_mask[..., None], image_tokens.float(), 0.0))
    text = _unit(torch.where(text_mask[..., None], text_tokens.float(), 0.0))
    recompute = torch.is_grad_enabled() and (image.requires_grad or text.requires_grad)
    i2t, t2i = [], []
    for start in range(0, image.shape[0], chunk):
        block = (image[start:start + chunk], text, image_mask[start:start + chunk], text_mask, topk)
        if recompute:
            block_i2t, block_t2i = checkpoint(_filip_block, *block, use_reentrant=False)
        else:
            block_i2t, block_t2i = _filip_block(*block)
        i2t.append(block_i2t)
        t2i.append(block_t2i)
    return torch.cat(i2t), torch.cat(t2i)


def filip_loss(sim_i2t: Tensor, sim_t2i: Tensor, logit_scale: Tensor | float,
               rows: Tensor | None = None) -> Tensor:
    """FILIP contrastive loss: ½ [CE(s·sim_i2t, diag) + CE(s·sim_t2iᵀ, diag)].

    sim_i2t, sim_t2i: (B, B) from `filip_similarity` (row = image, column = text); the
    text→image direction uses the rows of sim_t2iᵀ. rows: which rows of both to compute.
    """
    i2t = _info_nce(logit_scale * _select(sim_i2t.float(), rows), rows)
    t2i = _info_nce(logit_scale * _select(sim_t2i.float().T, rows), rows)
    return (i2t + t2i) / 2


def filip_distill_loss(s_sim_i2t: Tensor, s_sim_t2i: Tensor, t_sim_i2t: Tensor, t_sim_t2i: Tensor,
                       logit_scale: Tensor | float, rows: Tensor | None = None) -> Tensor:
    """FILIP affinity mimicking: the student's token-wise affinity follows the teacher's.

    ½ [mean_i KL(softmax(s·t_i2t)[i] ‖ softmax(s·s_i2t)[i])
       + mean_j KL(softmax(s·t_t2iᵀ)[j] ‖ softmax(s·s_t2iᵀ)[j])], all (B, B) from
    `filip_similarity`; s is one fixed scale for both. rows: which rows of both to compute.
    """
    i2t = _logit_kl_rows(logit_scale * _select(t_sim_i2t.float(), rows),
                         logit_scale * _select(s_sim_i2t.float(), rows))
    t2i = _logit_kl_rows(logit_scale * _select(t_sim_t2i.float().T, rows),
                         logit_scale * _select(s_sim_t2i.float().T, rows))
    return (i2t.mean() + t2i.mean()) / 2
