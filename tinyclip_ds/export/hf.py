"""``--format hf``: a transformers ``CLIPModel`` + ``CLIPProcessor`` directory.

`write_hf` writes what ``CLIPModel.from_pretrained(DIR)`` and ``CLIPProcessor.from_pretrained(DIR)``
load by themselves: config.json + model.safetensors (``save_pretrained``), the tokenizer files and
preprocessor_config.json. The weights are our towers' renamed (the inverse of the teacher loader's
`_from_hf_names`: fused qkv split into q/k/v, projections transposed, one HF layer per effective
layer, so a weight-shared tower comes out unrolled); the configs state our shapes; the tokenizer
is the teacher's (an HF teacher's own files; for OpenAI / open_clip teachers CLIP's BPE vocabulary
built from open_clip's file) cut to the student's context length; the image processor is our eval
transform (shorter side to image_size, bicubic, centre crop, the teacher's mean/std).

What HF's CLIP cannot express is refused with a `RecipeError` naming the field, and the written
directory is loaded back with transformers and checked against the student before returning.

Known limits of transformers' own preprocessing (not of the model), stated in the README:
its CLIPTokenizer does not run open_clip's ftfy / HTML clean-up (OpenAI's own Hugging Face
releases behave the same), its centre crop rounds an odd margin down where torchvision rounds half
to even, and its default torchvision image backend resizes tensors with other bicubic kernels than PIL's
(pixels differ by up to ~15 8-bit levels on noise images); ``backend="pil"`` reproduces our
PIL-bicubic eval transform exactly.
"""

from __future__ import annotations

import gzip
import json
import math
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from tinyclip_ds.config import RecipeError
from tinyclip_ds.models.transformer import TextTower, VisionTower

if TYPE_CHECKING:  # the package imports this module lazily; no import cycle at run time
    from tinyclip_ds.export import ExportedStudent

# transformers' CLIP text model pools at argmax(ids) when its config says eos_token_id == 2 (configs
# from before its fix) and at the first eos_token_id otherwise: our eot_token_id None <-> 2.
HF_ARGMAX_EOS = 2
CHECK_TOLERANCE = 1e-4  # the written model against the student on a check batch (relative to its scale)
CLIP_BPE_MERGES = 49152 - 256 - 2  # merges CLIP's vocabulary uses from the BPE file (open_clip's slice)
SPECIAL_TOKENS = ("<|startoftext|>", "<|endoftext|>")  # HF's names of open_clip's <start_of_text>, <end_of_text>


def write_hf(student: ExportedStudent, out: Path) -> None:
    """Write ``student`` to ``out`` as a transformers CLIPModel + CLIPProcessor directory and check
    that transformers loads it and computes the student's embeddings."""
    from transformers import CLIPModel, CLIPProcessor

    out = Path(out)
    check_expressible(student)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = hf_tokenizer(student, out)
    config = hf_config(student, tokenizer)
    model = CLIPModel(config).eval()
    missing, unexpected = model.load_state_dict(hf_state_dict(student), strict=False)
    missing = [name for name in missing if not name.endswith("position_ids")]  # buffers, not weights
    if missing or unexpected:
        raise RuntimeError(f"hf export: weight names do not match transformers' CLIPModel "
                           f"(missing {missing[:5]}, unexpected {unexpected[:5]})")
    model.save_pretrained(out, safe_serialization=True)
    image_processor = hf_image_processor(student)
    CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(out)
    # transformers 5 nests the image processor in processor_config.json; 4.x and other tools read this file
    image_processor.save_pretrained(out)
    check_written(student, out, CLIPModel.from_pretrained(out).eval(), CLIPProcessor.from_pretrained(out))


def check_expressible(student: ExportedStudent) -> None:
    """Refuse, naming the field, what transformers' CLIPModel / CLIPTokenizer cannot express."""
    image, text = student.image.shape, student.text.shape
    if student.teacher.source == "demo":
        raise RecipeError("teacher.source=demo: the demo teacher's word tokenizer has no transformers "
                          "CLIPTokenizer equivalent (CLIP's byte-level BPE); export this run with "
                          "--format tinyclip or --format open_clip")
    if student.teacher.source not in ("openai", "open_clip", "hf"):
        raise RecipeError(f"teacher.source={student.teacher.source}: unknown tokenizer family for the hf format")
    if image.output_dim != text.output_dim:
        raise RecipeError(f"student.image.output_dim = {image.output_dim} differs from student.text.output_dim "
                          f"= {text.output_dim}: transformers' CLIPConfig has one projection_dim for both "
                          f"towers; export with --format open_clip or tinyclip")
    if text.eot_token_id == HF_ARGMAX_EOS:
        raise RecipeError(f"student.text.eot_token_id = {HF_ARGMAX_EOS}: the text tower pools at the first "
                          f"token {HF_ARGMAX_EOS}, but transformers' CLIP text model reads eos_token_id == "
                          f"{HF_ARGMAX_EOS} as 'pool at argmax(ids)'; export with --format open_clip or tinyclip")
    if image.image_size != student.image_size:
        raise RecipeError(f"student image_size {student.image_size} differs from the image tower's "
                          f"{image.image_size}")


