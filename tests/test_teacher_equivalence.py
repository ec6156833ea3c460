"""Teacher loaders against the source libraries' own forward passes (random weights, no downloads).

Each library builds a model with random weights; we save it the way that library does, load
it through our loader and compare embeddings with the library's ``encode_*`` /
``get_*_features`` in fp32. Every parameter is perturbed first so that LayerNorm weights,
biases and projections are all distinct and a mis-mapped tensor cannot go unnoticed.
"""

from __future__ import annotations

import gzip
import json
import pickle
import tempfile
from pathlib import Path

import open_clip
import pytest
import torch
import torch.nn.functional as F
from open_clip.model import CLIP as OpenClipCLIP
from open_clip.tokenizer import SimpleTokenizer, default_bpe
from safetensors.torch import save_file
from torch import Tensor, nn
from transformers import CLIPConfig, CLIPModel

from tinyclip_ds.config import RecipeError
from tinyclip_ds.models.tokenizer import ClipTokenizer, HfClipTokenizer
from tinyclip_ds.models.config import TeacherConfig
from tinyclip_ds.models.teachers import (
    CheckpointMismatchError,
    Teacher,
    load_hf,
    load_open_clip,
    load_openai,
    load_teacher,
)
from tinyclip_ds.models.transformer import Clip, Request

TOLERANCE = 1e-5
SOT, EOT = 49406, 49407

# open_clip model configs of small towers. Shapes OpenAI's build_model can infer (heads =
# width // 64, MLP 4×, QuickGELU, argmax pooling) ...
SMALL_OPENAI = {
    "embed_dim": 96, "quick_gelu": True,
    "vision_cfg": {"image_size": 64, "layers": 2, "width": 128, "patch_size": 16},
    "text_cfg": {"context_length": 24, "vocab_size": 49408, "width": 64, "heads": 1, "layers": 2},
}
# ... and non-default features only open_clip configs express: GELU, MLP ratio, head width,
# LayerNorm eps, pooling at the first eos_id.
SMALL_FEATURES = {
    "embed_dim": 80,
    "vision_cfg": {"image_size": 48, "layers": 3, "width": 96, "head_width": 32, "patch_size": 8,
                   "mlp_ratio": 2.5, "norm_kwargs": {"eps": 1e-6}},
    "text_cfg": {"context_length": 20, "vocab_size": 49408, "width": 64, "heads": 4, "layers": 3,
                 "mlp_ratio": 3.0, "pool_type": "eos", "eos_id": 7, "norm_kwargs": {"eps": 1e-6}},
}


def perturb(model: nn.Module, seed: int = 0) -> nn.Module:
    """Add noise to every parameter (libraries initialise LayerNorms to 1/0, some biases to 0)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.02 * torch.randn(param.shape, generator=generator))
    return model.eval()


def text_ids(batch_eot: list[int], context: int, eot: int, pad: int, seed: int = 0,
             low: int = 1, high: int = SOT) -> Tensor:
    """Token ids: start token, random text, the end token at each row's position, padding."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(low, high, (len(batch_eot), context), generator=generator)
    ids[:, 0] = SOT
    for row, position in enumerate(batch_eot):
        ids[row, position] = eot
        ids[row, position + 1:] = pad
    return ids


def images(batch: int, size: int, seed: int = 0) -> Tensor:
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


def features(output) -> Tensor:
    """transformers 5 returns a ModelOutput from get_*_features; 4.x returned the tensor."""
    return output if isinstance(output, Tensor) else output.pooler_output


def assert_close(ours: Tensor, reference: Tensor, what: str) -> None:
    assert ours.shape == reference.shape, f"{what}: shape {ours.shape} vs {reference.shape}"
    error = (ours - reference).abs().max().item()
    assert error <= TOLERANCE, f"{what}: max abs difference {error:.3g} > {TOLERANCE}"


def open_clip_inputs(library: nn.Module) -> tuple[Tensor, Tensor]:
    """Two images and two texts (end token early and last) for an open_clip model."""
    x = images(2, library.visual.image_size[0])
    ctx = library.context_length
    if library.text_pool_type == "argmax":
        return x, text_ids([5, ctx - 1], ctx, EOT, pad=0)
    # ids above eos_id, so that pooling at argmax would pick another position
    eos = library.text_eos_id
    return x, text_ids([4, ctx - 1], ctx, eos, pad=0, low=eos + 1)


