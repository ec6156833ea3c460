"""``--format open_clip``: a directory open_clip loads by itself with its ``local-dir:`` schema.

Files (what open_clip's factory reads for ``create_model_and_transforms("local-dir:DIR")`` and
``get_tokenizer("local-dir:DIR")``):

- ``open_clip_config.json``: ``{"model_cfg": ..., "preprocess_cfg": ...}``, a standard CLIP
  model config (ViT image tower, causal text tower) and the teacher's image preprocessing;
- ``open_clip_model.safetensors``: the weights under open_clip's (OpenAI's) parameter names;
- for a Hugging Face teacher, its tokenizer files, named in ``text_cfg.hf_tokenizer_name`` so
  that ``get_tokenizer`` reads them from DIR (open_clip's own BPE tokenizer otherwise).

A student open_clip's config cannot express is a `RecipeError` naming the field; the written
directory is then loaded back with open_clip and must give our towers' embeddings, so a format
difference fails the export instead of giving a silently different model.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import Tensor

from tinyclip_ds.config import RecipeError
from tinyclip_ds.models.transformer import TowerShape

CONFIG = "open_clip_config.json"
WEIGHTS = "open_clip_model.safetensors"
TOLERANCE = 1e-4  # the load-back check, on random inputs (fp32 sums in another order)

# Our parameter names -> open_clip's; the inverse of models/teachers.py `_from_openai_names`.
_TOP = {"image.patch_embed.weight": "visual.conv1.weight", "text.token_embedding.weight": "token_embedding.weight",
        "text.positional_embedding": "positional_embedding", "text.ln_final.weight": "ln_final.weight",
        "text.ln_final.bias": "ln_final.bias", "text.text_projection": "text_projection"}
_BLOCK = {"attn.qkv.weight": "attn.in_proj_weight", "attn.qkv.bias": "attn.in_proj_bias",
          "attn.out.weight": "attn.out_proj.weight", "attn.out.bias": "attn.out_proj.bias",
          "mlp.fc.weight": "mlp.c_fc.weight", "mlp.fc.bias": "mlp.c_fc.bias",
          "mlp.proj.weight": "mlp.c_proj.weight", "mlp.proj.bias": "mlp.c_proj.bias"}
_TOWER = {"image": "visual.transformer.resblocks.", "text": "transformer.resblocks."}


def open_clip_names(kind: str, state: dict[str, Tensor]) -> dict[str, Tensor]:
    """One unrolled tower's state dict (our names) under open_clip's CLIP names."""
    out = {}
    for name, value in state.items():
        key = f"{kind}.{name}"
        if key in _TOP:
            out[_TOP[key]] = value
        elif name.startswith("transformer.blocks."):
            layer, rest = name.removeprefix("transformer.blocks.").split(".", 1)
            out[f"{_TOWER[kind]}{layer}.{_BLOCK[rest]}"] = value
        elif name.startswith("transformer.norms."):
            layer, rest = name.removeprefix("transformer.norms.").split(".", 1)
            out[f"{_TOWER[kind]}{layer}.{rest}"] = value  # ln_1 / ln_2
        elif kind == "image":
            out[f"visual.{name}"] = value  # class/positional embedding, ln_pre, ln_post, proj
        else:
            raise ValueError(f"text tower parameter {name} has no open_clip name")
    return out


def mlp_ratio(shape: TowerShape, key: str) -> float:
    """The ``mlp_ratio`` with which open_clip builds ``shape.mlp_width`` (it takes
    ``int(width * mlp_ratio)``), or a RecipeError when no float does."""
    ratio = shape.mlp_width / shape.width
    for _ in range(4):  # width * (mlp / width) can round just below mlp: step up to the next float
        if int(shape.width * ratio) == shape.mlp_width:
            return ratio
        ratio = math.nextafter(ratio, math.inf)
    raise RecipeError(f"'{key}.mlp_ratio': an MLP of {shape.mlp_width} channels at width {shape.width} has no "
                      f"open_clip mlp_ratio (it builds int(width * mlp_ratio) channels); pick another "
                      f"mlp_ratio or export with --format tinyclip")


def model_config(student) -> dict:
    """open_clip's ``model_cfg`` for an `ExportedStudent`, or a RecipeError naming the first
    field open_clip's CLIP cannot express."""
    image, text = student.image.shape, student.text.shape
    if student.teacher.source == "demo":
        raise RecipeError("teacher.source=demo: the demo teacher's word tokenizer has no open_clip equivalent, so "
                          "an open_clip export would read other token ids than the student was trained on; "
                          "export with --format tinyclip")
    if image.output_dim != text.output_dim:
        raise RecipeError(f"'student.image.output_dim' = {image.output_dim} differs from the text tower's "
                          f"{text.output_dim}: open_clip's CLIP has one embed_dim for both towers")
    if image.act != text.act:
        raise RecipeError(f"'student.text.act': the image tower uses {image.act} and the text tower {text.act}; "
                          f"open_clip's CLIP has one activation (quick_gelu) for both towers")
    text_cfg = {"context_length": text.context_length, "vocab_size": text.vocab_size, "width": text.width,
                "heads": text.heads, "layers": text.layers, "mlp_ratio": mlp_ratio(text, "student.text"),
                "norm_kwargs": {"eps": text.ln_eps}}
    if text.eot_token_id is None:
        text_cfg["pool_type"] = "argmax"
    else:
        text_cfg.update(pool_type="eos", eos_id=text.eot_token_id)
    if student.teacher.source == "hf":
        text_cfg["hf_tokenizer_name"] = "."  # any name: get_tokenizer reads the files in local-dir DIR
    return {"embed_dim": image.output_dim, "quick_gelu": image.act == "quick_gelu",
            "vision_cfg": {"image_size": image.image_size, "layers": image.layers, "width": image.width,
                           "head_width": image.width // image.heads, "mlp_ratio": mlp_ratio(image, "student.image"),
                           "patch_size": image.patch_size, "norm_kwargs": {"eps": image.ln_eps}},
            "text_cfg": text_cfg}


