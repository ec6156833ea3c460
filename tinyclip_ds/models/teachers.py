"""Teachers: frozen CLIP models loaded from local OpenAI, open_clip or Hugging Face files, or
from a self-describing word-tokenizer file (the shipped digits demo teacher)."""

from __future__ import annotations

import dataclasses
import json
import pickle
import re
import zipfile
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.jit._pickle
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from tinyclip_ds.config import RecipeError
from tinyclip_ds.models.config import TeacherConfig, check_openai_options
from tinyclip_ds.models.tokenizer import ClipTokenizer, HfClipTokenizer, Tokenizer, WordTokenizer
from tinyclip_ds.models.transformer import Clip, Request, TowerOutput, TowerShape


OPENAI_IMAGE_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_IMAGE_STD = (0.26862954, 0.26130258, 0.27577711)
PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
DEMO_TEACHER_PATH = Path(__file__).parents[1] / "demo" / "teacher.safetensors"
WORD_TEACHER_METADATA = "word_teacher"  # safetensors metadata key of `save_word_teacher` files


class CheckpointMismatchError(ValueError):
    """A checkpoint whose keys or shapes do not fit the model built for it."""


class Teacher(nn.Module):
    """A frozen CLIP teacher with the tokenizer and image normalisation it was trained with.

    All parameters have ``requires_grad=False`` and the module stays in eval mode whatever
    ``train()`` is called with: in train mode its dropout would make the targets noisy and a
    train-mode norm would drift with every batch it sees.
    ``assumptions`` says what the weights file could not tell and how to override it (one line
    each, for the startup summary).
    """

    def __init__(self, clip: Clip, tokenizer: Tokenizer, image_mean: Sequence[float],
                 image_std: Sequence[float], assumptions: Sequence[str] = ()):
        super().__init__()
        self.clip = clip.requires_grad_(False)
        self.tokenizer = tokenizer
        self.image_mean = tuple(float(m) for m in image_mean)
        self.image_std = tuple(float(s) for s in image_std)
        self.image_size = clip.visual.shape.image_size
        self.assumptions = list(assumptions)
        self.train(False)

    def train(self, mode: bool = True) -> "Teacher":
        """Ignore ``mode``: the teacher always stays in eval mode."""
        return super().train(False)

    @torch.no_grad()
    def image(self, images: Tensor, request: Request = Request()) -> TowerOutput:
        """The image tower's output (no autograd graph) for normalised images (B, 3, H, W)."""
        return self.clip.visual(images, request)

    @torch.no_grad()
    def text(self, ids: Tensor, request: Request = Request()) -> TowerOutput:
        """The text tower's output (no autograd graph) for token ids (B, N)."""
        return self.clip.text(ids, request)


def load_teacher(cfg: TeacherConfig) -> Teacher:
    """Load the frozen teacher a recipe's ``teacher`` section describes, cast to its precision."""
    if cfg.source != "demo" and not cfg.path:
        raise RecipeError(f"teacher.path: the {cfg.source} source needs the teacher's weights "
                          f"(a file, or for hf a CLIPModel directory)")
    check_openai_options(cfg)
    assumptions: list[str] = []
    try:
        if cfg.source == "demo":
            try:
                clip, tokenizer, mean, std = load_word_teacher(cfg.path or DEMO_TEACHER_PATH)
            except ValueError as error:  # a file of another format or shape: the recipe names the wrong one
                raise RecipeError(f"teacher.path: {error}") from error
        elif cfg.source == "openai":
            clip, assumptions = _load_openai_assuming(cfg)
            tokenizer = ClipTokenizer(clip.text.shape.context_length)
            mean, std = OPENAI_IMAGE_MEAN, OPENAI_IMAGE_STD
        elif cfg.source == "open_clip":
            if not cfg.model:
                raise RecipeError("teacher.model: the open_clip source needs a model name "
                                  "(e.g. ViT-B-32) or a model-config JSON path")
            clip = load_open_clip(cfg.model, cfg.path)
            tokenizer = ClipTokenizer(clip.text.shape.context_length)
            mean, std = open_clip_normalization(cfg.model, cfg.path)
        elif cfg.source == "hf":
            clip = load_hf(cfg.path)
            tokenizer = HfClipTokenizer(cfg.path, clip.text.shape.context_length)
            mean, std = hf_normalization(cfg.path)
        else:
            raise RecipeError(f"teacher.source: unknown source {cfg.source!r}; "
                              f"expected demo, openai, open_clip or hf")
    except (FileNotFoundError, pickle.UnpicklingError) as error:
        raise RecipeError(f"teacher.path: {error}") from error
    if tokenizer.vocab_size > clip.text.shape.vocab_size:
        raise RecipeError(f"teacher: the tokenizer has {tokenizer.vocab_size} tokens but the text "
                          f"tower's embedding only {clip.text.shape.vocab_size}")
    return Teacher(clip.to(PRECISIONS[cfg.precision]), tokenizer, mean, std, assumptions)


