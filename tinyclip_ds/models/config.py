"""The recipe's ``teacher`` and ``student`` sections: what teacher to load and how to shape and
initialise the student towers (read by `teachers.load_teacher` and `students.build_students`).

Torch-free, like every config module: recipes load and validate without importing the models.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from tinyclip_ds.config import Range, RecipeError, option

_TEACHERS = Range(0, note="0 = the teacher's")


@dataclass
class StudentTowerConfig:
    width: int = option(0, "residual width; 0 = the teacher tower's width", range=_TEACHERS)
    layers: int = option(4, "number of unique transformer blocks", range=Range(1))
    heads: int = option(0, "attention heads; 0 = the teacher tower's head count", range=_TEACHERS)
    mlp_ratio: float = option(4.0, "MLP hidden width as a multiple of the width", range=Range(0, open_low=True))
    repeat: int = option(1, "apply each unique block this many times (MiniViT weight sharing); "
                            "effective depth = layers × repeat", range=Range(1))
    patch_size: int = option(0, "image tower patch size; 0 = the teacher's", range=_TEACHERS)
    context_length: int = option(0, "text tower context length; 0 = the teacher's", range=_TEACHERS)
    output_dim: int = option(0, "embedding dimension; 0 = the teacher's (required to pair a "
                                "student tower with the teacher's other tower)", range=_TEACHERS)
    act: Literal["teacher", "gelu", "quick_gelu"] = option(
        "teacher", "MLP activation; 'teacher' copies the teacher's")
    dropout: float = option(0.0, "dropout on the residual branches (0 recommended: the targets, the "
                                 "teacher's outputs, are deterministic)", range=Range(0, 1, open_high=True))
    layer_map: str | list[int] = option(
        "uniform", "which teacher layer each distilled student layer learns from: uniform "
                   "(TinyBERT i·k+k−1), begin, end, or an explicit list of teacher layers")
    distill_layers: list[int] | None = option(
        None, "effective student layers that get intermediate-layer losses; null = all")
    init: Literal["random", "inherit"] = option(
        "inherit", "initialisation: random, or inherit mapped layers from the teacher "
                   "(leading channels and heads sliced when narrower)")
    freeze_embed: bool = option(False, "copy the teacher's patch/token and positional "
                                       "embeddings and keep them frozen")
    init_from: str = option("", "stage 2: a stage-1 run directory (its newest complete checkpoint) "
                                "or checkpoint directory to load this tower from; '' = use `init`")
    init_from_missing: Literal["error", "init"] = option(
        "error", "stage 2, when init_from holds no complete checkpoint: stop with an error, or "
                 "fall back to `init` (and say so)")


@dataclass
class StudentConfig:
    image: StudentTowerConfig = option(StudentTowerConfig(), "the student image tower")
    text: StudentTowerConfig = option(StudentTowerConfig(), "the student text tower")


_OPENAI_HEADS = Range(0, note="0 = width / 64")


@dataclass
class TeacherConfig:
    source: Literal["demo", "openai", "open_clip", "hf"] = option(
        "demo", "where the teacher comes from: the shipped digits demo, an OpenAI CLIP "
                "checkpoint, an open_clip model or a Hugging Face CLIPModel directory")
    path: str = option("", "local weights: OpenAI .pt (TorchScript archive or state dict; read "
                           "without running code), open_clip weights file, or HF directory; '' for "
                           "the demo's shipped weights")
    model: str = option("", "open_clip model name (e.g. ViT-B-32, ViT-B-16-quickgelu) or path to "
                            "an open_clip model config JSON; unused by other sources")
    precision: Literal["fp32", "bf16", "fp16"] = option(
        "fp32", "dtype the frozen teacher computes in (bf16 halves its memory and time on GPUs)")
    # An OpenAI-layout file records neither activation nor head count (only the open_clip and
    # HF configs do): these say what the file cannot, e.g. for an open_clip GELU model's weights.
    activation: Literal["auto", "quick_gelu", "gelu"] = option(
        "auto", "openai source only: the MLP activation; auto = the one a TorchScript archive's "
                "code uses, else quick_gelu (OpenAI's)")
    image_heads: int = option(0, "openai source only: image tower attention heads; 0 = width / 64 "
                                 "(OpenAI's convention)", range=_OPENAI_HEADS)
    text_heads: int = option(0, "openai source only: text tower attention heads; 0 = width / 64 "
                                "(OpenAI's convention)", range=_OPENAI_HEADS)


def check_openai_options(cfg: TeacherConfig) -> None:
    """Refuse the activation and head overrides for sources other than openai: they exist for
    OpenAI-layout files only (open_clip and HF configs state both)."""
    if cfg.source == "openai":
        return
    given = [f"teacher.{key}" for key, default in (("activation", "auto"), ("image_heads", 0),
                                                   ("text_heads", 0))
             if getattr(cfg, key) != default]
    if given:
        raise RecipeError(f"{', '.join(given)}: only the openai source takes these; the "
                          f"{cfg.source} source reads them from its model config")