def assert_matches_open_clip(clips: dict[str, Clip], library: nn.Module) -> None:
    """Each loaded clip's embeddings and logit scale against open_clip's encode_image/_text."""
    x, ids = open_clip_inputs(library)
    with torch.no_grad():
        image, text = library.encode_image(x), library.encode_text(ids)
        for what, clip in clips.items():
            clip.eval()
            assert_close(clip.encode_image(x), image, f"{what} image")
            assert_close(clip.encode_text(ids), text, f"{what} text")
            assert_close(clip.logit_scale, library.logit_scale.reshape(()), f"{what} logit_scale")


def save_torchscript(state: dict[str, Tensor], path: Path,
                     extra: dict[str, nn.Module] | None = None) -> None:
    """A TorchScript archive whose state_dict has exactly these names, as OpenAI's releases
    (plus the ``extra`` modules, by dotted name)."""
    root = nn.Module()
    for name, value in [*state.items(), *(extra or {}).items()]:
        *parents, leaf = name.split(".")
        module = root
        for part in parents:
            if part not in module._modules:
                module.add_module(part, nn.Module())
            module = module._modules[part]
        if isinstance(value, nn.Module):
            module.add_module(leaf, value)
        else:
            module.register_buffer(leaf, value.clone())
    torch.jit.script(root).save(str(path))


def open_clip_library(config: dict) -> nn.Module:
    """open_clip's own CLIP built from a model config (random weights)."""
    return perturb(OpenClipCLIP(config["embed_dim"], config["vision_cfg"], config["text_cfg"],
                                quick_gelu=config.get("quick_gelu", False)))


@pytest.fixture
def scratch():
    """A folder deleted right after the test (pytest keeps tmp_path; ViT-B files are ~600 MB)."""
    with tempfile.TemporaryDirectory() as directory:
        yield Path(directory)


# --------------------------------------------------------------------------- OpenAI + open_clip

@pytest.mark.parametrize("name", ["ViT-B-32-quickgelu", "ViT-B-16-quickgelu", "small"])
def test_openai_and_open_clip_loaders_match_open_clip(name, scratch):
    if name == "small":
        model = scratch / "small.json"
        model.write_text(json.dumps(SMALL_OPENAI))
        library = open_clip_library(SMALL_OPENAI)
    else:
        model = name
        library = perturb(open_clip.create_model(name))
    state = library.state_dict()  # open_clip's CLIP keeps OpenAI's parameter names
    plain, archive = scratch / "plain.pt", scratch / "jit.pt"
    torch.save(state, plain)
    metadata = {"input_resolution": torch.tensor(224), "context_length": torch.tensor(77),
                "vocab_size": torch.tensor(49408)}
    save_torchscript({**state, **metadata}, archive)

    assert_matches_open_clip({f"open_clip {name}": load_open_clip(str(model), plain),
                              f"openai state dict {name}": load_openai(plain),
                              f"openai TorchScript {name}": load_openai(archive)}, library)


def test_open_clip_config_features_and_file_formats(tmp_path):
    """GELU, MLP ratio, head width, LayerNorm eps and eos pooling from a config JSON; weights
    as safetensors and as a training checkpoint ("state_dict" wrapper, DDP "module." prefix)."""
    library = open_clip_library(SMALL_FEATURES)
    config = tmp_path / "model.json"
    config.write_text(json.dumps(SMALL_FEATURES))
    state = library.state_dict()
    save_file(state, tmp_path / "weights.safetensors")
    torch.save({"epoch": 3, "state_dict": {f"module.{k}": v for k, v in state.items()}},
               tmp_path / "checkpoint.pt")
    clips = {weights: load_open_clip(str(config), tmp_path / weights)
             for weights in ("weights.safetensors", "checkpoint.pt")}
    for clip in clips.values():
        assert clip.text.shape.eot_token_id == 7 and clip.visual.shape.ln_eps == 1e-6
    assert_matches_open_clip(clips, library)


# --------------------------------------------------------------------------- Hugging Face