# --------------------------------------------------------------------------- word-tokenizer files

def save_word_teacher(path: str | Path, clip: Clip, vocabulary: list[str],
                      image_mean: Sequence[float], image_std: Sequence[float]) -> None:
    """Write ``clip`` in fp16 to a safetensors file whose metadata holds everything needed to
    load it (`load_word_teacher`): both tower shapes, the logit scale, the image normalisation
    and the `WordTokenizer` vocabulary."""
    text = clip.text.shape
    tokenizer = WordTokenizer(vocabulary, text.context_length)
    if tokenizer.vocab_size > text.vocab_size or text.eot_token_id != tokenizer.eot_token_id:
        raise ValueError(f"the text tower (vocab_size {text.vocab_size}, eot_token_id "
                         f"{text.eot_token_id}) cannot read a WordTokenizer of {tokenizer.vocab_size} "
                         f"ids ending texts with {tokenizer.eot_token_id}")
    metadata = {"vision": dataclasses.asdict(clip.visual.shape),
                "text": dataclasses.asdict(text),
                "logit_scale": clip.logit_scale.item(),
                "image_mean": list(image_mean), "image_std": list(image_std),
                "vocabulary": list(vocabulary)}
    weights = {name: tensor.detach().half().contiguous() for name, tensor in clip.state_dict().items()}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(weights, str(path), metadata={WORD_TEACHER_METADATA: json.dumps(metadata)})


