"""``tinyclip-ds export --format hf``: transformers loads the export by itself
(``CLIPModel.from_pretrained`` + ``CLIPProcessor.from_pretrained``) and, with its own tokenizer and
image processor on raw PIL images and strings, gives the trained student's embeddings, for an
open_clip (CLIP BPE) and a Hugging Face teacher, with and without weight sharing; what HF's CLIP
cannot express is refused by name; the limits of transformers' own preprocessing are pinned down.
"""

from __future__ import annotations

import dataclasses
import json
import math

import numpy as np
import pytest
import torch
from open_clip.tokenizer import SimpleTokenizer, basic_clean
from PIL import Image
from safetensors.torch import save_file
from transformers import CLIPConfig, CLIPModel, CLIPProcessor, CLIPTokenizer

from test_teacher_equivalence import open_clip_library, perturb, write_hf_tokenizer
from tinyclip_ds.config import RecipeError
from tinyclip_ds.data.transforms import eval_transform
from tinyclip_ds.export import ExportedStudent, unroll
from tinyclip_ds.export.hf import HF_ARGMAX_EOS, SPECIAL_TOKENS, write_clip_bpe_files, write_hf
from tinyclip_ds.models.config import StudentConfig, StudentTowerConfig, TeacherConfig
from tinyclip_ds.models.students import build_students
from tinyclip_ds.models.teachers import load_hf, load_teacher
from tinyclip_ds.models.tokenizer import ClipTokenizer

TOLERANCE = 1e-5
EOT = 49407
# A small QuickGELU open_clip teacher pooled at argmax(ids) (OpenAI's CLIP), 4 layers per tower so
# that a 2-layer student repeated twice is no deeper than it.
OPEN_CLIP_TEACHER = {
    "embed_dim": 48, "quick_gelu": True,
    "vision_cfg": {"image_size": 32, "layers": 4, "width": 64, "head_width": 16, "patch_size": 8},
    "text_cfg": {"context_length": 20, "vocab_size": 49408, "width": 64, "heads": 4, "layers": 4}}
# A small GELU Hugging Face teacher pooled at the first end token, LayerNorm eps 1e-6.
HF_TEACHER = dict(
    vision_config=dict(hidden_size=64, num_hidden_layers=4, num_attention_heads=4, intermediate_size=128,
                       patch_size=8, image_size=32, layer_norm_eps=1e-6, hidden_act="gelu"),
    text_config=dict(hidden_size=64, num_hidden_layers=4, num_attention_heads=4, intermediate_size=128,
                     max_position_embeddings=20, eos_token_id=EOT, vocab_size=49408, hidden_act="gelu",
                     layer_norm_eps=1e-6),
    projection_dim=48)
TEXTS = ["a photo of a cat", "Two DOGS   playing in the snow, next to a red car!!!",
         "Café crème — naïve résumé; 日本語のテキスト 🐱🎉 (yes) [no] #tag @user $5.99 100%",
         # longer than the student's 12-token context: truncated, keeping the end token
         "one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen"]


def student_config(repeat: int) -> StudentConfig:
    """Student towers narrower than the teacher, with another MLP ratio and a shorter text context."""
    return StudentConfig(
        image=StudentTowerConfig(width=32, layers=2, heads=2, mlp_ratio=3.0, repeat=repeat, init="random"),
        text=StudentTowerConfig(width=32, layers=2, heads=4, mlp_ratio=2.0, repeat=repeat, context_length=12,
                                init="random"))


@pytest.fixture(scope="module")
def teachers(tmp_path_factory) -> dict[str, TeacherConfig]:
    """Random-weight teachers: open_clip (weights + model JSON) and an HF CLIPModel directory
    with its tokenizer files."""
    root = tmp_path_factory.mktemp("teachers")
    state = {name: value.contiguous() for name, value in open_clip_library(OPEN_CLIP_TEACHER).state_dict().items()}
    save_file(state, root / "open_clip.safetensors")
    (root / "open_clip.json").write_text(json.dumps(OPEN_CLIP_TEACHER))
    hf_dir = root / "hf"
    perturb(CLIPModel(CLIPConfig(**HF_TEACHER))).save_pretrained(hf_dir)
    write_hf_tokenizer(hf_dir)
    return {"open_clip": TeacherConfig(source="open_clip", path=str(root / "open_clip.safetensors"),
                                       model=str(root / "open_clip.json")),
            "hf": TeacherConfig(source="hf", path=str(hf_dir))}


