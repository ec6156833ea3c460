"""`tinyclip-ds speed`: FLOPs are PyTorch's FlopCounterMode count of the tower's real forward
(attention included), consistent with the shapes (depth, weight sharing); the JSON has the
documented fields; a missing teacher file is a one-line error; --teacher-shape builds the
architecture from an open_clip model config. Timings are measured but never asserted."""

from __future__ import annotations

import json

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from tinyclip_ds.cli import main
from tinyclip_ds.config import PROJECT_ROOT
from tinyclip_ds.models.transformer import TextTower, TowerShape, VisionTower
from tinyclip_ds.recipe import load_recipe
from tinyclip_ds.speed import build_models, build_teacher, count_flops, example_input, parameter_counts

DEMO_STAGE2 = str(PROJECT_ROOT / "recipes" / "demo" / "stage2.yaml")
GRID_R2 = str(PROJECT_ROOT / "recipes" / "openai_vit_b32" / "grid" / "stage1_image_w768-l4-h24-r2.yaml")
FAST = ["--batch-size", "2", "--warmup", "0", "--repeats", "1", "--threads", "1"]

VISION = TowerShape(width=32, layers=2, heads=4, mlp_width=128, output_dim=16, image_size=32, patch_size=8)
TEXT = TowerShape(width=24, layers=2, heads=3, mlp_width=96, output_dim=16, vocab_size=50,
                  context_length=10)


def direct_count(tower, inputs) -> int:
    """FlopCounterMode around the tower's forward, as a user would write it (math attention,
    whose matrix products the counter knows)."""
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        tower(inputs)
    return counter.get_total_flops()


def by_hand(shape: TowerShape, tokens: int, embed: int) -> int:
    """2 FLOPs per multiply-add of every matrix product: per effective layer qkv, out, MLP and
    the two attention products; plus the input convolution (``embed``) and the projection."""
    w, m = shape.width, shape.mlp_width
    layer = 2 * tokens * (3 * w * w + w * w + 2 * w * m) + 2 * 2 * tokens * tokens * w
    return embed + shape.depth * layer + 2 * w * shape.output_dim


@pytest.mark.parametrize("kind", ["image", "text"])
def test_flops_are_flop_counter_mode_of_the_forward(kind):
    torch.manual_seed(0)
    tower = VisionTower(VISION) if kind == "image" else TextTower(TEXT)
    inputs = example_input(tower, 1)
    counted = count_flops(tower, inputs)
    assert counted == direct_count(tower, inputs)
    if kind == "image":
        tokens, embed = VISION.grid ** 2 + 1, 2 * 3 * 8 * 8 * VISION.width * VISION.grid ** 2
        assert counted == by_hand(VISION, tokens, embed)
    else:  # the token embedding is a lookup: no FLOPs
        assert counted == by_hand(TEXT, TEXT.context_length, 0)


def test_flops_follow_depth_and_weight_sharing():
    flops = {layers: count_flops(t, example_input(t, 1))
             for layers, t in ((n, VisionTower(VISION.replace(layers=n))) for n in (1, 2, 4))}
    # Every layer costs the same: doubling the depth doubles the layers' share.
    assert flops[4] - flops[2] == 2 * (flops[2] - flops[1])
    assert 1.8 < flops[4] / flops[2] <= 2.0
    shared = VisionTower(VISION.replace(layers=2, repeat=2))
    unrolled = VisionTower(VISION.replace(layers=4))
    plain = VisionTower(VISION.replace(layers=2))
    assert count_flops(shared, example_input(shared, 1)) == flops[4]
    stored, as_unrolled = parameter_counts(shared)
    norms = 2 * 2 * 2 * VISION.width            # two more effective layers' two LayerNorms (weight, bias)
    assert stored == parameter_counts(plain)[0] + norms
    assert as_unrolled == parameter_counts(unrolled)[0] == parameter_counts(unrolled)[1]
    assert stored < as_unrolled