def load_word_teacher(path: str | Path) -> tuple[Clip, WordTokenizer, tuple, tuple]:
    """``(clip, tokenizer, image_mean, image_std)`` of a `save_word_teacher` file, clip in fp32."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"teacher weights not found at {path}; the demo teacher is "
                                f"retrained with 'python -m tinyclip_ds.demo.teacher --out {path}'")
    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata() or {}
    if WORD_TEACHER_METADATA not in metadata:
        raise ValueError(f"{path} has no '{WORD_TEACHER_METADATA}' metadata (tower shapes and "
                         f"vocabulary), so it is not a demo-source teacher; write one with "
                         f"'python -m tinyclip_ds.demo.teacher --out {path}' or pick the source "
                         f"of its format (openai, open_clip, hf)")
    meta = json.loads(metadata[WORD_TEACHER_METADATA])
    tokenizer = WordTokenizer(meta["vocabulary"], meta["text"]["context_length"])
    clip = _build_clip(TowerShape(**meta["vision"]), TowerShape(**meta["text"]),
                       load_file(str(path)), str(path))
    return clip, tokenizer, tuple(meta["image_mean"]), tuple(meta["image_std"])


# --------------------------------------------------------------------------- OpenAI / open_clip

# OpenAI's parameter names, which open_clip's CLIP class keeps.
_OPENAI_TOP = [
    (r"visual\.conv1\.weight", r"visual.patch_embed.weight"),
    (r"visual\.(class_embedding|positional_embedding|proj|ln_pre\.\w+|ln_post\.\w+)", r"visual.\1"),
    (r"(token_embedding\.weight|positional_embedding|ln_final\.\w+|text_projection)", r"text.\1"),
    (r"logit_scale", r"logit_scale"),
]
_OPENAI_TOWERS = [(r"visual\.transformer\.resblocks\.(\d+)\.", "visual.transformer."),
                  (r"transformer\.resblocks\.(\d+)\.", "text.transformer.")]
_OPENAI_BLOCK = [
    (r"ln_(1|2)\.(weight|bias)", r"norms.{i}.ln_\1.\2"),
    (r"attn\.in_proj_(weight|bias)", r"blocks.{i}.attn.qkv.\1"),
    (r"attn\.out_proj\.(weight|bias)", r"blocks.{i}.attn.out.\1"),
    (r"mlp\.c_fc\.(weight|bias)", r"blocks.{i}.mlp.fc.\1"),
    (r"mlp\.c_proj\.(weight|bias)", r"blocks.{i}.mlp.proj.\1"),
]
# Metadata tensors OpenAI's TorchScript archives carry next to the weights.
_OPENAI_METADATA = ("input_resolution", "context_length", "vocab_size")


def load_openai(path: str | Path, activation: str = "quick_gelu", image_heads: int = 0,
                text_heads: int = 0) -> Clip:
    """Load an OpenAI CLIP ViT checkpoint (TorchScript archive or state dict), shapes inferred
    from the weights as OpenAI's ``build_model`` does; the file cannot tell the ``activation``
    or the head counts (0: width / 64, OpenAI's convention)."""
    state = read_state_dict(path)
    if any(key.startswith("visual.layer1.") for key in state):
        raise ValueError(f"{path} is a ResNet CLIP checkpoint; only ViT teachers are supported")
    required = ["visual.conv1.weight", "visual.positional_embedding", "text_projection",
                "positional_embedding", "token_embedding.weight", "ln_final.weight"]
    absent = [key for key in required if key not in state]
    if absent:
        raise CheckpointMismatchError(f"{path} is not an OpenAI CLIP ViT checkpoint: it lacks "
                                      f"{', '.join(absent)}")
    patch = state["visual.conv1.weight"]
    vision_width, text_width = patch.shape[0], state["ln_final.weight"].shape[0]
    grid = round((state["visual.positional_embedding"].shape[0] - 1) ** 0.5)
    common = dict(output_dim=state["text_projection"].shape[1], act=activation)
    vision = TowerShape(width=vision_width,
                        layers=_count_layers(state, "visual.transformer.resblocks."),
                        heads=_openai_heads(vision_width, image_heads, "image_heads"),
                        mlp_width=4 * vision_width, patch_size=patch.shape[-1],
                        image_size=patch.shape[-1] * grid, **common)
    text = TowerShape(width=text_width, layers=_count_layers(state, "transformer.resblocks."),
                      heads=_openai_heads(text_width, text_heads, "text_heads"),
                      mlp_width=4 * text_width,
                      vocab_size=state["token_embedding.weight"].shape[0],
                      context_length=state["positional_embedding"].shape[0],
                      eot_token_id=None, **common)
    return _build_clip(vision, text, _from_openai_names(state), str(path))


def _openai_heads(width: int, heads: int, key: str) -> int:
    """``heads``, or OpenAI's width / 64 for 0; a count not dividing the width is refused."""
    if heads and width % heads:
        raise RecipeError(f"teacher.{key}={heads} does not divide the tower's width {width}")
    return heads or width // 64


def _load_openai_assuming(cfg: TeacherConfig) -> tuple[Clip, list[str]]:
    """The teacher of an OpenAI-layout file, and one line for each shape the file could not
    tell and was assumed, with the override that changes it."""
    activation, notes = cfg.activation, []
    if activation == "auto":
        activation = _torchscript_activation(Path(cfg.path))
        if activation is None:
            activation = "quick_gelu"
            notes.append("activation quick_gelu (assumed: an OpenAI-layout file does not "
                         "record it; override with --set teacher.activation=gelu, e.g. for "
                         "open_clip GELU weights)")
    clip = load_openai(cfg.path, activation, cfg.image_heads, cfg.text_heads)
    for kind, tower in (("image", clip.visual), ("text", clip.text)):
        if not getattr(cfg, f"{kind}_heads"):
            notes.append(f"{kind} tower heads {tower.shape.heads} (assumed: width "
                         f"{tower.shape.width} / 64, OpenAI's convention; override with "
                         f"--set teacher.{kind}_heads=N)")
    return clip, notes


def load_open_clip(model: str, weights: str | Path) -> Clip:
    """Load an open_clip ViT CLIP: ``model`` is an open_clip model name or model-config JSON,
    ``weights`` a local weights file (or, when online, an open_clip pretrained tag)."""
    model_cfg, _ = open_clip_config(model)
    vision, text = open_clip_shapes(model_cfg)
    path = _open_clip_weights(model, weights)
    return _build_clip(vision, text, _from_openai_names(read_state_dict(path)), str(path))


def open_clip_config(model: str) -> tuple[dict, dict]:
    """``(model_cfg, preprocess_cfg)`` of an open_clip model name or model-config JSON file
    (a bare model config, or open_clip's ``{"model_cfg": ..., "preprocess_cfg": ...}``)."""
    if model.endswith(".json") or Path(model).is_file():
        if not Path(model).is_file():
            raise FileNotFoundError(f"open_clip model config {model} does not exist")
        with open(model) as f:
            data = json.load(f)
        return data.get("model_cfg", data), data.get("preprocess_cfg", {})
    import open_clip

    model_cfg = open_clip.get_model_config(model)
    if model_cfg is None:
        raise ValueError(f"unknown open_clip model {model!r}: use a name from "
                         f"open_clip.list_models() (e.g. ViT-B-32) or a model-config JSON path")
    return model_cfg, {}


def open_clip_normalization(model: str, weights: str | Path) -> tuple[tuple, tuple]:
    """Image mean and std of an open_clip model: its pretrained tag's, else its config's,
    else OpenAI's."""
    model_cfg, preprocess = open_clip_config(model)
    vision_cfg = model_cfg.get("vision_cfg", {})
    mean = preprocess.get("mean", vision_cfg.get("image_mean", OPENAI_IMAGE_MEAN))
    std = preprocess.get("std", vision_cfg.get("image_std", OPENAI_IMAGE_STD))
    if not Path(weights).is_file():
        import open_clip

        tag = open_clip.get_pretrained_cfg(model, str(weights))
        mean, std = tag.get("mean", mean), tag.get("std", std)
    return tuple(mean), tuple(std)


# Config fields we implement (or that do not change inference); any other field must keep
# open_clip's default.
_OPEN_CLIP_TOP = {"embed_dim", "vision_cfg", "text_cfg", "quick_gelu", "init_logit_scale",
                  "nonscalar_logit_scale", "custom_text"}
_OPEN_CLIP_VISION = {"layers", "width", "head_width", "mlp_ratio", "patch_size", "image_size",
                     "patch_dropout", "output_tokens", "norm_kwargs", "image_mean", "image_std"}
_OPEN_CLIP_TEXT = {"context_length", "vocab_size", "width", "heads", "layers", "mlp_ratio",
                   "pad_id", "eos_id", "pool_type", "output_tokens", "norm_kwargs"}


def open_clip_shapes(model_cfg: dict) -> tuple[TowerShape, TowerShape]:
    """Tower shapes of a standard open_clip ViT + text-transformer model config; a clear error
    names any configured feature the towers do not implement."""
    from open_clip.model import CLIPTextCfg, CLIPVisionCfg

    unsupported = [f"{key}={value!r}" for key, value in model_cfg.items()
                   if key not in _OPEN_CLIP_TOP and value is not None]
    vision_cfg, text_cfg = model_cfg["vision_cfg"], model_cfg["text_cfg"]
    if isinstance(vision_cfg.get("layers"), (list, tuple)):
        unsupported.append("vision_cfg.layers as a list (a ResNet image tower)")
    unsupported += _unsupported_fields(vision_cfg, CLIPVisionCfg, _OPEN_CLIP_VISION, "vision_cfg")
    unsupported += _unsupported_fields(text_cfg, CLIPTextCfg, _OPEN_CLIP_TEXT, "text_cfg")
    if text_cfg.get("pool_type", "argmax") not in ("argmax", "eos"):
        unsupported.append(f"text_cfg.pool_type={text_cfg['pool_type']!r} "
                           f"(only 'argmax' and 'eos')")
    if unsupported:
        raise ValueError("open_clip model config uses features tinyclip_ds teachers do not "
                         "implement: " + "; ".join(unsupported))
    vision = CLIPVisionCfg(**{key: value for key, value in vision_cfg.items()
                              if key not in ("image_mean", "image_std")})
    text = CLIPTextCfg(**text_cfg)
    image_size, patch_size = _square(vision.image_size), _square(vision.patch_size)
    if image_size is None or patch_size is None:
        raise ValueError(f"open_clip vision_cfg: non-square image_size {vision.image_size} or "
                         f"patch_size {vision.patch_size} is not supported")
    act = "quick_gelu" if model_cfg.get("quick_gelu") else "gelu"
    common = dict(output_dim=model_cfg["embed_dim"], act=act)
    vision_shape = TowerShape(width=vision.width, layers=vision.layers,
                              heads=vision.width // vision.head_width,
                              mlp_width=int(vision.width * vision.mlp_ratio),
                              ln_eps=_norm_eps(vision.norm_kwargs), image_size=image_size,
                              patch_size=patch_size, **common)
    text_shape = TowerShape(width=text.width, layers=text.layers, heads=text.heads,
                            mlp_width=int(text.width * text.mlp_ratio),
                            ln_eps=_norm_eps(text.norm_kwargs), vocab_size=text.vocab_size,
                            context_length=text.context_length,
                            eot_token_id=text.eos_id if text.pool_type == "eos" else None, **common)
    return vision_shape, text_shape


def _unsupported_fields(cfg: dict, defaults_cls: type, supported: set[str], name: str) -> list[str]:
    """Fields of an open_clip tower config that are set away from their default and that we
    do not implement (including fields this open_clip version does not know)."""
    defaults = dataclasses.asdict(defaults_cls())
    problems = [f"{name}.{key}={value!r}" for key, value in cfg.items()
                if key not in supported and (key not in defaults or value != defaults[key])]
    norm = cfg.get("norm_kwargs") or {}
    if set(norm) - {"eps"}:
        problems.append(f"{name}.norm_kwargs={norm!r} (only eps)")
    return problems


def _square(size: int | Sequence[int]) -> int | None:
    if isinstance(size, int):
        return size
    return size[0] if len(set(size)) == 1 else None


def _norm_eps(norm_kwargs: dict | None) -> float:
    return (norm_kwargs or {}).get("eps", 1e-5)


def _open_clip_weights(model: str, weights: str | Path) -> Path:
    """The local weights file, downloading an open_clip pretrained tag when it is not a file."""
    if Path(weights).is_file():
        return Path(weights)
    import open_clip

    tag = open_clip.get_pretrained_cfg(model, str(weights))
    if not tag:
        raise FileNotFoundError(
            f"open_clip weights {str(weights)!r} do not exist and are not a pretrained tag of "
            f"{model} (tags: {open_clip.list_pretrained_tags_by_model(model)})")
    model_cfg, _ = open_clip_config(model)
    if tag.get("quick_gelu", False) != model_cfg.get("quick_gelu", False):
        raise ValueError(f"open_clip tag {weights!r} was trained with quick_gelu="
                         f"{tag.get('quick_gelu', False)} but model {model} has the other "
                         f"activation; use the matching model name (e.g. {model}-quickgelu)")
    try:
        return Path(open_clip.download_pretrained(tag))
    except Exception as error:
        raise RuntimeError(f"could not download open_clip weights {model}/{weights}: {error}. "
                           f"Download them where the network allows and set teacher.path "
                           f"to the file") from error


def _from_openai_names(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """Rename an OpenAI / open_clip state dict (also open_clip's ``text.``-prefixed custom-text
    layout) to our parameter names; unknown keys keep their names."""
    state = {key.removeprefix("text."): value for key, value in state.items()
             if key not in _OPENAI_METADATA}
    if "logit_scale" in state and state["logit_scale"].numel() == 1:
        state["logit_scale"] = state["logit_scale"].reshape(())  # open_clip's nonscalar variant
    return _rename(state, _OPENAI_TOP, _OPENAI_TOWERS, _OPENAI_BLOCK)


def _count_layers(state: dict[str, Tensor], prefix: str) -> int:
    """1 + the largest block index under ``prefix`` (a gap shows up as missing keys later)."""
    pattern = re.compile(re.escape(prefix) + r"(\d+)\.")
    indices = [int(match.group(1)) for key in state if (match := pattern.match(key))]
    return 1 + max(indices, default=-1)


# --------------------------------------------------------------------------- Hugging Face

_HF_TOP = [
    (r"vision_model\.embeddings\.patch_embedding\.weight", r"visual.patch_embed.weight"),
    (r"vision_model\.embeddings\.class_embedding", r"visual.class_embedding"),
    (r"vision_model\.embeddings\.position_embedding\.weight", r"visual.positional_embedding"),
    (r"vision_model\.pre_layrnorm\.(weight|bias)", r"visual.ln_pre.\1"),
    (r"vision_model\.post_layernorm\.(weight|bias)", r"visual.ln_post.\1"),
    (r"visual_projection\.weight", r"visual.proj"),
    (r"text_model\.embeddings\.token_embedding\.weight", r"text.token_embedding.weight"),
    (r"text_model\.embeddings\.position_embedding\.weight", r"text.positional_embedding"),
    (r"text_model\.final_layer_norm\.(weight|bias)", r"text.ln_final.\1"),
    (r"text_projection\.weight", r"text.text_projection"),
    (r"logit_scale", r"logit_scale"),
]
_HF_TOWERS = [(r"vision_model\.encoder\.layers\.(\d+)\.", "visual.transformer."),
              (r"text_model\.encoder\.layers\.(\d+)\.", "text.transformer.")]
_HF_BLOCK = [
    (r"layer_norm(1|2)\.(weight|bias)", r"norms.{i}.ln_\1.\2"),
    (r"self_attn\.qkv_proj\.(weight|bias)", r"blocks.{i}.attn.qkv.\1"),  # fused by _from_hf_names
    (r"self_attn\.out_proj\.(weight|bias)", r"blocks.{i}.attn.out.\1"),
    (r"mlp\.fc1\.(weight|bias)", r"blocks.{i}.mlp.fc.\1"),
    (r"mlp\.fc2\.(weight|bias)", r"blocks.{i}.mlp.proj.\1"),
]
_HF_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
_HF_ACTIVATIONS = ("quick_gelu", "gelu")  # transformers' "gelu" is the exact (erf) one


def load_hf(directory: str | Path) -> Clip:
    """Load a Hugging Face ``CLIPModel`` directory (config.json + model.safetensors or
    pytorch_model.bin, possibly sharded)."""
    directory = Path(directory)
    if not (directory / "config.json").is_file():
        raise FileNotFoundError(f"{directory} is not a Hugging Face model directory "
                                f"(no config.json)")
    from transformers import CLIPConfig

    config = CLIPConfig.from_pretrained(directory)
    if config.model_type != "clip":
        raise ValueError(f"{directory} holds a {config.model_type!r} model; "
                         f"only CLIPModel is supported")
    vision_cfg, text_cfg = config.vision_config, config.text_config
    for name, tower in (("vision_config", vision_cfg), ("text_config", text_cfg)):
        if tower.hidden_act not in _HF_ACTIVATIONS:
            raise ValueError(f"{directory}: {name}.hidden_act={tower.hidden_act!r} is not "
                             f"supported (only {', '.join(_HF_ACTIVATIONS)})")
    if vision_cfg.num_channels != 3:
        raise ValueError(f"{directory}: vision_config.num_channels="
                         f"{vision_cfg.num_channels}; only 3 is supported")
    vision = TowerShape(width=vision_cfg.hidden_size, layers=vision_cfg.num_hidden_layers,
                        heads=vision_cfg.num_attention_heads,
                        mlp_width=vision_cfg.intermediate_size,
                        output_dim=config.projection_dim, act=vision_cfg.hidden_act,
                        ln_eps=vision_cfg.layer_norm_eps, image_size=vision_cfg.image_size,
                        patch_size=vision_cfg.patch_size)
    if not isinstance(text_cfg.eos_token_id, int):
        raise ValueError(f"{directory}: text_config.eos_token_id={text_cfg.eos_token_id!r}; "
                         f"a single token id is needed to pool the text")
    # transformers pools at argmax(ids) when eos_token_id == 2 (configs from before its fix),
    # otherwise at the first eos_token_id.
    eot = None if text_cfg.eos_token_id == 2 else text_cfg.eos_token_id
    text = TowerShape(width=text_cfg.hidden_size, layers=text_cfg.num_hidden_layers,
                      heads=text_cfg.num_attention_heads, mlp_width=text_cfg.intermediate_size,
                      output_dim=config.projection_dim, act=text_cfg.hidden_act,
                      ln_eps=text_cfg.layer_norm_eps, vocab_size=text_cfg.vocab_size,
                      context_length=text_cfg.max_position_embeddings, eot_token_id=eot)
    path = _hf_weights_file(directory)
    state = _from_hf_names(read_state_dict(path))
    return _build_clip(vision, text, state, str(path))


def hf_normalization(directory: str | Path) -> tuple[tuple, tuple]:
    """Image mean and std from the directory's preprocessor_config.json, else OpenAI's."""
    config_file = Path(directory) / "preprocessor_config.json"
    if not config_file.is_file():
        return OPENAI_IMAGE_MEAN, OPENAI_IMAGE_STD
    with open(config_file) as f:
        config = json.load(f)
    return (tuple(config.get("image_mean", OPENAI_IMAGE_MEAN)),
            tuple(config.get("image_std", OPENAI_IMAGE_STD)))


def _hf_weights_file(directory: Path) -> Path:
    """The weights file (or shard index) of an HF directory, safetensors preferred."""
    for name in _HF_WEIGHT_FILES:
        for candidate in (directory / name, directory / f"{name}.index.json"):
            if candidate.is_file():
                return candidate
    raise FileNotFoundError(f"{directory} has no weights: expected one of "
                            f"{', '.join(_HF_WEIGHT_FILES)} (or their .index.json shards)")


def _from_hf_names(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """Rename a CLIPModel state dict to ours: q, k, v fused into qkv (in that order) and the
    projections transposed (HF Linear weights are (out, in), ours (width, output_dim))."""
    state = {key: value for key, value in state.items() if not key.endswith(".position_ids")}
    for key in [k for k in state if k.endswith(".self_attn.q_proj.weight")
                or k.endswith(".self_attn.q_proj.bias")]:
        parts = [key.replace(".q_proj.", f".{p}_proj.") for p in "qkv"]
        if all(part in state for part in parts):
            state[key.replace(".q_proj.", ".qkv_proj.")] = torch.cat([state.pop(p) for p in parts])
    for key in ("visual_projection.weight", "text_projection.weight"):
        if key in state:
            state[key] = state[key].t()
    return _rename(state, _HF_TOP, _HF_TOWERS, _HF_BLOCK)


# --------------------------------------------------------------------------- shared

def read_state_dict(path: str | Path) -> dict[str, Tensor]:
    """Tensors of a weights file: safetensors, TorchScript archive, torch.save'd dict (possibly
    under "state_dict", "module." prefixes stripped) or an HF shard index (shards alongside)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights file {path} does not exist")
    if path.name.endswith(".index.json"):
        with open(path) as f:
            shards = sorted(set(json.load(f)["weight_map"].values()))
        return {k: v for shard in shards for k, v in read_state_dict(path.parent / shard).items()}
    if path.suffix == ".safetensors":
        state = load_file(path)
    elif _is_torchscript(path):
        state = read_torchscript(path)
    else:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as error:
            raise pickle.UnpicklingError(f"{path}: {_refusal(error)}") from None
        if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
            state = state["state_dict"]
    if not isinstance(state, dict):
        raise ValueError(f"{path} holds a {type(state).__name__}, not a state dict")
    return {key.removeprefix("module."): value for key, value in state.items()}


def _refusal(error: pickle.UnpicklingError) -> str:
    """Why a file was not unpickled, in one line (torch's weights-only message is long)."""
    text = str(error)
    found = re.search(r"GLOBAL (\S+)", text) or re.search(r"WeightsUnpickler error: (.*)", text)
    if not found:
        return text
    return (f"holds Python objects besides tensors and plain data ({found.group(1)}), which "
            f"loading could run as code: not loaded. Use a state dict of tensors "
            f"(torch.save(model.state_dict(), ...)) or safetensors")


def _is_torchscript(path: Path) -> bool:
    """TorchScript archives are zip files with a constants.pkl next to the code."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return any(name.endswith("/constants.pkl") for name in archive.namelist())


# A TorchScript archive (OpenAI's release format) pickles its module tree in data.pkl: objects
# of the archive's own ``__torch__.*`` classes holding tensors stored beside it. torch.jit.load
# compiles those classes from the archive's code/ and runs it (``__setstate__``). We unpickle
# data.pkl with torch's weights-only unpickler instead, each class standing in as an inert
# object, and take the parameters and buffers the code's class headers list: no code runs.
_SCRIPT_MODULE = re.compile(r"^class (\w+)\(Module\):\n  __parameters__ = \[(.*)\]"
                            r"(?:\n  __buffers__ = \[(.*)\])?", re.MULTILINE)
# Pure helpers that TorchScript's pickler references for typed lists and containers.
_SCRIPT_PICKLE_HELPERS = [torch.jit._pickle.build_intlist, torch.jit._pickle.build_tensorlist,
                          torch.jit._pickle.build_doublelist, torch.jit._pickle.build_boollist,
                          torch.jit._pickle.restore_type_tag]


class _ScriptObject:
    """An inert stand-in for an object of a TorchScript archive: the pickled attributes only."""

    tensor_names: tuple[str, ...] = ()  # the parameters and buffers of its class

    def __setstate__(self, state) -> None:
        if not isinstance(state, dict):  # the class pickles its own state: only its code knows it
            raise pickle.UnpicklingError(
                f"{type(self).__module__}.{type(self).__name__} restores its state with its own "
                f"TorchScript code, which tinyclip_ds does not run; if the file comes from a "
                f"trusted source, convert it with "
                f"torch.save(torch.jit.load(path).state_dict(), 'weights.pt')")
        self.__dict__.update(state)


def _script_modules(path: Path) -> dict[str, tuple[str, ...]]:
    """The module classes an archive's code defines (qualified name -> its parameter and
    buffer names), read as text."""
    modules = {}
    with zipfile.ZipFile(path) as archive:
        for name in archive.namelist():
            if re.search(r"/code/__torch__(/.+)?\.py$", name):
                module = name.split("/code/", 1)[1].removesuffix(".py").replace("/", ".")
                for cls, params, buffers in _SCRIPT_MODULE.findall(archive.read(name).decode()):
                    modules[f"{module}.{cls}"] = tuple(re.findall(r'"(\w+)"', params + buffers))
    return modules


def read_torchscript(path: Path) -> dict[str, Tensor]:
    """``torch.jit.load(path).state_dict()`` of a TorchScript archive, without running its code."""
    # Named as in data.pkl (module path and class name), which is what allow-listing matches.
    stand_ins = [type(name.rsplit(".", 1)[1], (_ScriptObject,),
                      {"__module__": name.rsplit(".", 1)[0], "tensor_names": names})
                 for name, names in _script_modules(path).items()]
    reader = torch._C.PyTorchFileReader(str(path))
    with torch.serialization.safe_globals(stand_ins + _SCRIPT_PICKLE_HELPERS):
        try:  # what torch.load(weights_only=True) does, which refuses TorchScript archives
            root = torch.serialization._load(reader, "cpu", torch._weights_only_unpickler,
                                             encoding="utf-8")
        except pickle.UnpicklingError as error:
            raise pickle.UnpicklingError(f"TorchScript archive {path}: {_refusal(error)}") from None
    if not isinstance(root, _ScriptObject):
        raise ValueError(f"{path} holds a TorchScript {type(root).__name__}, not a module")
    return _script_state(root)


def _script_state(module: _ScriptObject, prefix: str = "") -> dict[str, Tensor]:
    """The parameters and buffers of an unpickled archive module and its submodules."""
    state = {}
    for name, value in vars(module).items():
        if isinstance(value, _ScriptObject):
            state.update(_script_state(value, f"{prefix}{name}."))
        elif name in module.tensor_names and value is not None:
            state[prefix + name] = value
    return state


def _torchscript_activation(path: Path) -> str | None:
    """The MLP activation a TorchScript archive's module classes show (QuickGELU or GELU, not
    both), or None for another file or when they do not tell."""
    if not _is_torchscript(path):
        return None
    found = {name.rsplit(".", 1)[1] for name in _script_modules(path)} & {"QuickGELU", "GELU"}
    if len(found) != 1:
        return None
    return "quick_gelu" if found == {"QuickGELU"} else "gelu"


def _rename(state: dict[str, Tensor], top: list[tuple[str, str]], towers: list[tuple[str, str]],
            block: list[tuple[str, str]]) -> dict[str, Tensor]:
    """Rename keys by the first matching rule: ``top`` for whole keys; ``towers`` for a block
    prefix (capturing the layer index) followed by a ``block`` rule. Unmatched keys are kept."""
    return {_rename_key(key, top, towers, block): value for key, value in state.items()}


def _rename_key(key: str, top: list[tuple[str, str]], towers: list[tuple[str, str]],
                block: list[tuple[str, str]]) -> str:
    for pattern, target in top:
        if match := re.fullmatch(pattern, key):
            return match.expand(target)
    for prefix, target_prefix in towers:
        if tower := re.match(prefix, key):
            for pattern, target in block:
                if match := re.fullmatch(pattern, key[tower.end():]):
                    return target_prefix + match.expand(target).format(i=tower.group(1))
    return key


def _build_clip(vision: TowerShape, text: TowerShape, state: dict[str, Tensor],
                source: str) -> Clip:
    """A `Clip` of these shapes holding exactly ``state`` (fp32), or a `CheckpointMismatchError`."""
    with torch.device("meta"):  # no time spent on an initialisation that is overwritten
        clip = Clip(vision, text)
    expected = {key: tuple(value.shape) for key, value in clip.state_dict().items()}
    missing = sorted(expected.keys() - state.keys())
    unexpected = sorted(state.keys() - expected.keys())
    wrong_shape = [f"{key}: checkpoint {tuple(state[key].shape)}, model {expected[key]}"
                   for key in sorted(expected.keys() & state.keys())
                   if tuple(state[key].shape) != expected[key]]
    if missing or unexpected or wrong_shape:
        problems = [f"  {title} ({len(items)}): " + _shorten(items)
                    for title, items in (("missing keys", missing), ("unexpected keys", unexpected),
                                         ("shape mismatches", wrong_shape)) if items]
        raise CheckpointMismatchError(
            f"{source} does not match the model built for it (keys renamed to tinyclip_ds "
            f"parameters where a rule matched):\n" + "\n".join(problems))
    clip.load_state_dict({key: value.float().contiguous() for key, value in state.items()},
                         strict=True, assign=True)
    return clip


def _shorten(items: list[str], limit: int = 20) -> str:
    more = f", ... and {len(items) - limit} more" if len(items) > limit else ""
    return ", ".join(items[:limit]) + more