def exported(teacher_cfg: TeacherConfig, repeat: int, unrolled: bool = True,
             logit_scale: float = 42.0) -> ExportedStudent:
    """A student as training leaves it (every parameter perturbed: LayerNorms away from 1/0,
    per-repeat norms different), packed as the export command packs it."""
    teacher = load_teacher(teacher_cfg)
    students = build_students(student_config(repeat), teacher.clip, ["image", "text"], seed=0)
    towers = {kind: perturb(student.tower, seed=i + 1) for i, (kind, student) in enumerate(students.items())}
    pack = unroll if unrolled else (lambda tower: tower.eval())
    return ExportedStudent(image=pack(towers["image"]), text=pack(towers["text"]), logit_scale=logit_scale,
                           teacher=teacher_cfg, tokenizer=teacher.tokenizer, image_mean=teacher.image_mean,
                           image_std=teacher.image_std, image_size=towers["image"].shape.image_size,
                           source="test")


def pil_images() -> list[Image.Image]:
    """Raw images of other sizes than the model's 32×32 (down- and upscaled, both orientations,
    RGBA), with crop margins where HF's and torchvision's centre-crop offsets agree."""
    rng = np.random.default_rng(0)
    arrays = [rng.integers(0, 256, size, dtype=np.uint8) for size in ((45, 71, 3), (90, 40, 3), (20, 24, 3))]
    rgba = rng.integers(0, 256, (50, 64, 4), dtype=np.uint8)
    return [Image.fromarray(a) for a in arrays] + [Image.fromarray(rgba, mode="RGBA")]


def features(output) -> torch.Tensor:
    """transformers 5 returns a model output from get_*_features; 4.x returned the tensor."""
    return output if isinstance(output, torch.Tensor) else output.pooler_output


def assert_close(ours: torch.Tensor, theirs: torch.Tensor, what: str) -> None:
    assert ours.shape == theirs.shape, f"{what}: shape {ours.shape} vs {theirs.shape}"
    error = (ours - theirs).abs().max().item()
    assert error <= TOLERANCE, f"{what}: max abs difference {error:.3g} > {TOLERANCE}"


# --------------------------------------------------------------------------- the export loads and agrees

# repeat 2 unrolled as the export command does (`unroll`), and once as the tower trained (the writer
# unrolls it itself: HF layer e is block e // repeat with norms[e]).
@pytest.mark.parametrize("teacher,repeat,unrolled", [("open_clip", 1, True), ("hf", 2, True), ("open_clip", 2, False)])
def test_transformers_loads_export_and_gives_student_embeddings(teachers, tmp_path, teacher, repeat, unrolled):
    student = exported(teachers[teacher], repeat, unrolled)
    write_hf(student, tmp_path)
    assert {"config.json", "model.safetensors", "preprocessor_config.json"} <= {p.name for p in tmp_path.iterdir()}
    model = CLIPModel.from_pretrained(tmp_path).eval()
    processor = CLIPProcessor.from_pretrained(tmp_path, backend="pil")  # PIL's bicubic, as our eval transform
    config = model.config
    assert config.vision_config.num_hidden_layers == config.text_config.num_hidden_layers == 2 * repeat
    assert config.text_config.max_position_embeddings == processor.tokenizer.model_max_length == 12
    # our pooling rule as HF's eos_token_id: argmax(ids) (open_clip's OpenAI-style) <-> 2, else the end token
    assert config.text_config.eos_token_id == (HF_ARGMAX_EOS if teacher == "open_clip" else EOT)
    assert config.vision_config.hidden_act == config.text_config.hidden_act == (
        "quick_gelu" if teacher == "open_clip" else "gelu")

    images = pil_images()
    inputs = processor(text=TEXTS, images=images, padding=True, truncation=True, return_tensors="pt")
    transform = eval_transform(student.image_size, student.image_mean, student.image_std)
    pixels = torch.stack([transform(image) for image in images])
    ids = student.text.fit_context(student.tokenizer(TEXTS))
    assert torch.equal(inputs["pixel_values"], pixels), "CLIPImageProcessor is not our eval transform"
    eot = student.text.eot_positions(ids)
    for row, end in enumerate(eot.tolist()):  # the same ids up to the end token (padding may differ)
        assert torch.equal(inputs["input_ids"][row, :end + 1], ids[row, :end + 1]), TEXTS[row]
    assert ids[-1, -1] == EOT and eot[-1] == 11  # the long text was truncated to 12, end token kept
    with torch.no_grad():
        assert_close(features(model.get_image_features(pixel_values=inputs["pixel_values"])),
                     student.image(pixels).embedding, "image")
        assert_close(features(model.get_text_features(input_ids=inputs["input_ids"],
                                                      attention_mask=inputs["attention_mask"])),
                     student.text(ids).embedding, "text")
        logits = model(**inputs).logits_per_image
    assert math.isclose(model.logit_scale.exp().item(), 42.0, rel_tol=1e-6)
    assert logits.shape == (len(images), len(TEXTS))
    # Our own HF loader reads the export back as the same towers (the mapping is its inverse).
    clip = load_hf(tmp_path).eval()
    with torch.no_grad():
        assert_close(clip.visual(pixels).embedding, student.image(pixels).embedding, "load_hf image")
        assert_close(clip.text(ids).embedding, student.text(ids).embedding, "load_hf text")