HF_SHAPES = {
    "ViT-B-32": dict(
        vision_config=dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                           intermediate_size=3072, patch_size=32, image_size=224),
        text_config=dict(hidden_size=512, num_hidden_layers=12, num_attention_heads=8,
                         intermediate_size=2048, max_position_embeddings=77, eos_token_id=2),
        projection_dim=512),
    "ViT-B-16": dict(
        vision_config=dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                           intermediate_size=3072, patch_size=16, image_size=224,
                           hidden_act="gelu"),
        text_config=dict(hidden_size=512, num_hidden_layers=12, num_attention_heads=8,
                         intermediate_size=2048, max_position_embeddings=77, eos_token_id=EOT,
                         hidden_act="gelu"),
        projection_dim=512),
    "small": dict(
        vision_config=dict(hidden_size=96, num_hidden_layers=2, num_attention_heads=3,
                           intermediate_size=200, patch_size=8, image_size=48, layer_norm_eps=1e-6),
        text_config=dict(hidden_size=64, num_hidden_layers=3, num_attention_heads=4,
                         intermediate_size=128, max_position_embeddings=16, eos_token_id=7,
                         vocab_size=49408, hidden_act="gelu", layer_norm_eps=1e-6),
        projection_dim=40),
}


def save_hf(name: str, directory: Path, **text_changes) -> CLIPModel:
    config = CLIPConfig(**HF_SHAPES[name])
    for key, value in text_changes.items():
        setattr(config.text_config, key, value)
    library = perturb(CLIPModel(config))
    library.save_pretrained(directory)
    return library


@pytest.mark.parametrize("name", list(HF_SHAPES))
def test_hf_loader_matches_transformers(name, scratch):
    library = save_hf(name, scratch)
    clip = load_hf(scratch).eval()
    text_config = library.config.text_config
    ctx, eos = text_config.max_position_embeddings, text_config.eos_token_id
    if eos == 2:  # configs from before transformers' fix: pooled at argmax(ids)
        ids = text_ids([3, ctx - 1], ctx, EOT, pad=0)
    elif eos == EOT:  # pooled at the first end token; transformers' tokenizer pads with it
        ids = text_ids([3, ctx - 1], ctx, EOT, pad=EOT)
    else:  # ids above eos, so that pooling at argmax would pick another position
        ids = text_ids([3, ctx - 1], ctx, eos, pad=eos, low=eos + 1)
    x = images(2, library.config.vision_config.image_size)
    with torch.no_grad():
        assert_close(clip.encode_image(x), features(library.get_image_features(pixel_values=x)),
                     f"hf {name} image")
        assert_close(clip.encode_text(ids), features(library.get_text_features(input_ids=ids)),
                     f"hf {name} text")
    assert_close(clip.logit_scale, library.logit_scale, f"hf {name} logit_scale")


# --------------------------------------------------------------------------- intermediates

@pytest.mark.parametrize("config", [SMALL_OPENAI, SMALL_FEATURES], ids=["argmax", "eos"])
def test_intermediates_match_open_clip_internals(config, tmp_path):
    library = open_clip_library(config)
    (tmp_path / "model.json").write_text(json.dumps(config))
    torch.save(library.state_dict(), tmp_path / "weights.pt")
    clip = load_open_clip(str(tmp_path / "model.json"), tmp_path / "weights.pt").eval()
    everything = dict(hidden=True, attention=True, qkv=True, embeddings=True, tokens=True)
    x = images(2, clip.visual.shape.image_size)
    ctx = clip.text.shape.context_length
    eos = clip.text.shape.eot_token_id
    eot_positions = [4, ctx - 1]
    ids = (text_ids(eot_positions, ctx, EOT, pad=0) if eos is None
           else text_ids(eot_positions, ctx, eos, pad=0, low=eos + 1))

    with torch.no_grad():
        for tower, inputs, lib_tower in ((clip.visual, x, library.visual),
                                         (clip.text, ids, library)):
            depth = tower.transformer.depth
            out = tower(inputs, Request(layers=tuple(range(depth)), **everything))
            plain = tower(inputs)
            assert_close(out.embedding, plain.embedding, "embedding with every intermediate")
            check_intermediates(out, tower, inputs, lib_tower, is_text=tower is clip.text)

        text_out = clip.text(ids, Request(layers=(0,), tokens=True))
        positions = torch.arange(ctx)
        expected_tokens = positions[None, :] <= torch.tensor(eot_positions)[:, None]
        assert torch.equal(text_out.token_mask, expected_tokens)
        causal = positions[None, :] <= positions[:, None]
        assert text_out.attn_mask.shape == (2, 1, ctx, ctx)
        expected_attn = causal[None, None] & expected_tokens[:, None, :, None]
        assert torch.equal(text_out.attn_mask, expected_attn)
        image_out = clip.visual(x)
        assert image_out.attn_mask is None and bool(image_out.token_mask.all())
        assert image_out.token_mask.shape == (2, clip.visual.shape.grid ** 2 + 1)