def test_report_json(tmp_path, capsys):
    out = tmp_path / "speed.json"
    assert main(["speed", DEMO_STAGE2, *FAST, "--out", str(out)]) == 0
    table = capsys.readouterr().out
    assert "speed-up" in table and "FlopCounterMode" in table
    report = json.loads(out.read_text())
    assert {"source", "recipe", "stage", "trained_towers", "teacher_source", "student_weights",
            "settings", "teacher", "student", "ratio"} <= set(report)
    assert set(report["settings"]) == {"device", "device_name", "precision", "threads", "batch_size",
                                       "warmup", "repeats", "torch"}
    assert report["settings"]["threads"] == 1 and report["settings"]["batch_size"] == 2
    tower_fields = {"params", "params_unrolled", "width", "heads", "layers", "repeat", "depth", "flops",
                    "gflops", "latency_ms", "latency_ms_min", "batch_ms", "throughput"}
    for model in ("teacher", "student"):
        for kind in ("image", "text"):
            assert set(report[model][kind]) == tower_fields
        whole = report[model]["model"]
        assert whole["flops"] == report[model]["image"]["flops"] + report[model]["text"]["flops"]
        assert whole["params"] == report[model]["image"]["params"] + report[model]["text"]["params"]
    for part in ("image", "text", "model"):
        ratio = report["ratio"][part]
        assert set(ratio) == {"params", "gflops", "speedup_latency", "speedup_throughput"}
        assert ratio["params"] == pytest.approx(report["student"][part]["params"] / report["teacher"][part]["params"])
    # The command's count is FlopCounterMode's on the very towers training builds.
    towers, _ = build_models(load_recipe(DEMO_STAGE2))
    for model in ("teacher", "student"):
        for kind in ("image", "text"):
            tower = towers[model][kind]
            assert report[model][kind]["flops"] == direct_count(tower, example_input(tower, 1))
            assert report[model][kind]["params"] == sum(p.numel() for p in tower.parameters())


def test_missing_teacher_file_is_one_line_error(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # the recipe's checkpoints/ViT-B-32.pt is relative to here: absent
    assert main(["speed", GRID_R2, *FAST]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and err[0].startswith("error: teacher.path"), err
    assert "checkpoints/ViT-B-32.pt" in err[0] and "--teacher-shape" in err[0]


def test_unknown_teacher_shape_is_one_line_error(capsys):
    assert main(["speed", DEMO_STAGE2, "--teacher-shape", "ViT-Nope-1", *FAST]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and "--teacher-shape ViT-Nope-1" in err[0], err


def test_teacher_shape_from_open_clip_name():
    with torch.device("meta"):  # the architecture only: nothing allocated
        clip, note = build_teacher(load_recipe(GRID_R2), "ViT-B-32")
    vision, text = clip.visual.shape, clip.text.shape
    assert (vision.width, vision.layers, vision.heads, vision.patch_size, vision.image_size) == (768, 12, 12, 32, 224)
    assert (text.width, text.layers, text.heads, text.context_length) == (512, 12, 8, 77)
    assert "ViT-B-32" in note and "random" in note


def test_teacher_shape_config_with_weight_share_student(tmp_path, monkeypatch):
    config = {"embed_dim": 32,
              "vision_cfg": {"image_size": 32, "layers": 8, "width": 64, "patch_size": 16, "head_width": 16},
              "text_cfg": {"context_length": 16, "vocab_size": 1000, "width": 32, "heads": 2, "layers": 4}}
    (tmp_path / "tiny.json").write_text(json.dumps(config))
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "speed.json"
    assert main(["speed", GRID_R2, "--teacher-shape", "tiny.json", "--set", "student.image.width=48",
                 "--set", "student.image.heads=4", *FAST, "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    image = report["student"]["image"]
    assert (image["layers"], image["repeat"], image["depth"], image["width"]) == (4, 2, 8, 48)
    assert image["params"] < image["params_unrolled"]
    assert report["teacher"]["image"]["depth"] == 8 and report["trained_towers"] == ["image"]
    assert "tiny.json" in report["teacher_source"]
    # Effective depth 8 at width 48 against the teacher's 8 at width 64: FLOPs scale with width.
    assert 0.4 < report["ratio"]["image"]["gflops"] < 0.7


def test_checkpoint_student_weights_are_used(tmp_path):
    """A checkpoint directory brings its recipe and its student weights (here a ZeRO-0
    checkpoint as the engine saves it: the whole module under ``module``)."""
    from tinyclip_ds.speed import resolve_source
    from tinyclip_ds.train.checkpoint import MARKER
    from tinyclip_ds.train.records import RECIPE

    recipe = load_recipe(DEMO_STAGE2)
    towers, _ = build_models(recipe)
    saved = {f"{kind}.{name}": torch.full_like(value, 0.5 + i)
             for i, kind in enumerate(("image", "text"))
             for name, value in towers["student"][kind].state_dict().items()}
    ck = tmp_path / "step_00000001"
    ck.mkdir()
    torch.save({"module": saved}, ck / "mp_rank_00_model_states.pt")
    (ck / RECIPE).write_text(recipe.to_yaml())
    (ck / MARKER).write_text(json.dumps({"step": 1, "zero_stage": 0}))
    loaded_recipe, checkpoint_path = resolve_source(ck)
    assert checkpoint_path == ck and loaded_recipe.stage == "stage2"
    towers, notes = build_models(loaded_recipe, checkpoint_path=checkpoint_path)
    assert str(ck) in notes["student_weights"]
    for i, kind in enumerate(("image", "text")):
        assert all(torch.equal(v, torch.full_like(v, 0.5 + i)) for v in towers["student"][kind].state_dict().values())