# --------------------------------------------------------------------------- weights

def hf_state_dict(student: ExportedStudent) -> dict[str, Tensor]:
    """The student's weights under transformers' CLIPModel names (fp32, contiguous)."""
    state = {"logit_scale": torch.tensor(math.log(student.logit_scale))}
    state.update(_tower_state(student.image, "vision_model", {
        "patch_embed.weight": "embeddings.patch_embedding.weight",
        "class_embedding": "embeddings.class_embedding",
        "positional_embedding": "embeddings.position_embedding.weight",
        "ln_pre.weight": "pre_layrnorm.weight", "ln_pre.bias": "pre_layrnorm.bias",  # sic, HF's name
        "ln_post.weight": "post_layernorm.weight", "ln_post.bias": "post_layernorm.bias",
    }))
    state["visual_projection.weight"] = student.image.proj.detach().t()  # ours (width, out), HF Linear (out, in)
    state.update(_tower_state(student.text, "text_model", {
        "token_embedding.weight": "embeddings.token_embedding.weight",
        "positional_embedding": "embeddings.position_embedding.weight",
        "ln_final.weight": "final_layer_norm.weight", "ln_final.bias": "final_layer_norm.bias",
    }))
    state["text_projection.weight"] = student.text.text_projection.detach().t()
    return {name: value.detach().float().contiguous().clone() for name, value in state.items()}


