"""The table of loss terms (distill/config.py) is the one place a term is declared, and
distill/terms.py implements each declared term once, by name: the config, both objectives and
recipe validation all follow them."""

from __future__ import annotations

import ast
import dataclasses
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from tinyclip_ds.config import RecipeError
from tinyclip_ds.distill import config as config_module
from tinyclip_ds.distill import terms as terms_module
from tinyclip_ds.distill.config import TERMS, LossConfig, Term, active_terms, weight
from tinyclip_ds.distill.objectives import Stage1Objective, Stage2Objective
from tinyclip_ds.distill.terms import IMPLEMENTATIONS, Implementation
from tinyclip_ds.models.transformer import Request, TowerShape, VisionTower
from tinyclip_ds.recipe import load_recipe, validate


def weight_fields() -> set[str]:
    """The `LossConfig` fields that weight a loss term (their description says so)."""
    return {f.name for f in dataclasses.fields(LossConfig) if f.metadata["help"].startswith("weight of ")}


def test_every_weight_field_has_a_row_and_every_row_a_field():
    assert weight_fields() == set(TERMS)
    assert all(name == term.name for name, term in TERMS.items())


def test_every_declared_term_has_one_implementation_and_every_implementation_a_row():
    assert set(IMPLEMENTATIONS) == set(TERMS)
    assert all(callable(implementation.compute) for implementation in IMPLEMENTATIONS.values())


def test_the_declarations_need_no_torch_and_the_implementations_no_objectives():
    """Recipe validation reads the declarations without torch; the objectives import the
    implementations, never the other way round (not even for type hints)."""

    def imported(module) -> set[str]:
        tree = ast.parse(Path(module.__file__).read_text(encoding="utf-8"))
        return ({alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
                | {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)})

    assert not {name for name in imported(config_module) if name.split(".")[0] == "torch"}
    assert "tinyclip_ds.distill.objectives" not in imported(terms_module)


def test_every_row_is_well_formed():
    flags = {f.name for f in dataclasses.fields(Request) if f.type in (bool, "bool")}
    for name, term in TERMS.items():
        assert term.stage in ("stage1", "stage2"), name
        assert set(term.towers) <= {"image", "text"} and term.towers, name
        assert set(term.request) <= flags, name
        weight_range = LossConfig.__dataclass_fields__[name].metadata["range"]
        assert weight_range.low == 0 and -1.0 not in weight_range, name


def test_active_terms_follow_the_table_order_and_the_stage():
    cfg = LossConfig(rep_l1=2.0, contrastive=1.0, emb=0.5, filip=0.0)
    assert list(active_terms(cfg, "stage1").items()) == [("emb", 0.5), ("rep_l1", 2.0)]
    assert active_terms(cfg, "stage2") == {"contrastive": 1.0}


@dataclasses.dataclass
class ProbeLoss(LossConfig):
    """LossConfig with the weight fields of the synthetic rows below."""

    probe: float = weight("the probe")
    probe2: float = weight("the second probe")


def _probe(o, s, t, mask_seed):
    return (s.hidden[o.layer_pairs[-1][0]] - t.hidden[o.layer_pairs[-1][1]]).pow(2).mean()


@pytest.fixture
def probe_rows(monkeypatch):
    """Two terms that exist only as rows of the tables: an image-only stage-1 term asking for
    hidden states, and a stage-2 term asking for student tokens and no teacher."""
    monkeypatch.setitem(TERMS, "probe", Term("probe", "stage1", request=("hidden",), towers=("image",),
                                             one_to_one="tokens"))
    monkeypatch.setitem(IMPLEMENTATIONS, "probe", Implementation(_probe))
    monkeypatch.setitem(TERMS, "probe2", Term("probe2", "stage2", request=("tokens",), teacher=False))
    monkeypatch.setitem(IMPLEMENTATIONS, "probe2", Implementation(lambda b: b.s.image_tokens[b.rows].mean()))
    assert config_module.TERMS is TERMS and terms_module.IMPLEMENTATIONS is IMPLEMENTATIONS


def test_a_row_alone_drives_the_stage1_objective(probe_rows):
    shape = TowerShape(width=32, layers=3, heads=4, mlp_width=64, output_dim=16, image_size=16, patch_size=8)
    torch.manual_seed(0)
    student, teacher = VisionTower(shape), VisionTower(shape)
    pairs = [(0, 0), (2, 2)]
    cfg = ProbeLoss(probe=0.25, rep_cos=1.0)
    objective = Stage1Objective(cfg, "image", shape, shape, pairs, "student.image")
    assert objective.terms == {"rep_cos": 1.0, "probe": 0.25}
    assert objective.student_request == Request(layers=(0, 2), hidden=True)
    assert objective.teacher_request == Request(layers=(0, 2), hidden=True)
    images = torch.randn(3, 3, 16, 16)
    s, t = student(images, objective.student_request), teacher(images, objective.teacher_request)
    total, values = objective(s, t)
    assert list(values) == ["rep_cos", "probe"]
    assert torch.equal(values["probe"], _probe(objective, s, t, 0)) and values["probe"] > 0
    torch.testing.assert_close(total, values["rep_cos"] + 0.25 * values["probe"])
    with pytest.raises(RecipeError, match=r"^'loss.probe' applies to the image tower only$"):
        Stage1Objective(cfg, "text", shape, shape, pairs, "student.text")
    with pytest.raises(RecipeError, match=r"loss terms probe compare tokens one to one"):
        Stage1Objective(cfg, "image", shape, shape.replace(patch_size=4), pairs, "student.image")


def test_a_row_alone_drives_the_stage2_objective(probe_rows):
    objective = Stage2Objective(ProbeLoss(probe2=2.0))
    assert objective.terms == {"probe2": 2.0}
    assert (objective.student_tokens, objective.teacher_tokens, objective.needs_teacher) == (True, False, False)
    s = SimpleNamespace(image=torch.randn(4, 8), text=torch.randn(4, 8), image_tokens=torch.randn(4, 3, 8))
    rows = torch.tensor([1, 2])
    total, values = objective(s, None, torch.tensor(10.0), rows)
    expected = s.image_tokens[rows].mean()
    assert list(values) == ["probe2"]
    torch.testing.assert_close(values["probe2"], 0.5 * expected)
    torch.testing.assert_close(total, 0.5 * 2.0 * expected)


def test_a_row_alone_drives_recipe_validation(request):
    text_recipe, image_recipe = load_recipe(None, stage="stage1_text"), load_recipe(None, stage="stage1_image")
    request.getfixturevalue("probe_rows")  # after loading: the demo recipes' LossConfig has no probe fields
    text_recipe.loss = ProbeLoss(rep_cos=1.0, probe=1.0)
    with pytest.raises(RecipeError, match=r"'loss.probe' applies to the image tower only; use it in a "
                                          r"stage1_image recipe"):
        validate(text_recipe)
    text_recipe.loss = ProbeLoss(rep_cos=1.0, probe2=1.0)
    with pytest.raises(RecipeError, match=r"loss.probe2 need paired data and both towers: they are stage2 "
                                          r"terms, not stage1_text terms"):
        validate(text_recipe)
    image_recipe.loss = ProbeLoss(probe=1.0)  # the only term switched on is a table-only one: accepted
    validate(image_recipe)
