"""Students: shapes, weight sharing, weight inheritance, frozen embeddings, shipped fragments."""

import itertools
import json
import math

import pytest
import torch
import torch.nn.functional as F

from tinyclip_ds.config import PROJECT_ROOT, RecipeError, build, load_yaml_tree
from tinyclip_ds.models import layer_map
from tinyclip_ds.models.config import StudentConfig, StudentTowerConfig
from tinyclip_ds.models.students import build_student, build_students, student_shape, student_shapes, tower_of
from tinyclip_ds.models.students import shape_differences, shape_record, tower_from_record
from tinyclip_ds.models.transformer import Clip, Request, TowerShape
from tinyclip_ds.recipe import Recipe
from tinyclip_ds.summary import summarize

VISION = TowerShape(width=64, layers=12, heads=4, mlp_width=256, output_dim=32, act="gelu",
                    image_size=32, patch_size=8)
TEXT = TowerShape(width=48, layers=12, heads=4, mlp_width=192, output_dim=32, vocab_size=100,
                  context_length=16, eot_token_id=99)
SHAPES = {"image": VISION, "text": TEXT}


def random_teacher(seed: int = 0) -> Clip:
    """A teacher whose every parameter (LayerNorms and biases included) is random."""
    torch.manual_seed(seed)
    clip = Clip(VISION, TEXT).eval()
    with torch.no_grad():
        for param in clip.parameters():
            param.uniform_(-0.3, 0.3)
    return clip


def student_tower(kind: str, teacher, cfg: StudentTowerConfig, key: str):
    """The tower of `build_student`."""
    return build_student(kind, teacher, cfg, key).tower


def inputs(kind: str, batch: int = 2, length: int = 10):
    torch.manual_seed(1)
    if kind == "image":
        return torch.randn(batch, 3, VISION.image_size, VISION.image_size)
    ids = torch.randint(1, 90, (batch, length))
    ids[:, -3] = 99  # EOT before the end, so padding follows it
    return ids


def count(module) -> int:
    return sum(p.numel() for p in module.parameters())


# --------------------------------------------------------------------------- shapes

def test_student_shape_takes_the_teachers_fields_where_zero():
    cfg = StudentTowerConfig(layers=3, width=32, mlp_ratio=2.5, repeat=2, dropout=0.1)
    shape = student_shape("image", VISION, cfg, "student.image")
    assert (shape.width, shape.layers, shape.heads, shape.mlp_width, shape.repeat) == (32, 3, 4, 80, 2)
    assert (shape.output_dim, shape.act, shape.patch_size, shape.image_size) == (32, "gelu", 8, 32)
    assert (shape.dropout, shape.depth) == (0.1, 6)
    text = student_shape("text", TEXT, StudentTowerConfig(context_length=8, act="quick_gelu",
                                                          output_dim=16), "student.text")
    assert (text.width, text.heads, text.mlp_width, text.context_length) == (48, 4, 192, 8)
    assert (text.act, text.output_dim, text.vocab_size, text.eot_token_id) == ("quick_gelu", 16, 100, 99)


@pytest.mark.parametrize("kind, fields, pattern", [
    ("image", {"width": 48, "heads": 5}, r"'student\.image\.heads' = 5 does not divide the width 48"),
    ("image", {"heads": 3}, r"'student\.image\.heads' = 3 does not divide the width 64"),
    ("image", {"patch_size": 5}, r"'student\.image\.patch_size' = 5 does not divide.*32"),
    ("image", {"context_length": 8}, r"'student\.image\.context_length' applies to the text tower"),
    ("text", {"patch_size": 8}, r"'student\.text\.patch_size' applies to the image tower"),
    ("text", {"context_length": 17}, r"'student\.text\.context_length' = 17 is longer than.*16"),
    ("text", {"width": -8}, r"'student\.text\.width' must be >= 0"),
    ("text", {"mlp_ratio": 0.0}, r"'student\.text\.mlp_ratio'"),
    ("text", {"dropout": 1.0}, r"'student\.text\.dropout'"),
])
def test_student_shape_errors_name_the_key(kind, fields, pattern):
    with pytest.raises(RecipeError, match=pattern):
        student_shape(kind, SHAPES[kind], StudentTowerConfig(**fields), f"student.{kind}")