def _tower_state(tower: VisionTower | TextTower, prefix: str, top: dict[str, str]) -> dict[str, Tensor]:
    """One tower's embeddings, norms and layers under ``prefix``; HF layer e gets our effective layer
    e: block e // repeat (so a weight-shared tower is written unrolled) with its own norms[e]."""
    params = dict(tower.named_parameters())
    state = {f"{prefix}.{hf}": params[ours] for ours, hf in top.items()}
    transformer = tower.transformer
    for layer, norms in enumerate(transformer.norms):
        block = transformer.blocks[layer // transformer.repeat]
        hf = f"{prefix}.encoder.layers.{layer}."
        for kind in ("weight", "bias"):
            q, k, v = getattr(block.attn.qkv, kind).chunk(3)  # our fused projection stacks q, k, v
            state.update({hf + f"self_attn.q_proj.{kind}": q, hf + f"self_attn.k_proj.{kind}": k,
                          hf + f"self_attn.v_proj.{kind}": v,
                          hf + f"self_attn.out_proj.{kind}": getattr(block.attn.out, kind),
                          hf + f"mlp.fc1.{kind}": getattr(block.mlp.fc, kind),
                          hf + f"mlp.fc2.{kind}": getattr(block.mlp.proj, kind),
                          hf + f"layer_norm1.{kind}": getattr(norms.ln_1, kind),
                          hf + f"layer_norm2.{kind}": getattr(norms.ln_2, kind)})
    return state


# --------------------------------------------------------------------------- configs

def hf_config(student: ExportedStudent, tokenizer):
    """transformers' CLIPConfig of the student's shapes (one HF layer per effective layer)."""
    from transformers import CLIPConfig

    image, text = student.image.shape, student.text.shape
    vision_config = dict(hidden_size=image.width, intermediate_size=image.mlp_width,
                         projection_dim=image.output_dim, num_hidden_layers=image.depth,
                         num_attention_heads=image.heads, num_channels=3, image_size=image.image_size,
                         patch_size=image.patch_size, hidden_act=image.act, layer_norm_eps=image.ln_eps,
                         attention_dropout=0.0)
    text_config = dict(vocab_size=text.vocab_size, hidden_size=text.width, intermediate_size=text.mlp_width,
                       projection_dim=text.output_dim, num_hidden_layers=text.depth,
                       num_attention_heads=text.heads, max_position_embeddings=text.context_length,
                       hidden_act=text.act, layer_norm_eps=text.ln_eps, attention_dropout=0.0,
                       # pooling: eos_token_id is where the text model pools (see HF_ARGMAX_EOS)
                       eos_token_id=HF_ARGMAX_EOS if text.eot_token_id is None else text.eot_token_id,
                       bos_token_id=tokenizer.bos_token_id, pad_token_id=tokenizer.pad_token_id)
    return CLIPConfig(text_config=text_config, vision_config=vision_config, projection_dim=image.output_dim,
                      logit_scale_init_value=math.log(student.logit_scale))


def hf_image_processor(student: ExportedStudent):
    """CLIPImageProcessor settings of our eval transform: RGB, shorter side to image_size
    (bicubic), centre crop to image_size, [0, 1], the teacher's mean / std."""
    from transformers import CLIPImageProcessor

    size = student.image_size
    return CLIPImageProcessor(do_resize=True, size={"shortest_edge": size}, resample=3,  # PIL bicubic
                              do_center_crop=True, crop_size={"height": size, "width": size},
                              do_rescale=True, rescale_factor=1 / 255, do_normalize=True,
                              image_mean=list(student.image_mean), image_std=list(student.image_std),
                              do_convert_rgb=True)


# --------------------------------------------------------------------------- tokenizer

def hf_tokenizer(student: ExportedStudent, out: Path):
    """The teacher's tokenizer as transformers' CLIPTokenizer, truncating to the student's context
    length (what the student's `TextTower.fit_context` does to the teacher's ids)."""
    from transformers import CLIPTokenizer

    context = student.text.shape.context_length
    if student.teacher.source == "hf":
        source = Path(student.teacher.path)
    else:  # openai / open_clip: CLIP's BPE, as open_clip's SimpleTokenizer builds it
        write_clip_bpe_files(out)
        source = out
        print("export: hf: transformers' CLIPTokenizer gives the student's ids except where open_clip's "
              "tokenizer would clean the text first (ftfy, HTML entities: e.g. '&amp;', curly quotes, "
              "full-width letters); clean such text with ftfy.fix_text + html.unescape", file=sys.stderr)
    tokenizer = CLIPTokenizer.from_pretrained(source, model_max_length=context)  # a local directory
    tokenizer.model_max_length = context
    return tokenizer


def write_clip_bpe_files(directory: Path) -> None:
    """vocab.json + merges.txt of CLIP's BPE vocabulary from open_clip's own BPE file, as CLIP
    defines it: the 256 byte symbols, the same with '</w>', the first 48894 merges, then the
    start and end tokens (ids 49406, 49407)."""
    from open_clip.tokenizer import bytes_to_unicode, default_bpe

    merges = gzip.open(default_bpe()).read().decode("utf-8").split("\n")[1:CLIP_BPE_MERGES + 1]
    symbols = list(bytes_to_unicode().values())
    vocab = [*symbols, *(s + "</w>" for s in symbols), *("".join(m.split()) for m in merges), *SPECIAL_TOKENS]
    (directory / "vocab.json").write_text(json.dumps({token: i for i, token in enumerate(vocab)}))
    (directory / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")


# --------------------------------------------------------------------------- check

CHECK_TEXTS = ("a photo of a cat", "Two dogs, playing in the snow!", "word " * 100)


def check_written(student: ExportedStudent, out: Path, model, processor) -> None:
    """The loaded directory gives the student's token ids (up to the end token) and embeddings."""
    ours_ids = student.text.fit_context(student.tokenizer(list(CHECK_TEXTS)))
    hf_ids = processor.tokenizer(list(CHECK_TEXTS), padding="max_length", truncation=True,
                                 return_tensors="pt")["input_ids"]
    eot = student.text.eot_positions(ours_ids)
    for row, end in enumerate(eot.tolist()):
        if hf_ids.shape[1] != ours_ids.shape[1] or not torch.equal(hf_ids[row, :end + 1], ours_ids[row, :end + 1]):
            raise RuntimeError(f"hf export to {out}: the written tokenizer gives other ids than the student's "
                               f"for {CHECK_TEXTS[row][:40]!r}: {hf_ids[row].tolist()} vs {ours_ids[row].tolist()}")
    size = student.image_size
    pixels = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        pairs = {"image": (student.image(pixels).embedding, _features(model.get_image_features(pixel_values=pixels))),
                 "text": (student.text(ours_ids).embedding, _features(model.get_text_features(input_ids=hf_ids)))}
    for kind, (ours, theirs) in pairs.items():
        error = (ours - theirs).abs().max().item()
        if error > CHECK_TOLERANCE * (1 + ours.abs().max().item()):
            raise RuntimeError(f"hf export to {out}: transformers' {kind} embeddings differ from the "
                               f"student's by {error:.3g}")
    if not math.isclose(model.logit_scale.exp().item(), student.logit_scale, rel_tol=1e-5):
        raise RuntimeError(f"hf export to {out}: logit scale {model.logit_scale.exp().item()} "
                           f"!= {student.logit_scale}")


def _features(output) -> Tensor:
    """transformers 5 returns a model output from get_*_features (pooler_output is the
    projected embedding); 4.x returned the tensor."""
    return output if isinstance(output, Tensor) else output.pooler_output