def write_open_clip(student, out: Path) -> None:
    """Write an `ExportedStudent` to the directory ``out`` in open_clip's local-dir layout and
    check that open_clip loads it back with the same embeddings."""
    model_cfg = model_config(student)
    preprocess_cfg = {"size": student.image_size, "mode": "RGB", "mean": list(student.image_mean),
                      "std": list(student.image_std), "interpolation": "bicubic", "resize_mode": "shortest"}
    weights = {**open_clip_names("image", student.image.state_dict()),
               **open_clip_names("text", student.text.state_dict()),
               "logit_scale": torch.tensor(math.log(student.logit_scale))}
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    for stale in out.glob("*.safetensors"):  # open_clip loads the first weights file it finds
        stale.unlink()
    if student.teacher.source == "hf":
        _copy_hf_tokenizer(Path(student.teacher.path), out)
    save_file({name: value.detach().float().contiguous() for name, value in weights.items()}, str(out / WEIGHTS),
              metadata={"format": "pt", "source": student.source})
    (out / CONFIG).write_text(json.dumps({"model_cfg": model_cfg, "preprocess_cfg": preprocess_cfg}, indent=2) + "\n")
    check_loads(student, out)


def _copy_hf_tokenizer(teacher: Path, out: Path) -> None:
    """The HF teacher's tokenizer, saved into DIR with its tokenizer_config.json (which names
    the class open_clip's HFTokenizer, through AutoTokenizer, builds)."""
    from transformers import CLIPTokenizer

    try:
        CLIPTokenizer.from_pretrained(teacher, local_files_only=True).save_pretrained(out)
    except OSError as error:
        raise RecipeError(f"teacher.path: {teacher} has no readable CLIP tokenizer to put in the open_clip "
                          f"export ({error})") from None


@torch.no_grad()
def check_loads(student, out: Path) -> None:
    """Load ``out`` with open_clip and compare its embeddings with the student's towers on
    random inputs; a difference is an error (the export would be a silently different model)."""
    import open_clip

    model = open_clip.create_model(f"local-dir:{out}", device="cpu", precision="fp32").eval()
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(2, 3, student.image_size, student.image_size, generator=generator)
    tokenizer = open_clip.get_tokenizer(f"local-dir:{out}")
    ids = tokenizer(["a photo of a cat", "two dogs playing in the snow next to a red car"])
    differences = {
        "image": (model.encode_image(images) - student.image(images).embedding).abs().max().item(),
        "text": (model.encode_text(ids) - student.text(ids).embedding).abs().max().item(),
        "logit_scale": abs(model.logit_scale.exp().item() - student.logit_scale) / student.logit_scale,
    }
    wrong = {name: value for name, value in differences.items() if not value <= TOLERANCE}
    if wrong:
        raise RuntimeError(f"the open_clip export in {out} does not reproduce the student "
                           f"({', '.join(f'{k}: max difference {v:.3g}' for k, v in wrong.items())}); "
                           f"please report this as a bug")
