"""Text towers run on ids cut after the batch's longest text (`TextTower.trim_padding`): every
output a loss reads is what the whole context gives. (The stage-2 gradient with micro-batches
cut to different lengths, and cut to one length for FILIP, is checked in
test_large_batch_equivalence.py.)"""

from __future__ import annotations

import pytest
import torch

from tinyclip_ds.distill.config import TERMS, LossConfig
from tinyclip_ds.distill.objectives import Stage1Objective, Stage2Objective
from tinyclip_ds.models.transformer import Request, TextTower, TowerShape, VisionTower
from tinyclip_ds.train.contrastive import Features
from tinyclip_ds.train.stage2 import step_text_length, tower_ids

VOCAB, CONTEXT = 60, 20


def text_ids(lengths: list[int], eot_id: int, pad_id: int) -> torch.Tensor:
    """Start token, random words, the end-of-text token at ``length - 1``, then padding."""
    generator = torch.Generator().manual_seed(0)
    ids = torch.full((len(lengths), CONTEXT), pad_id)
    for row, length in enumerate(lengths):
        ids[row, :length - 1] = torch.randint(1, VOCAB - 2, (length - 1,), generator=generator)
        ids[row, length - 1] = eot_id
    return ids


def towers(eot_token_id: int | None) -> tuple[TextTower, TextTower]:
    torch.manual_seed(0)
    teacher = TextTower(TowerShape(width=32, layers=4, heads=4, mlp_width=64, output_dim=16,
                                   vocab_size=VOCAB, context_length=CONTEXT, eot_token_id=eot_token_id))
    student = TextTower(TowerShape(width=24, layers=2, heads=4, mlp_width=48, output_dim=16,
                                   vocab_size=VOCAB, context_length=CONTEXT, eot_token_id=eot_token_id))
    return teacher.eval(), student.eval()


# OpenAI / open_clip: pooled at the largest id, padding 0; Hugging Face: pooled at the first
# eos id, whose tokenizer pads with that same id.
@pytest.mark.parametrize("eot_token_id, eot_id, pad_id", [(None, VOCAB - 1, 0), (VOCAB - 1, VOCAB - 1, VOCAB - 1)])
def test_every_stage1_text_term_and_the_embedding_are_unchanged(eot_token_id, eot_id, pad_id):
    teacher, student = towers(eot_token_id)
    ids = text_ids([5, 3, 9, 7], eot_id, pad_id)
    trimmed = teacher.trim_padding(ids)
    assert trimmed.shape == (4, 9) and torch.equal(trimmed, ids[:, :9])

    names = [name for name, term in TERMS.items() if term.stage == "stage1" and "text" in term.towers]
    objective = Stage1Objective(LossConfig(**{name: 1.0 for name in names}), "text", teacher.shape,
                                student.shape, [(0, 1), (1, 3)], "student.text")
    assert set(objective.terms) == set(names) and len(names) >= 10
    with torch.no_grad():
        full_teacher = teacher(ids, objective.teacher_request)
        full_student = student(ids, objective.student_request)
        cut_teacher = teacher(trimmed, objective.teacher_request)
        cut_student = student(trimmed, objective.student_request)
        _, full = objective(full_student, full_teacher)
        _, cut = objective(cut_student, cut_teacher)
    for name in names:
        assert full[name] > 0, name
        torch.testing.assert_close(cut[name], full[name], rtol=1e-5, atol=1e-7, msg=name)
    torch.testing.assert_close(cut_teacher.embedding, full_teacher.embedding, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(cut_student.embedding, full_student.embedding, rtol=1e-5, atol=1e-6)


def test_nothing_to_cut():
    teacher, _ = towers(None)
    full = text_ids([CONTEXT, 4], VOCAB - 1, 0)
    assert torch.equal(teacher.trim_padding(full), full)
    empty = torch.zeros(0, 1, dtype=torch.long)
    assert teacher.trim_padding(empty) is empty


def test_cutting_into_a_text_changes_its_embedding():
    """The control: one column fewer than `trim_padding` keeps loses the longest text's EOT."""
    teacher, _ = towers(None)
    ids = text_ids([5, 9], VOCAB - 1, 0)
    with torch.no_grad():
        full = teacher(ids).embedding
        short = teacher(ids[:, :8]).embedding
    torch.testing.assert_close(short[0], full[0], rtol=1e-5, atol=1e-6)
    assert (short[1] - full[1]).abs().max() > 1e-3


def test_token_wise_terms_are_unchanged_at_the_steps_common_length():
    """FILIP and its distillation read every text token up to each text's end: cut to the step's
    longest text (`step_text_length`, here one rank), they give the whole context's values."""
    teacher_text, student_text = towers(None)
    torch.manual_seed(0)
    vision = VisionTower(TowerShape(width=24, layers=1, heads=4, mlp_width=48, output_dim=16, image_size=16,
                                    patch_size=8)).eval()
    objective = Stage2Objective(LossConfig(filip=1.0, filip_distill=1.0))
    micro_batches = [text_ids([5, 3], VOCAB - 1, 0), text_ids([9, 7], VOCAB - 1, 0)]
    length = step_text_length(micro_batches, teacher_text, objective, torch.device("cpu"))
    assert length == 9 and step_text_length(micro_batches, teacher_text, Stage2Objective(
        LossConfig(contrastive=1.0)), torch.device("cpu")) is None
    images = torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(1))

    def values(ids: torch.Tensor) -> dict[str, torch.Tensor]:
        request = Request(tokens=True)
        with torch.no_grad():
            image = vision(images, request)
            student, teacher = student_text(ids, request), teacher_text(ids, request)
        s = Features(image.embedding, student.embedding, image.tokens, student.tokens, student.token_mask)
        t = Features(image.embedding, teacher.embedding, image.tokens, teacher.tokens, teacher.token_mask)
        return objective(s, t, torch.tensor(10.0), torch.arange(4))[1]

    full = values(torch.cat(micro_batches))
    cut = values(torch.cat([tower_ids(ids, teacher_text, length) for ids in micro_batches]))
    assert cut.keys() == full.keys() == {"filip", "filip_distill"}
    for name, value in full.items():
        assert value > 0, name
        torch.testing.assert_close(cut[name], value, rtol=1e-5, atol=1e-7, msg=name)