def test_hf_centre_crop_rounds_odd_margins_down(teachers, tmp_path):
    """A known limit of CLIPImageProcessor: for a resized long side 4k+3 pixels longer than the
    crop, it starts the crop one pixel earlier than torchvision's CenterCrop (round half to even).
    If a transformers release changes this, the README's note must change with it."""
    student = exported(teachers["open_clip"], 1)
    write_hf(student, tmp_path)
    processor = CLIPProcessor.from_pretrained(tmp_path, backend="pil")
    image = Image.fromarray(np.random.default_rng(1).integers(0, 256, (32, 39, 3), dtype=np.uint8))  # margin 7
    theirs = processor(images=[image], return_tensors="pt")["pixel_values"][0]
    normalise = eval_transform(student.image_size, student.image_mean, student.image_std).transforms[-1]
    wide = normalise(torch.from_numpy(np.array(image)).permute(2, 0, 1).float() / 255)
    assert torch.allclose(theirs, wide[:, :, 3:35], atol=1e-6)  # HF: 7 // 2
    assert torch.allclose(eval_transform(32, student.image_mean, student.image_std)(image), wide[:, :, 4:36],
                          atol=1e-6)  # ours: round(3.5)


# --------------------------------------------------------------------------- the BPE tokenizer files

def test_clip_bpe_files_give_open_clip_ids(tmp_path):
    """vocab.json + merges.txt built from open_clip's BPE file are CLIP's vocabulary, and
    transformers' CLIPTokenizer reads them into our ClipTokenizer's ids up to the end token."""
    write_clip_bpe_files(tmp_path)
    vocab = json.loads((tmp_path / "vocab.json").read_text())
    names = dict(zip(("<start_of_text>", "<end_of_text>"), SPECIAL_TOKENS))
    assert vocab == {names.get(token, token): i for token, i in SimpleTokenizer().encoder.items()}
    hf = CLIPTokenizer.from_pretrained(tmp_path, model_max_length=16)
    ours = ClipTokenizer(16)
    texts = [*TEXTS, "", "it's   a\ttab\nnewline", "don't STOP", "e\u0301 combining", "word " * 40]
    a, b = ours(texts), hf(texts, padding="max_length", truncation=True, return_tensors="pt")["input_ids"]
    assert a.shape == b.shape == (len(texts), 16)
    for text, row_a, row_b in zip(texts, a, b):
        end = int((row_a == EOT).nonzero()[0])
        assert torch.equal(row_a[:end + 1], row_b[:end + 1]), text
    assert a[-1, -1] == b[-1, -1] == EOT  # truncation keeps the end token
    # open_clip cleans text with ftfy and html.unescape, transformers does not (nor do OpenAI's HF
    # releases): these differ unless the text is cleaned first, as the README says.
    unclean = ["Tom &amp; Jerry", "it’s “quoted”", "ＦＵＬＬＷＩＤＴＨ", "ﬁne ligature"]
    cleaned = hf([basic_clean(t) for t in unclean], padding="max_length", truncation=True,
                 return_tensors="pt")["input_ids"]
    raw = hf(unclean, padding="max_length", truncation=True, return_tensors="pt")["input_ids"]
    expected = ours(unclean)
    for row in range(len(unclean)):
        end = int((expected[row] == EOT).nonzero()[0])
        assert torch.equal(cleaned[row, :end + 1], expected[row, :end + 1]), unclean[row]
        assert not torch.equal(raw[row, :end + 1], expected[row, :end + 1]), unclean[row]


# --------------------------------------------------------------------------- refusals

def test_what_hf_cannot_express_is_refused_by_name(teachers, tmp_path):
    student = exported(teachers["open_clip"], 1)
    out = tmp_path / "out"
    with pytest.raises(RecipeError, match=r"^teacher\.source=demo: .*word tokenizer"):
        write_hf(dataclasses.replace(student, teacher=TeacherConfig(source="demo")), out)
    wider = build_students(StudentConfig(image=StudentTowerConfig(layers=1, width=32, heads=2, output_dim=40,
                                                                  init="random")),
                           load_teacher(teachers["open_clip"]).clip, ["image"], seed=0)["image"].tower
    with pytest.raises(RecipeError, match=r"^student\.image\.output_dim = 40 differs from student\.text\.output_dim"):
        write_hf(dataclasses.replace(student, image=wider.eval()), out)
    pools_at_2 = type(student.text)(student.text.shape.replace(eot_token_id=2))
    with pytest.raises(RecipeError, match=r"^student\.text\.eot_token_id = 2: "):
        write_hf(dataclasses.replace(student, text=pools_at_2.eval()), out)
    assert not out.exists()  # refused before writing anything
