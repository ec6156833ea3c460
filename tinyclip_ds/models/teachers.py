"""Teachers: frozen CLIP models loaded from local OpenAI, open_clip or Hugging Face files."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from tinyclip_ds.config import option


@dataclass
class TeacherConfig:
    source: Literal["demo", "openai", "open_clip", "hf"] = option(
        "demo", "where the teacher comes from: the shipped digits demo, an OpenAI CLIP "
                "checkpoint, an open_clip model or a Hugging Face CLIPModel directory")
    path: str = option("", "local weights: OpenAI .pt (JIT or state dict), open_clip weights file, "
                           "or HF directory; '' for the demo's shipped weights")
    model: str = option("", "open_clip model name (e.g. ViT-B-32, ViT-B-16-quickgelu) or path to "
                            "an open_clip model config JSON; unused by other sources")
    precision: Literal["fp32", "bf16", "fp16"] = option(
        "fp32", "dtype the frozen teacher computes in (bf16 halves its memory and time on GPUs)")