def check_intermediates(out, tower, inputs: Tensor, lib_tower: nn.Module, is_text: bool) -> None:
    """Compare every returned intermediate with open_clip's own modules and shapes."""
    shape = tower.shape
    batch = inputs.shape[0]
    n = shape.context_length if is_text else shape.grid ** 2 + 1
    heads, head_dim = shape.heads, shape.head_dim
    blocks = lib_tower.transformer.resblocks
    if is_text:
        embeddings = lib_tower.token_embedding(inputs) + lib_tower.positional_embedding
        result = lib_tower.forward_intermediates(text=inputs, text_indices=None)
        layers = result["text_intermediates"]
        attn_mask = lib_tower.attn_mask
        first_input = embeddings
        final = lib_tower.ln_final(layers[-1])
        projection = lib_tower.text_projection
    else:
        patches = lib_tower.conv1(inputs).flatten(2).transpose(1, 2)
        cls = lib_tower.class_embedding.expand(batch, 1, -1)
        embeddings = torch.cat([cls, patches], dim=1) + lib_tower.positional_embedding
        result = lib_tower.forward_intermediates(inputs, indices=None, output_fmt="NLC",
                                                 output_extra_tokens=True)
        layers = [torch.cat([prefix, rest], dim=1) for prefix, rest in
                  zip(result["image_intermediates_prefix"], result["image_intermediates"])]
        attn_mask = None
        first_input = lib_tower.ln_pre(embeddings)
        final = lib_tower.ln_post(layers[-1])
        projection = lib_tower.proj

    assert_close(out.embeddings, embeddings, "embeddings")
    assert out.tokens.shape == (batch, n, shape.output_dim)
    assert_close(out.tokens, final @ projection, "tokens")
    every_layer = list(range(len(blocks)))
    assert sorted(out.hidden) == sorted(out.attn_scores) == sorted(out.qkv) == every_layer
    for layer, block in enumerate(blocks):
        assert_close(out.hidden[layer], layers[layer], f"hidden {layer}")
        x = block.ln_1(first_input if layer == 0 else layers[layer - 1])
        _, probs = block.attn(x, x, x, need_weights=True, average_attn_weights=False,
                              attn_mask=attn_mask)
        assert out.attn_probs[layer].shape == (batch, heads, n, n)
        assert_close(out.attn_probs[layer], probs, f"attention probabilities {layer}")
        q, k, v = F.linear(x, block.attn.in_proj_weight, block.attn.in_proj_bias).chunk(3, dim=-1)
        for ours, reference, name in zip(out.qkv[layer], (q, k, v), "qkv"):
            assert ours.shape == (batch, heads, n, head_dim)
            assert_close(ours, reference.view(batch, n, heads, head_dim).transpose(1, 2),
                         f"{name} {layer}")
        scores = out.qkv[layer][0] @ out.qkv[layer][1].transpose(-2, -1) / head_dim ** 0.5
        assert_close(out.attn_scores[layer], scores, f"attention scores {layer}")


# --------------------------------------------------------------------------- mismatches

def small_checkpoint(tmp_path: Path) -> tuple[Path, dict[str, Tensor]]:
    config = tmp_path / "model.json"
    config.write_text(json.dumps(SMALL_FEATURES))
    return config, open_clip_library(SMALL_FEATURES).state_dict()


def test_mismatched_open_clip_checkpoint_lists_every_problem(tmp_path):
    config, state = small_checkpoint(tmp_path)
    del state["visual.transformer.resblocks.1.mlp.c_fc.bias"]
    state["visual.extra_head.weight"] = torch.zeros(3)
    state["ln_final.weight"] = torch.ones(65)
    torch.save(state, tmp_path / "bad.pt")
    with pytest.raises(CheckpointMismatchError) as error:
        load_open_clip(str(config), tmp_path / "bad.pt")
    message = str(error.value)
    assert "missing keys (1): visual.transformer.blocks.1.mlp.fc.bias" in message
    assert "unexpected keys (1): visual.extra_head.weight" in message
    assert "shape mismatches (1): text.ln_final.weight: checkpoint (65,), model (64,)" in message


