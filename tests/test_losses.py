"""Loss terms against direct computations (loops, torch.nn.functional on hand-built inputs)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from tinyclip_ds.distill import losses
from tinyclip_ds.distill.heads import Projection, ViTKDGenerator, random_token_mask

LENGTHS = [6, 3, 1]  # real tokens per text sample (EOT included); context 6


def exact(actual: torch.Tensor, expected: torch.Tensor) -> None:
    """Bit-identical: only for the same computation on the same shapes (e.g. clean inputs vs
    inputs with garbage where a mask says nothing may leak); use `close` for anything else."""
    torch.testing.assert_close(actual, expected, rtol=0, atol=0)


def close(actual: torch.Tensor, expected: torch.Tensor, tol: float = 1e-5) -> None:
    torch.testing.assert_close(actual.float(), expected.float(), rtol=tol, atol=tol)


def text_masks(lengths=LENGTHS, n: int = 6) -> tuple[torch.Tensor, torch.Tensor]:
    """token_mask (B, N) and attn_mask (B, 1, N, N) built the way TextTower builds them."""
    positions = torch.arange(n)
    token_mask = positions[None, :] < torch.tensor(lengths)[:, None]
    causal = positions[None, :] <= positions[:, None]
    return token_mask, causal[None, None] & token_mask[:, None, :, None]


def garbage(x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """x with every position outside ``keep`` replaced by huge, infinite or random values."""
    junk = torch.randn(x.shape, generator=torch.Generator().manual_seed(9)) * 1e4
    flat = junk.view(-1)
    flat[0::5], flat[1::5], flat[2::5], flat[3::5] = float("-inf"), float("inf"), 1e30, -1e30
    return torch.where(keep.expand_as(x), x, junk.to(x.dtype))


def assert_masked_grad_is_zero(loss, x: torch.Tensor, keep: torch.Tensor) -> None:
    """The gradient of loss(x) is finite everywhere and exactly 0 outside ``keep``."""
    x = x.detach().clone().requires_grad_()
    (grad,) = torch.autograd.grad(loss(x), x)
    assert torch.isfinite(grad).all()
    assert (grad[~keep.expand_as(grad)] == 0).all() and grad.abs().sum() > 0


def causal_probs(scores: torch.Tensor) -> torch.Tensor:
    """Attention probabilities as the tower makes them: causal softmax on every row."""
    n = scores.shape[-1]
    return scores.masked_fill(~torch.ones(n, n, dtype=torch.bool).tril(), float("-inf")).softmax(-1)


# --------------------------------------------------------------------------- stage 1

def test_hidden_mse_matches_mse_over_real_tokens():
    torch.manual_seed(0)
    token_mask, _ = text_masks()
    s, t = torch.randn(3, 6, 8), torch.randn(3, 6, 8)
    close(losses.hidden_mse(s, t), F.mse_loss(s, t))
    expected = F.mse_loss(s[token_mask], t[token_mask])
    close(losses.hidden_mse(s, t, token_mask), expected)
    keep = token_mask[..., None]
    exact(losses.hidden_mse(garbage(s, keep), garbage(t, keep), token_mask),
          losses.hidden_mse(s, t, token_mask))
    assert_masked_grad_is_zero(lambda x: losses.hidden_mse(x, garbage(t, keep), token_mask),
                               garbage(s, keep), keep)


def test_attention_scores_mse_over_allowed_positions():
    torch.manual_seed(0)
    _, attn_mask = text_masks()
    s, t = torch.randn(3, 2, 6, 6), torch.randn(3, 2, 6, 6)
    close(losses.attention_scores_mse(s, t), F.mse_loss(s, t))
    allowed = attn_mask.expand_as(s)
    per_head = [F.mse_loss(s[b, h][allowed[b, h]], t[b, h][allowed[b, h]], reduction="sum")
                for b in range(3) for h in range(2)]
    expected = torch.stack(per_head).sum() / allowed.sum()
    close(losses.attention_scores_mse(s, t, attn_mask), expected)
    # the tower's own masking (-inf above the diagonal) and padded rows change nothing
    exact(losses.attention_scores_mse(garbage(s, attn_mask), garbage(t, attn_mask), attn_mask),
          losses.attention_scores_mse(s, t, attn_mask))
    assert_masked_grad_is_zero(lambda x: losses.attention_scores_mse(x, garbage(t, attn_mask), attn_mask),
                               garbage(s, attn_mask), attn_mask)


def test_attention_scores_mse_rejects_different_head_counts():
    with pytest.raises(ValueError, match="attn_relation"):
        losses.attention_scores_mse(torch.randn(1, 2, 4, 4), torch.randn(1, 3, 4, 4))


def test_attention_probs_kl_per_allowed_row():
    torch.manual_seed(0)
    _, attn_mask = text_masks()
    s, t = causal_probs(torch.randn(3, 2, 6, 6)), causal_probs(torch.randn(3, 2, 6, 6) * 3)
    rows = []
    for b in range(3):
        for h in range(2):
            for q in range(6):
                keys = attn_mask[b, 0, q]
                if keys.any():
                    rows.append(F.kl_div(s[b, h, q, keys].log(), t[b, h, q, keys], reduction="sum"))
    close(losses.attention_probs_kl(s, t, attn_mask), torch.stack(rows).mean())
    exact(losses.attention_probs_kl(garbage(s, attn_mask), garbage(t, attn_mask), attn_mask),
          losses.attention_probs_kl(s, t, attn_mask))
    assert_masked_grad_is_zero(lambda x: losses.attention_probs_kl(x, garbage(t, attn_mask), attn_mask),
                               garbage(s, attn_mask), attn_mask)
    # without a mask: plain KL over all keys, mean over (b, h, q)
    s_full, t_full = torch.randn(2, 3, 4, 4).softmax(-1), torch.randn(2, 3, 4, 4).softmax(-1)
    expected = F.kl_div(s_full.log(), t_full, reduction="sum") / (2 * 3 * 4)
    close(losses.attention_probs_kl(s_full, t_full), expected)


def relation_reference(sx: torch.Tensor, tx: torch.Tensor, heads: int, attn_mask) -> torch.Tensor:
    """MiniLM-v2 relation KL by loops over samples, relation heads and allowed rows."""
    rows = []
    for b in range(sx.shape[0]):
        s_cat = torch.cat(list(sx[b]), dim=-1)  # (N, Hs·Dhs): heads side by side
        t_cat = torch.cat(list(tx[b]), dim=-1)
        s_dim, t_dim = s_cat.shape[1] // heads, t_cat.shape[1] // heads
        for r in range(heads):
            s_r = s_cat[:, r * s_dim:(r + 1) * s_dim]
            t_r = t_cat[:, r * t_dim:(r + 1) * t_dim]
            for q in range(sx.shape[2]):
                keys = torch.ones(sx.shape[2], dtype=torch.bool) if attn_mask is None else attn_mask[b, 0, q]
                if not keys.any():
                    continue
                s_logits = s_r[keys] @ s_r[q] / math.sqrt(s_dim)
                t_logits = t_r[keys] @ t_r[q] / math.sqrt(t_dim)
                rows.append(F.kl_div(s_logits.log_softmax(0), t_logits.softmax(0), reduction="sum"))
    return torch.stack(rows).mean()


@pytest.mark.parametrize("masked", [False, True])
def test_relation_kl_with_different_head_counts(masked):
    torch.manual_seed(0)
    _, attn_mask = text_masks()
    attn_mask = attn_mask if masked else None
    sx, tx = torch.randn(3, 3, 6, 4), torch.randn(3, 2, 6, 4) * 2  # widths 12 and 8
    for heads in (1, 2, 4):  # 4 relation heads cut across the student's 3 heads
        close(losses.relation_kl(sx, tx, heads, attn_mask), relation_reference(sx, tx, heads, attn_mask))
    with pytest.raises(ValueError, match="relation_heads=3"):
        losses.relation_kl(sx, tx, 3, attn_mask)


def test_relation_kl_ignores_padded_tokens():
    torch.manual_seed(0)
    token_mask, attn_mask = text_masks()
    sx = torch.randn(3, 3, 6, 4)
    tx = torch.randn(3, 2, 6, 4)
    keep = token_mask[:, None, :, None]
    exact(losses.relation_kl(garbage(sx, keep), garbage(tx, keep), 4, attn_mask),
          losses.relation_kl(sx, tx, 4, attn_mask))
    assert_masked_grad_is_zero(lambda x: losses.relation_kl(x, garbage(tx, keep), 4, attn_mask),
                               garbage(sx, keep), keep)


def test_rep_terms_match_textbook_definitions():
    torch.manual_seed(0)
    s, t = torch.randn(5, 8), torch.randn(5, 8) * 3
    s_hat, t_hat = s / s.norm(dim=1, keepdim=True), t / t.norm(dim=1, keepdim=True)
    close(losses.rep_l1(s, t, normalize=True), F.l1_loss(s_hat, t_hat))
    close(losses.rep_l1(s, t, normalize=False), F.l1_loss(s, t))
    close(losses.rep_mse(s, t, normalize=True), F.mse_loss(s_hat, t_hat))
    close(losses.rep_mse(s, t, normalize=False), F.mse_loss(s, t))
    close(losses.rep_cos(s, t), (1 - (s_hat * t_hat).sum(1)).mean())
    tau = 2.0
    expected = F.kl_div((s / tau).log_softmax(1), (t / tau).softmax(1), reduction="batchmean") * tau ** 2
    close(losses.rep_kl(s, t, tau), expected)


def test_rep_relation_excludes_self_similarity():
    torch.manual_seed(0)
    s, t = torch.randn(5, 8), torch.randn(5, 6)  # widths may differ: only in-batch similarities
    tau = 0.5
    per_row = []
    for i in range(5):
        others = [j for j in range(5) if j != i]
        s_logits = torch.stack([F.cosine_similarity(s[i], s[j], dim=0) for j in others]) / tau
        t_logits = torch.stack([F.cosine_similarity(t[i], t[j], dim=0) for j in others]) / tau
        per_row.append(F.kl_div(s_logits.log_softmax(0), t_logits.softmax(0), reduction="sum"))
    per_row = torch.stack(per_row)
    close(losses.rep_relation(s, t, tau), per_row.mean())
    rows = torch.tensor([4, 1])
    close(losses.rep_relation(s, t, tau, rows=rows), per_row[rows].mean())


def test_vit_kd_matches_vitkd_reduction():
    torch.manual_seed(0)
    batch, tokens, width = 2, 5, 4
    shallow_s = [torch.randn(batch, tokens, width) for _ in range(2)]
    shallow_t = [torch.randn(batch, tokens, width) for _ in range(2)]
    generated, deep_t = torch.randn(batch, tokens, width), torch.randn(batch, tokens, width)
    mask = torch.tensor([[False, True, False, True, True], [False, False, True, False, False]])
    alpha, beta = 0.3, 0.7
    mimic = sum(((s[b, n] - t[b, n]) ** 2).sum() for s, t in zip(shallow_s, shallow_t)
                for b in range(batch) for n in range(tokens)) / batch
    masked = [(b, n) for b in range(batch) for n in range(tokens) if mask[b, n]]
    ratio = len(masked) / (batch * tokens)
    generation = sum(((generated[b, n] - deep_t[b, n]) ** 2).sum() for b, n in masked) / batch / ratio
    expected = alpha * mimic + beta * generation
    close(losses.vit_kd(shallow_s, shallow_t, generated, deep_t, mask, alpha, beta), expected)
    keep = mask[..., None]
    dirty = garbage(generated, keep), garbage(deep_t, keep)
    exact(losses.vit_kd(shallow_s, shallow_t, *dirty, mask, alpha, beta),
          losses.vit_kd(shallow_s, shallow_t, generated, deep_t, mask, alpha, beta))
    nothing = torch.zeros_like(mask)
    close(losses.vit_kd(shallow_s, shallow_t, generated, deep_t, nothing, alpha, beta), alpha * mimic)


# --------------------------------------------------------------------------- heads

def test_projection_is_identity_for_equal_widths():
    x = torch.randn(3, 4)
    exact(Projection(4, 4)(x), x)
    assert Projection(4, 6)(x).shape == (3, 6)


def test_random_token_mask_counts_and_reproducibility():
    mask = random_token_mask(4, 3, 0.5, torch.Generator().manual_seed(1))
    assert mask.shape == (4, 10) and mask.dtype == torch.bool
    assert not mask[:, 0].any()
    assert (mask[:, 1:].sum(1) == 9 - int(9 * 0.5)).all()  # ViTKD's count: 9 − ⌊4.5⌋ = 5
    exact(mask, random_token_mask(4, 3, 0.5, torch.Generator().manual_seed(1)))
    assert not torch.equal(mask, random_token_mask(4, 3, 0.5, torch.Generator().manual_seed(2)))
    with pytest.raises(ValueError, match="mask ratio"):
        random_token_mask(4, 3, 1.5, torch.Generator())


def test_vitkd_generator_uses_mask_token_and_convolves_the_grid():
    torch.manual_seed(0)
    gen = ViTKDGenerator(4, 6, grid=3)
    tokens = torch.randn(2, 10, 4)
    mask = random_token_mask(2, 3, 0.5, torch.Generator().manual_seed(0))
    out = gen(tokens, mask)
    assert out.shape == (2, 10, 6)
    # the class token is only projected; compared with the projection of the same (2, 10, 4)
    # batch, as a matmul over a slice's shape may round differently (BLAS picks kernels by shape)
    exact(out[:, 0], gen.align(tokens)[:, 0])
    # masked student tokens are replaced: their values cannot matter
    exact(gen(garbage(tokens, ~mask[..., None]), mask), out)
    # patches: mask token substitution then conv → ReLU → conv over the 3×3 grid
    x = gen.align(tokens[:, 1:])
    x = torch.where(mask[:, 1:, None], gen.mask_token, x).transpose(1, 2).reshape(2, 6, 3, 3)
    conv1, _, conv2 = gen.generation
    hidden = F.conv2d(x, conv1.weight, conv1.bias, padding=1).relu()
    expected = F.conv2d(hidden, conv2.weight, conv2.bias, padding=1)
    close(out[:, 1:], expected.flatten(2).transpose(1, 2))
    with pytest.raises(ValueError, match="expects 10 tokens"):
        gen(torch.randn(2, 9, 4), mask[:, :9])


# --------------------------------------------------------------------------- stage 2

ROWS = torch.tensor([3, 0, 2])  # unordered, a strict subset of every test batch


def per_row_ce(logits: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits, torch.arange(logits.shape[0]), reduction="none")


def per_row_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    return F.kl_div(student_logits.log_softmax(1), teacher_logits.softmax(1), reduction="none").sum(1)


def unit(x: torch.Tensor) -> torch.Tensor:
    return x / x.norm(dim=-1, keepdim=True)


def embeddings(width: int = 8) -> list[torch.Tensor]:
    torch.manual_seed(0)
    return [torch.randn(5, width) for _ in range(2)] + [torch.randn(5, 6) for _ in range(2)]


def test_contrastive_loss_is_clip_infonce():
    image, text, _, _ = embeddings()
    scale = torch.tensor(10.0)
    logits = scale * unit(image) @ unit(text).T
    rows_loss = (per_row_ce(logits) + per_row_ce(logits.T)) / 2
    close(losses.contrastive_loss(image, text, scale), rows_loss.mean())
    close(losses.contrastive_loss(image, text, scale),
          (F.cross_entropy(logits, torch.arange(5)) + F.cross_entropy(logits.T, torch.arange(5))) / 2)
    close(losses.contrastive_loss(image, text, scale, rows=ROWS), rows_loss[ROWS].mean())


def test_affinity_loss_per_direction():
    s_image, s_text, t_image, t_text = embeddings()
    scale = 50.0
    s_logits = scale * unit(s_image) @ unit(s_text).T
    t_logits = scale * unit(t_image) @ unit(t_text).T
    i2t, t2i = per_row_kl(s_logits, t_logits), per_row_kl(s_logits.T, t_logits.T)
    got_i2t, got_t2i = losses.affinity_loss(s_image, s_text, t_image, t_text, scale)
    close(got_i2t, F.kl_div(s_logits.log_softmax(1), t_logits.softmax(1), reduction="batchmean"))
    close(got_t2i, t2i.mean())
    got_i2t, got_t2i = losses.affinity_loss(s_image, s_text, t_image, t_text, scale, rows=ROWS)
    close(got_i2t, i2t[ROWS].mean())
    close(got_t2i, t2i[ROWS].mean())


def test_fd_loss_is_mse_of_normalised_embeddings():
    s, _, t, _ = embeddings(width=6)
    close(losses.fd_loss(s, t), ((unit(s) - unit(t)) ** 2).sum(1).mean() / 6)


def test_icl_loss_student_against_teacher_other_modality():
    s_image, s_text, t_image, t_text = embeddings(width=6)
    scale = torch.tensor(7.0)
    i2t = per_row_ce(scale * unit(s_image) @ unit(t_text).T)
    t2i = per_row_ce(scale * unit(s_text) @ unit(t_image).T)
    close(losses.icl_loss(s_image, s_text, t_image, t_text, scale), (i2t.mean() + t2i.mean()) / 2)
    close(losses.icl_loss(s_image, s_text, t_image, t_text, scale, rows=ROWS),
          (i2t[ROWS].mean() + t2i[ROWS].mean()) / 2)


# --------------------------------------------------------------------------- FILIP

def filip_inputs():
    torch.manual_seed(0)
    image = torch.randn(5, 4, 3)
    text = torch.randn(4, 6, 3)
    image_mask = torch.tensor([[True] * 4, [True, True, False, False], [True] * 4,
                               [True, False, False, False], [True] * 4])
    text_mask = text_masks([6, 3, 1, 4])[0]
    return image, text, image_mask, text_mask


def filip_reference(image, text, image_mask, text_mask, topk=0):
    """FILIP similarities by a loop over every (image, text) pair of real tokens."""
    def average(maxima):
        if topk:
            maxima = maxima.sort(descending=True).values[:topk]
        return maxima.mean()

    i2t = torch.zeros(image.shape[0], text.shape[0])
    t2i = torch.zeros(image.shape[0], text.shape[0])
    for i in range(image.shape[0]):
        for j in range(text.shape[0]):
            sim = unit(image[i][image_mask[i]]) @ unit(text[j][text_mask[j]]).T
            i2t[i, j] = average(sim.max(dim=1).values)
            t2i[i, j] = average(sim.max(dim=0).values)
    return i2t, t2i


@pytest.mark.parametrize("topk", [0, 2])
def test_filip_similarity_matches_loops(topk):
    image, text, image_mask, text_mask = filip_inputs()
    expected = filip_reference(image, text, image_mask, text_mask, topk)
    for got, want in zip(losses.filip_similarity(image, text, image_mask, text_mask, topk=topk), expected):
        close(got, want)


def test_filip_topk_zero_and_large_topk_are_the_plain_mean():
    image, text, image_mask, text_mask = filip_inputs()
    plain = losses.filip_similarity(image, text, image_mask, text_mask, topk=0)
    for got, want in zip(losses.filip_similarity(image, text, image_mask, text_mask, topk=6), plain):
        close(got, want)
    no_mask = losses.filip_similarity(image, text, None, text_mask)
    all_real = losses.filip_similarity(image, text, torch.ones(5, 4, dtype=torch.bool), text_mask)
    for got, want in zip(no_mask, all_real):
        exact(got, want)


@pytest.mark.parametrize("chunk", [1, 2, 3])
def test_filip_chunks_equal_one_block_with_gradients(chunk):
    image, text, image_mask, text_mask = filip_inputs()

    def run(chunk_size):
        im, tx = image.clone().requires_grad_(), text.clone().requires_grad_()
        i2t, t2i = losses.filip_similarity(im, tx, image_mask, text_mask, topk=2, chunk=chunk_size)
        weights = torch.arange(20.0).view(5, 4)  # every entry counts, each differently
        ((i2t * weights).sum() + (t2i * weights.flip(0)).sum()).backward()
        return i2t, t2i, im.grad, tx.grad

    for got, want in zip(run(chunk), run(64)):
        close(got, want)


def test_filip_ignores_padding():
    image, text, image_mask, text_mask = filip_inputs()
    scale = torch.tensor(5.0)
    clean = losses.filip_similarity(image, text, image_mask, text_mask)
    dirty = losses.filip_similarity(garbage(image, image_mask[..., None]),
                                    garbage(text, text_mask[..., None]), image_mask, text_mask)
    for got, want in zip(dirty, clean):
        exact(got, want)
    square = [sim[:4] for sim in clean]
    exact(losses.filip_loss(*[sim[:4] for sim in dirty], scale), losses.filip_loss(*square, scale))
    dirty_image = garbage(image, image_mask[..., None])[:4]
    def loss(x):
        return losses.filip_loss(*losses.filip_similarity(dirty_image, x, image_mask[:4], text_mask), scale)

    assert_masked_grad_is_zero(loss, garbage(text, text_mask[..., None]), text_mask[..., None])


def test_filip_loss_and_distill_per_direction():
    torch.manual_seed(0)
    s_i2t, s_t2i, t_i2t, t_t2i = (torch.rand(5, 5) * 2 - 1 for _ in range(4))
    scale = torch.tensor(8.0)
    ce = (per_row_ce(scale * s_i2t) + per_row_ce(scale * s_t2i.T)) / 2
    close(losses.filip_loss(s_i2t, s_t2i, scale), ce.mean())
    close(losses.filip_loss(s_i2t, s_t2i, scale, rows=ROWS), ce[ROWS].mean())
    i2t = per_row_kl(scale * s_i2t, scale * t_i2t)
    t2i = per_row_kl(scale * s_t2i.T, scale * t_t2i.T)
    close(losses.filip_distill_loss(s_i2t, s_t2i, t_i2t, t_t2i, scale), (i2t.mean() + t2i.mean()) / 2)
    close(losses.filip_distill_loss(s_i2t, s_t2i, t_i2t, t_t2i, scale, rows=ROWS),
          (i2t[ROWS].mean() + t2i[ROWS].mean()) / 2)


# --------------------------------------------------------------------------- every term

def every_term():
    """(name, loss of a dict of tensors, the tensors): all terms, masked where they take masks."""
    torch.manual_seed(0)
    token_mask, attn_mask = text_masks()
    image, text, image_mask, text_mask = filip_inputs()
    vit_mask = random_token_mask(2, 2, 0.5, torch.Generator().manual_seed(0))
    r = torch.randn
    emb = {"si": r(5, 8), "st": r(5, 8), "ti": r(5, 6), "tt": r(5, 6), "scale": torch.tensor(10.0)}

    def filip_sims(x):
        return losses.filip_similarity(x["image"], x["text"], image_mask, text_mask, topk=2, chunk=2)

    def filip_distill(x):
        s_sims = [s[:4] for s in filip_sims(x)]
        return losses.filip_distill_loss(*s_sims, *[s.detach() * 0.5 for s in s_sims], x["scale"], ROWS)

    return [
        ("hidden_mse", lambda x: losses.hidden_mse(x["s"], x["t"], token_mask),
         {"s": r(3, 6, 8), "t": r(3, 6, 8)}),
        ("attention_scores_mse", lambda x: losses.attention_scores_mse(x["s"], x["t"], attn_mask),
         {"s": r(3, 2, 6, 6), "t": r(3, 2, 6, 6)}),
        ("attention_probs_kl", lambda x: losses.attention_probs_kl(x["s"].softmax(-1), x["t"], attn_mask),
         {"s": r(3, 2, 6, 6), "t": causal_probs(r(3, 2, 6, 6))}),
        ("relation_kl", lambda x: losses.relation_kl(x["s"], x["t"], 4, attn_mask),
         {"s": r(3, 3, 6, 4), "t": r(3, 2, 6, 4)}),
        ("rep_l1", lambda x: losses.rep_l1(x["si"], x["ti"][:, :4].repeat(1, 2)), emb),
        ("rep_mse", lambda x: losses.rep_mse(x["si"], x["ti"][:, :4].repeat(1, 2), False), emb),
        ("rep_cos", lambda x: losses.rep_cos(x["si"], x["st"]), emb),
        ("rep_kl", lambda x: losses.rep_kl(x["si"], x["st"], 2.0), emb),
        ("rep_relation", lambda x: losses.rep_relation(x["si"], x["ti"], 0.1, ROWS), emb),
        ("vit_kd", lambda x: losses.vit_kd([x["s"]], [x["t"]], x["s"] * 2, x["t"], vit_mask, 0.5, 0.25),
         {"s": r(2, 5, 4), "t": r(2, 5, 4)}),
        ("contrastive", lambda x: losses.contrastive_loss(x["si"], x["st"], x["scale"], ROWS), emb),
        ("affinity",
         lambda x: sum(losses.affinity_loss(x["si"], x["st"], x["ti"], x["tt"], 50.0, ROWS)), emb),
        ("fd", lambda x: losses.fd_loss(x["si"], x["st"]), emb),
        ("icl", lambda x: losses.icl_loss(x["si"], x["st"], x["ti"][:, :4].repeat(1, 2),
                                          x["tt"][:, :4].repeat(1, 2), x["scale"], ROWS), emb),
        ("filip", lambda x: losses.filip_loss(*[s[:4] for s in filip_sims(x)], x["scale"]),
         {"image": image, "text": text, "scale": torch.tensor(5.0)}),
        ("filip_distill", filip_distill, {"image": image, "text": text, "scale": torch.tensor(5.0)}),
    ]


TERMS = every_term()


@pytest.mark.parametrize("name,loss,inputs", TERMS, ids=[t[0] for t in TERMS])
def test_gradients_are_finite(name, loss, inputs):
    inputs = {k: v.clone().requires_grad_() for k, v in inputs.items()}
    value = loss(inputs)
    assert value.shape == () and torch.isfinite(value)
    value.backward()
    grads = [v.grad for v in inputs.values() if v.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    assert any(g.abs().sum() > 0 for g in grads)


@pytest.mark.parametrize("name,loss,inputs", TERMS, ids=[t[0] for t in TERMS])
def test_bf16_inputs_are_reduced_in_fp32(name, loss, inputs):
    low = {k: v.bfloat16() for k, v in inputs.items()}
    value = loss(low)
    assert value.dtype == torch.float32 and value.shape == ()
    close(value, loss({k: v.float() for k, v in low.items()}), tol=1e-4)