# --------------------------------------------------------------------------- weight sharing

def expected_parameters(kind: str, s: TowerShape) -> tuple[int, int]:
    """(transformer, whole tower) parameter counts, from the shape alone."""
    w, m = s.width, s.mlp_width
    block = (3 * w * w + 3 * w) + (w * w + w) + (m * w + m) + (w * m + w)
    norms = 2 * (2 * w)  # ln_1 and ln_2, weight and bias
    transformer = s.layers * block + s.layers * s.repeat * norms
    if kind == "image":
        rest = (w * 3 * s.patch_size ** 2 + w + ((s.image_size // s.patch_size) ** 2 + 1) * w
                + 2 * w + 2 * w + w * s.output_dim)
    else:
        rest = s.vocab_size * w + s.context_length * w + 2 * w + w * s.output_dim
    return transformer, transformer + rest


def weight_share_student(kind: str):
    """2 unique blocks, each applied twice: 4 effective layers."""
    cfg = StudentTowerConfig(layers=2, repeat=2, width=32, heads=2, init="random")
    return student_tower(kind, tower_of(random_teacher(), kind), cfg, f"student.{kind}").eval()


@pytest.mark.parametrize("kind", ["image", "text"])
def test_weight_share_counts_unique_blocks_and_per_layer_norms(kind):
    tower = weight_share_student(kind)
    transformer, total = expected_parameters(kind, tower.shape)
    assert (count(tower.transformer), count(tower)) == (transformer, total)
    assert len(tower.transformer.blocks) == 2 and len(tower.transformer.norms) == 4


def reference_layer(x, block, norms, heads: int, act, causal: bool):
    """One pre-LN layer computed with torch's own multi-head attention."""
    w = x.shape[-1]
    h = F.layer_norm(x, (w,), norms.ln_1.weight, norms.ln_1.bias, norms.ln_1.eps).transpose(0, 1)
    mask = torch.ones(x.shape[1], x.shape[1], dtype=torch.bool).triu(1) if causal else None
    attn = F.multi_head_attention_forward(
        h, h, h, w, heads, block.attn.qkv.weight, block.attn.qkv.bias, None, None, False, 0.0,
        block.attn.out.weight, block.attn.out.bias, need_weights=False, attn_mask=mask)[0]
    x = x + attn.transpose(0, 1)
    h = F.layer_norm(x, (w,), norms.ln_2.weight, norms.ln_2.bias, norms.ln_2.eps)
    return x + F.linear(act(F.linear(h, block.mlp.fc.weight, block.mlp.fc.bias)),
                        block.mlp.proj.weight, block.mlp.proj.bias)


@pytest.mark.parametrize("kind", ["image", "text"])
def test_weight_share_runs_every_block_twice(kind):
    tower = weight_share_student(kind)
    x = inputs(kind)
    with torch.no_grad():
        out = tower(x, Request(layers=(0, 1, 2, 3), hidden=True, embeddings=True))
        assert sorted(out.hidden) == [0, 1, 2, 3]
        for a, b in itertools.combinations(range(4), 2):
            assert not torch.allclose(out.hidden[a], out.hidden[b], atol=1e-3)
        previous = tower.ln_pre(out.embeddings) if kind == "image" else out.embeddings
        act = torch.nn.GELU() if kind == "image" else (lambda t: t * torch.sigmoid(1.702 * t))
        for layer in range(4):
            # effective layers 2u and 2u+1 both run unique block u, each with its own norms
            expected = reference_layer(previous, tower.transformer.blocks[layer // 2],
                                       tower.transformer.norms[layer], 2, act, causal=kind == "text")
            torch.testing.assert_close(out.hidden[layer], expected, atol=1e-5, rtol=1e-5)
            previous = out.hidden[layer]


@pytest.mark.parametrize("kind", ["image", "text"])
def test_intermediates_of_selected_effective_layers(kind):
    tower = weight_share_student(kind)
    x = inputs(kind)
    with torch.no_grad():
        every = tower(x, Request(layers=(0, 1, 2, 3), hidden=True))
        out = tower(x, Request(layers=(1, 2), hidden=True, attention=True, qkv=True))
    assert sorted(out.hidden) == sorted(out.attn_probs) == sorted(out.attn_scores) == sorted(out.qkv) == [1, 2]
    batch, n = out.hidden[1].shape[:2]
    for layer in (1, 2):
        torch.testing.assert_close(out.hidden[layer], every.hidden[layer])
        assert out.attn_probs[layer].shape == out.attn_scores[layer].shape == (batch, 2, n, n)
        # q, k, v of effective layer e: block e // 2 applied to norms[e].ln_1 of the layer input
        norms, block = tower.transformer.norms[layer], tower.transformer.blocks[layer // 2]
        fused = F.linear(norms.ln_1(every.hidden[layer - 1]), block.attn.qkv.weight, block.attn.qkv.bias)
        expected = fused.view(batch, n, 3, 2, 16).permute(2, 0, 3, 1, 4)
        for got, want in zip(out.qkv[layer], expected):
            assert got.shape == (batch, 2, n, 16)
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
        q, k, _ = expected
        torch.testing.assert_close(out.attn_scores[layer], q @ k.transpose(-2, -1) / 4.0,
                                   atol=1e-5, rtol=1e-5)


# --------------------------------------------------------------------------- inheritance

@pytest.mark.parametrize("kind", ["image", "text"])
def test_inheritance_with_the_teachers_shape_reproduces_the_teacher(kind):
    teacher = tower_of(random_teacher(), kind)
    same = StudentTowerConfig(layers=12, mlp_ratio=4.0, init="inherit")
    student = student_tower(kind, teacher, same, f"student.{kind}").eval()
    assert student.shape == teacher.shape
    x = inputs(kind)
    request = Request(layers=tuple(range(12)), hidden=True, embeddings=True)
    with torch.no_grad():
        want, got = teacher(x, request), student(x, request)
        fresh = student_tower(kind, teacher, StudentTowerConfig(layers=12, init="random"),
                              f"student.{kind}").eval()(x).embedding
    torch.testing.assert_close(got.embedding, want.embedding, atol=1e-6, rtol=0)
    torch.testing.assert_close(got.embeddings, want.embeddings, atol=1e-6, rtol=0)
    for layer in range(12):
        torch.testing.assert_close(got.hidden[layer], want.hidden[layer], atol=1e-6, rtol=0)
    assert not torch.allclose(fresh, want.embedding, atol=1e-3)  # the comparison can fail


def test_weight_share_inherits_first_application_blocks_and_own_norms():
    teacher = random_teacher().visual
    cfg = StudentTowerConfig(layers=2, repeat=2, layer_map=[0, 11], distill_layers=[1, 3])
    student = student_tower("image", teacher, cfg, "student.image")
    # the explicit list covers only 2 of 4 effective layers, so inheritance maps all 4
    # uniformly: effective layers 0..3 ↔ teacher 2, 5, 8, 11; block u ← effective layer 2u
    for unique, source in enumerate([2, 8]):
        for name, param in student.transformer.blocks[unique].named_parameters():
            assert torch.equal(param, teacher.transformer.blocks[source].get_parameter(name))
    for layer, source in enumerate([2, 5, 8, 11]):
        for name, param in student.transformer.norms[layer].named_parameters():
            assert torch.equal(param, teacher.transformer.norms[source].get_parameter(name))
    assert student.init_notes[:2] == ["blocks ← teacher layers [2, 8]",
                                      "norms ← teacher layers [2, 5, 8, 11]"]


def test_sliced_inheritance_takes_leading_channels():
    teacher = random_teacher().text
    cfg = StudentTowerConfig(layers=3, width=24, heads=6, mlp_ratio=2.0, output_dim=16,
                             context_length=8, layer_map="end")
    student = student_tower("text", teacher, cfg, "student.text")
    w, m = 24, 48
    for unique, source in enumerate([9, 10, 11]):
        s, t = student.transformer.blocks[unique], teacher.transformer.blocks[source]
        for chunk in range(3):  # q, k, v
            rows_s, rows_t = slice(chunk * w, (chunk + 1) * w), slice(chunk * 48, chunk * 48 + w)
            assert torch.equal(s.attn.qkv.weight[rows_s], t.attn.qkv.weight[rows_t, :w])
            assert torch.equal(s.attn.qkv.bias[rows_s], t.attn.qkv.bias[rows_t])
        assert torch.equal(s.attn.out.weight, t.attn.out.weight[:w, :w])
        assert torch.equal(s.mlp.fc.weight, t.mlp.fc.weight[:m, :w])
        assert torch.equal(s.mlp.proj.weight, t.mlp.proj.weight[:w, :m])
        assert torch.equal(s.mlp.proj.bias, t.mlp.proj.bias[:w])
    assert torch.equal(student.token_embedding.weight, teacher.token_embedding.weight[:, :w])
    assert torch.equal(student.positional_embedding, teacher.positional_embedding[:8, :w])
    assert torch.equal(student.ln_final.bias, teacher.ln_final.bias[:w])
    assert torch.equal(student.text_projection, teacher.text_projection[:w, :16])
    assert student.init_notes[-1] == "sliced to the leading width 48→24, MLP 192→48, output 32→16, context 16→8"
    assert student(inputs("text", length=8)).embedding.shape == (2, 16)


def test_other_patch_size_leaves_patch_and_positions_random():
    teacher = random_teacher().visual
    student = student_tower("image", teacher, StudentTowerConfig(patch_size=16), "student.image")
    assert student.patch_embed.weight.shape == (64, 3, 16, 16)
    assert student.positional_embedding.shape == (5, 64)
    assert not torch.allclose(student.positional_embedding, teacher.positional_embedding[:5], atol=1e-3)
    assert torch.equal(student.class_embedding, teacher.class_embedding)
    assert "left random: patch_embed.weight, positional_embedding" in student.init_notes[-1]
    with pytest.raises(RecipeError, match=r"'student\.image\.freeze_embed'.*patch_size' = 16"):
        student_tower("image", teacher, StudentTowerConfig(patch_size=16, freeze_embed=True),
                      "student.image")


@pytest.mark.parametrize("fields, pattern", [
    ({"width": 128, "heads": 4}, r"'student\.image\.init' = 'inherit' is impossible.*width 128 > 64"),
    ({"mlp_ratio": 8.0}, r"'student\.image\.init'.*mlp_width 512 > 256"),
    ({"output_dim": 64}, r"'student\.image\.init'.*output_dim 64 > 32"),
    ({"layers": 7, "repeat": 2, "distill_layers": [0, 13]}, r"'student\.image\.init'.*14 effective layers.*only 12"),
    ({"layer_map": "unfiorm"}, r"'student\.image\.layer_map'.*did you mean 'uniform'"),
    ({"distill_layers": [4]}, r"'student\.image\.distill_layers'.*\[4\] out of range"),
])
def test_impossible_students_name_the_key(fields, pattern):
    with pytest.raises(RecipeError, match=pattern):
        student_tower("image", random_teacher().visual, StudentTowerConfig(**fields),
                      "student.image")


@pytest.mark.parametrize("init", ["random", "inherit"])
@pytest.mark.parametrize("kind, frozen", [
    ("image", {"patch_embed.weight", "class_embedding", "positional_embedding"}),
    ("text", {"token_embedding.weight", "positional_embedding"}),
])
def test_freeze_embed_copies_and_freezes_exactly_the_embeddings(kind, frozen, init):
    teacher = tower_of(random_teacher(), kind)
    extra = {"context_length": 8} if kind == "text" else {}
    cfg = StudentTowerConfig(width=32, heads=2, layers=2, init=init, freeze_embed=True, **extra)
    student = student_tower(kind, teacher, cfg, f"student.{kind}")
    assert {n for n, p in student.named_parameters() if not p.requires_grad} == frozen
    teacher_params = dict(teacher.named_parameters())
    for name, param in student.named_parameters():
        if name in frozen:
            source = teacher_params[name]
            expected = source[:8, :32] if name == "positional_embedding" and kind == "text" else source[..., :32]
            if name == "patch_embed.weight":
                expected = source[:32]
            assert torch.equal(param, expected), name


# --------------------------------------------------------------------------- shipped fragments

B32_VISION = TowerShape(width=768, layers=12, heads=12, mlp_width=3072, output_dim=512,
                        image_size=224, patch_size=32)
B32_TEXT = TowerShape(width=512, layers=12, heads=8, mlp_width=2048, output_dim=512,
                      context_length=77, vocab_size=49408)
FRAGMENTS = sorted((PROJECT_ROOT / "recipes" / "students").rglob("*.yaml"))
# block u of a 4-layer student ← teacher 3u + 2; of 4 × repeat 2 (8 effective layers) ← the
# teacher layer of effective layer 2u: floor((2u + 1)·12/8) − 1 = 0, 3, 6, 9
BLOCK_SOURCES = {1: [2, 5, 8, 11], 2: [0, 3, 6, 9]}


@pytest.fixture(scope="module")
def b32_teacher():
    torch.manual_seed(0)
    return Clip(B32_VISION, B32_TEXT).eval()


def test_fragments_cover_the_grid():
    names = {f"{p.parent.name}/{p.stem}" for p in FRAGMENTS}
    assert {"image/w768-l4-h24", "image/w384-l4-h24", "image/w768-l4-h12", "image/w384-l4-h12",
            "image/w768-l4-h24-r2", "text/w512-l4-h8", "text/w256-l4-h8", "text/w512-l4-h16",
            "text/w512-l4-h8-r2"} <= names


@pytest.mark.parametrize("path", FRAGMENTS, ids=lambda p: f"{p.parent.name}/{p.stem}")
def test_every_fragment_inherits_from_a_b32_teacher(path, b32_teacher):
    kind = path.parent.name
    tree, origins = load_yaml_tree(path)
    assert list(tree) == ["student"] and list(tree["student"]) == [kind]
    cfg = getattr(build(StudentConfig, tree["student"], origins, "student."), kind)
    width, layers, heads = (int(part[1:]) for part in path.stem.split("-")[:3])
    teacher = tower_of(b32_teacher, kind)
    student = student_tower(kind, teacher, cfg, f"student.{kind}")
    assert (student.shape.width, student.shape.layers, student.shape.heads) == (width, layers, heads)
    for unique, source in enumerate(BLOCK_SOURCES[cfg.repeat]):
        s, t = student.transformer.blocks[unique], teacher.transformer.blocks[source]
        t_width = teacher.shape.width
        # the value projection is the third of the fused q, k, v rows
        assert torch.equal(s.attn.qkv.weight[2 * width:], t.attn.qkv.weight[2 * t_width:2 * t_width + width, :width])
        assert torch.equal(s.mlp.fc.weight, t.mlp.fc.weight[:4 * width, :width])
    projection = "proj" if kind == "image" else "text_projection"
    assert torch.equal(getattr(student, projection), getattr(teacher, projection)[:width])
    x = torch.randn(1, 3, 224, 224) if kind == "image" else torch.tensor([[49406, 320, 1125, 49407]])
    with torch.no_grad():
        embedding = student(x).embedding
    assert embedding.shape == (1, 512) and torch.isfinite(embedding).all()


# --------------------------------------------------------------------------- recipe level

def test_build_students_is_seeded_and_keeps_the_global_rng():
    teacher = random_teacher()
    recipe = Recipe(stage="stage2", seed=3, student=StudentConfig(
        image=StudentTowerConfig(width=32, heads=2, layers=2, init="random"),
        text=StudentTowerConfig(width=32, heads=2, layers=2, init="inherit")))
    state = torch.random.get_rng_state()
    first = build_students(recipe.student, teacher, recipe.towers, recipe.seed)
    assert torch.equal(torch.random.get_rng_state(), state)
    second = build_students(recipe.student, teacher, recipe.towers, recipe.seed)
    assert sorted(first) == ["image", "text"]
    for kind in first:
        for (name, a), b in zip(first[kind].tower.state_dict().items(),
                                second[kind].tower.state_dict().values()):
            assert torch.equal(a, b), name
    third = build_students(recipe.student, teacher, recipe.towers, seed=4)
    assert not torch.equal(third["image"].tower.proj, first["image"].tower.proj)
    recipe.student.text.heads = 5
    with pytest.raises(RecipeError, match=r"'student\.text\.heads' = 5"):
        build_students(recipe.student, teacher, recipe.towers, recipe.seed)


def test_build_students_carries_the_teacher_tower_and_the_layer_pairs_once():
    teacher = random_teacher()
    cfg = StudentConfig(image=StudentTowerConfig(layers=2, repeat=2, distill_layers=[1, 3]),
                        text=StudentTowerConfig(layers=4, layer_map=[0, 1, 10, 11]))
    students = build_students(cfg, teacher, ["text"], seed=0)
    assert list(students) == ["text"]  # only the kinds asked for
    students = build_students(cfg, teacher, ["image", "text"], seed=0)
    image, text = students["image"], students["text"]
    assert (image.kind, image.key, text.kind, text.key) == ("image", "student.image", "text", "student.text")
    assert image.teacher is teacher.visual and text.teacher is teacher.text
    # 2 selected of 4 effective layers, uniform: floor((i+1)·12/2) − 1 = 5, 11
    assert image.layer_pairs == [(1, 5), (3, 11)]
    assert text.layer_pairs == [(0, 0), (1, 1), (2, 10), (3, 11)]
    assert image.layer_pairs == layer_map.resolve("uniform", 12, 4, [1, 3], "student.image")
    assert {kind: s.tower.shape for kind, s in students.items()} == student_shapes(cfg, teacher, ["image", "text"])
    with pytest.raises(RecipeError, match=r"'student\.image\.layer_map'.*did you mean 'uniform'"):
        build_students(StudentConfig(image=StudentTowerConfig(layer_map="unfiorm")), teacher, ["image"], 0)


def test_summary_lists_sizes_maps_and_inheritance():
    teacher = random_teacher()
    recipe = Recipe(name="tiny", stage="stage2", student=StudentConfig(
        image=StudentTowerConfig(width=32, heads=2, layers=2, repeat=2, distill_layers=[1, 3]),
        text=StudentTowerConfig(layers=4, layer_map=[0, 1, 10, 11], freeze_embed=True)))
    students = build_students(recipe.student, teacher, recipe.towers, recipe.seed)
    text = summarize(recipe, teacher, students)
    lines = text.splitlines()
    image_student = next(line.split() for line in lines if line.startswith("image") and "student" in line)
    assert image_student[2] == f"{count(students['image'].tower) / 1e6:.2f}M"
    assert image_student[4] == f"{count(students['image'].tower) / count(teacher.visual):.2f}"
    assert image_student[5:11] == ["4", "2×2", "32", "2", "128", "32"]
    text_student = next(line.split() for line in lines if line.startswith("text") and "student" in line)
    frozen = TEXT.vocab_size * 48 + TEXT.context_length * 48
    assert text_student[3] == f"{(count(students['text'].tower) - frozen) / 1e6:.2f}M"
    # 2 selected of 4 effective layers, uniform: floor((i+1)·12/2) − 1 = 5, 11
    assert "image distilled layers (student←teacher, layer_map 'uniform'): 1←5 3←11" in lines
    assert "text distilled layers (student←teacher, layer_map [0, 1, 10, 11]): 0←0 1←1 2←10 3←11" in lines
    assert "image init: blocks ← teacher layers [2, 8]" in lines
    assert any(line.startswith("text init: frozen") for line in lines)
    assert math.isclose(float(image_student[4]), count(students["image"].tower) / count(teacher.visual), abs_tol=0.005)


# --------------------------------------------------------------------------- shape records

@pytest.mark.parametrize("kind", ["image", "text"])
def test_shape_record_rebuilds_the_tower_and_names_every_difference(kind):
    """A recorded shape (checkpoints, exports) rebuilds the tower without the teacher, and head
    count and activation — which change no parameter shape — are told apart by name."""
    cfg = StudentTowerConfig(layers=2, width=32, heads=2, repeat=2, act="gelu")
    student = student_tower(kind, tower_of(random_teacher(), kind), cfg, f"student.{kind}")
    record = json.loads(json.dumps(shape_record(kind, student.shape)))
    rebuilt = tower_from_record(kind, record)
    assert rebuilt.shape == student.shape.replace(dropout=0.0)
    rebuilt.load_state_dict(student.state_dict(), strict=True)
    student.eval()
    rebuilt.eval()
    with torch.no_grad():
        assert torch.equal(rebuilt(inputs(kind)).embedding, student(inputs(kind)).embedding)
    assert shape_differences(kind, record, student.shape.replace(dropout=0.3)) == []
    other = student.shape.replace(heads=4, act="quick_gelu")
    assert shape_differences(kind, record, other) == [(f"student.{kind}.heads", 2, 4),
                                                      (f"student.{kind}.act", "gelu", "quick_gelu")]