def test_mismatched_openai_and_hf_checkpoints(tmp_path):
    _, state = small_checkpoint(tmp_path)
    del state["transformer.resblocks.2.ln_2.bias"]
    torch.save(state, tmp_path / "openai.pt")
    with pytest.raises(CheckpointMismatchError, match=r"missing keys \(1\): "
                                                      r"text\.transformer\.norms\.2\.ln_2\.bias"):
        load_openai(tmp_path / "openai.pt")

    save_hf("small", tmp_path / "hf")
    from safetensors.torch import load_file

    hf_state = load_file(tmp_path / "hf" / "model.safetensors")
    del hf_state["vision_model.encoder.layers.1.self_attn.q_proj.weight"]
    save_file(hf_state, tmp_path / "hf" / "model.safetensors")
    with pytest.raises(CheckpointMismatchError) as error:
        load_hf(tmp_path / "hf")
    message = str(error.value)
    assert "missing keys (1): visual.transformer.blocks.1.attn.qkv.weight" in message
    assert "vision_model.encoder.layers.1.self_attn.k_proj.weight" in message


def test_unsupported_checkpoints_and_configs_are_named(tmp_path):
    torch.save({"visual.layer1.0.conv1.weight": torch.zeros(1)}, tmp_path / "rn50.pt")
    with pytest.raises(ValueError, match="ResNet"):
        load_openai(tmp_path / "rn50.pt")
    with pytest.raises(ValueError, match=r"vision_cfg\.layers as a list"):
        load_open_clip("RN50", tmp_path / "rn50.pt")
    config = json.loads(json.dumps(SMALL_FEATURES))
    config["vision_cfg"]["ls_init_value"] = 1e-5
    config["text_cfg"]["proj_bias"] = True
    config["init_logit_bias"] = -10
    (tmp_path / "odd.json").write_text(json.dumps(config))
    with pytest.raises(ValueError) as error:
        load_open_clip(str(tmp_path / "odd.json"), tmp_path / "rn50.pt")
    for feature in ("vision_cfg.ls_init_value=1e-05", "text_cfg.proj_bias=True",
                    "init_logit_bias=-10"):
        assert feature in str(error.value)


# --------------------------------------------------------------------------- teacher, tokenizers

def write_hf_tokenizer(directory: Path) -> None:
    """vocab.json + merges.txt for transformers' CLIPTokenizer, made from open_clip's BPE file
    (the same vocabulary as OpenAI's released tokenizer)."""
    names = {"<start_of_text>": "<|startoftext|>", "<end_of_text>": "<|endoftext|>"}
    encoder = SimpleTokenizer().encoder
    vocab = {names.get(token, token): index for token, index in encoder.items()}
    (directory / "vocab.json").write_text(json.dumps(vocab))
    merges = gzip.open(default_bpe()).read().decode("utf-8").split("\n")[1:49152 - 256 - 2 + 1]
    (directory / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")


def test_teacher_is_frozen_and_stays_in_eval(tmp_path):
    config, state = small_checkpoint(tmp_path)
    torch.save(state, tmp_path / "weights.pt")
    teacher = load_teacher(TeacherConfig(source="open_clip", model=str(config),
                                         path=str(tmp_path / "weights.pt")))
    assert isinstance(teacher, Teacher)
    teacher.train()
    assert not any(module.training for module in teacher.modules())
    assert not any(param.requires_grad for param in teacher.parameters())
    assert teacher.image_size == 48 and teacher.tokenizer.context_length == 20
    assert teacher.image_mean == pytest.approx((0.48145466, 0.4578275, 0.40821073))
    ids = teacher.tokenizer(["a photo of a seven"])
    assert not teacher.text(ids).embedding.requires_grad


def test_teacher_from_hf_directory_in_bf16(tmp_path):
    save_hf("small", tmp_path, eos_token_id=EOT)
    write_hf_tokenizer(tmp_path)
    (tmp_path / "preprocessor_config.json").write_text(
        json.dumps({"image_mean": [0.5, 0.5, 0.5], "image_std": [0.25, 0.25, 0.25]}))
    teacher = load_teacher(TeacherConfig(source="hf", path=str(tmp_path), precision="bf16"))
    assert teacher.image_mean == (0.5, 0.5, 0.5) and teacher.image_std == (0.25, 0.25, 0.25)
    assert {param.dtype for param in teacher.parameters()} == {torch.bfloat16}
    ids = teacher.tokenizer(["a 3 on the left and a 7 on the right", "seven"])
    assert ids.shape == (2, 16)
    assert teacher.text(ids).embedding.dtype == torch.bfloat16
    assert teacher.image(images(2, 48)).embedding.shape == (2, 40)


def test_missing_teacher_files_name_the_recipe_key(tmp_path):
    for cfg in (TeacherConfig(source="openai", path=str(tmp_path / "nope.pt")),
                TeacherConfig(source="hf", path=str(tmp_path)),
                TeacherConfig(source="open_clip", model="ViT-B-32", path=str(tmp_path / "x.pt"))):
        with pytest.raises(RecipeError, match=r"^teacher\.path: "):
            load_teacher(cfg)


def test_hf_and_open_clip_tokenizers_agree_and_pickle(tmp_path):
    write_hf_tokenizer(tmp_path)
    texts = ["a photo of a cat", "Two dogs, playing in the snow!", "word " * 40]
    ours, hf = ClipTokenizer(context_length=16), HfClipTokenizer(tmp_path, context_length=16)
    a, b = ours(texts), hf(texts)
    assert a.shape == b.shape == (3, 16) and a.dtype == b.dtype == torch.long
    assert ours.vocab_size == hf.vocab_size == 49408
    for row_a, row_b in zip(a, b):
        end = int((row_a == EOT).nonzero()[0])
        assert torch.equal(row_a[:end + 1], row_b[:end + 1])
        assert bool((row_a[end + 1:] == 0).all()) and bool((row_b[end + 1:] == EOT).all())
    assert a[2, -1] == EOT and b[2, -1] == EOT  # truncation keeps the end token
    for tokenizer, expected in ((ours, a), (hf, b)):
        assert torch.equal(pickle.loads(pickle.dumps(tokenizer))(texts), expected)


# --------------------------------------------------------------------------- what OpenAI files cannot tell

# An open_clip GELU model whose image tower has 4 heads of width 32, where OpenAI's convention
# (width / 64) says 2: shapes an OpenAI-layout state dict does not record.
SMALL_GELU_HEADS = {
    "embed_dim": 96,
    "vision_cfg": {"image_size": 64, "layers": 2, "width": 128, "head_width": 32, "patch_size": 16},
    "text_cfg": {"context_length": 24, "vocab_size": 49408, "width": 64, "heads": 1, "layers": 2},
}


def test_openai_source_states_what_it_assumed_and_takes_overrides(tmp_path):
    library = open_clip_library(SMALL_GELU_HEADS)
    torch.save(library.state_dict(), tmp_path / "open_clip_gelu.pt")
    path = str(tmp_path / "open_clip_gelu.pt")

    told = load_teacher(TeacherConfig(source="openai", path=path, activation="gelu", image_heads=4,
                                      text_heads=1))
    assert told.assumptions == []
    assert_matches_open_clip({"openai source with overrides": told.clip}, library)

    assumed = load_teacher(TeacherConfig(source="openai", path=path))
    assert assumed.assumptions == [
        "activation quick_gelu (assumed: an OpenAI-layout file does not record it; override with "
        "--set teacher.activation=gelu, e.g. for open_clip GELU weights)",
        "image tower heads 2 (assumed: width 128 / 64, OpenAI's convention; override with "
        "--set teacher.image_heads=N)",
        "text tower heads 1 (assumed: width 64 / 64, OpenAI's convention; override with "
        "--set teacher.text_heads=N)"]
    x, _ = open_clip_inputs(library)
    with torch.no_grad():  # the assumptions are wrong for this file: the summary must say so
        assert (assumed.clip.encode_image(x) - library.encode_image(x)).abs().max() > 1e-3


def test_openai_overrides_are_checked(tmp_path):
    torch.save(open_clip_library(SMALL_GELU_HEADS).state_dict(), tmp_path / "weights.pt")
    path = str(tmp_path / "weights.pt")
    with pytest.raises(RecipeError, match=r"^teacher\.image_heads=3 does not divide the tower's width 128$"):
        load_teacher(TeacherConfig(source="openai", path=path, image_heads=3))
    with pytest.raises(RecipeError, match=r"^teacher\.activation, teacher\.image_heads: only the openai "
                                          r"source takes these; the open_clip source reads them"):
        load_teacher(TeacherConfig(source="open_clip", model="ViT-B-32", path=path, activation="gelu",
                                   image_heads=12))
