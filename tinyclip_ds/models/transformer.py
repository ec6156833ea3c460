"""CLIP towers (ViT image tower, causal text tower) that return their intermediates.

One implementation serves teachers (loaded from OpenAI / open_clip / Hugging Face weights)
and students (fewer, narrower or weight-shared layers). ``forward(x, Request(...))`` returns a
`TowerOutput` with exactly what was asked for; layers whose attention is not requested run
PyTorch's fused scaled-dot-product attention, so asking for nothing costs nothing.

Weight sharing (MiniViT): ``shape.layers`` unique blocks (attention + MLP), each applied
``shape.repeat`` times in a row, with separate LayerNorms for every *effective* layer.
Effective layer ``e`` runs unique block ``e // repeat`` with ``norms[e]``.

Tensor layout is batch first: tokens ``(B, N, D)``, per-head tensors ``(B, H, N, Dh)``.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn


@dataclass(frozen=True)
class TowerShape:
    """Architecture of one tower. Vision fields are ignored by text towers and vice versa."""

    width: int
    layers: int  # unique blocks
    heads: int
    mlp_width: int
    output_dim: int  # dimension of the pooled, projected embedding
    repeat: int = 1  # each unique block is applied this many times (weight sharing)
    act: Literal["gelu", "quick_gelu"] = "quick_gelu"
    ln_eps: float = 1e-5
    dropout: float = 0.0  # on the residual branches; 0 for teachers and by default
    # vision
    image_size: int = 224
    patch_size: int = 32
    # text
    vocab_size: int = 49408
    context_length: int = 77
    eot_token_id: int | None = None  # pool at the first token with this id; None: at argmax(ids)

    @property
    def depth(self) -> int:
        """Effective number of layers (unique blocks × repeat)."""
        return self.layers * self.repeat

    @property
    def head_dim(self) -> int:
        return self.width // self.heads

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size

    def replace(self, **changes) -> "TowerShape":
        return dataclasses.replace(self, **changes)


@dataclass(frozen=True)
class Request:
    """Which intermediates a forward pass should return (all off by default)."""

    layers: tuple[int, ...] = ()  # effective layer indices for the per-layer outputs below
    hidden: bool = False  # residual-stream output of each requested layer
    attention: bool = False  # pre-softmax scores and probabilities, per head
    qkv: bool = False  # queries, keys and values, per head (MiniLM relations)
    embeddings: bool = False  # patch/token embedding + class token + positions, before ln_pre
    tokens: bool = False  # every token after the final LayerNorm, projected (FILIP)

    def merge(self, other: "Request") -> "Request":
        return Request(
            layers=tuple(sorted(set(self.layers) | set(other.layers))),
            hidden=self.hidden or other.hidden,
            attention=self.attention or other.attention,
            qkv=self.qkv or other.qkv,
            embeddings=self.embeddings or other.embeddings,
            tokens=self.tokens or other.tokens,
        )


@dataclass
class TowerOutput(dict):
    """What a tower returns. Per-layer dicts are keyed by effective layer index.

    Also a dict of its fields, kept in sync with the attributes: DeepSpeed ZeRO-3 looks for a
    module's output tensors only in tensors, tuples, lists and dicts, and without finding them
    it does not gather the tower's own parameters (projection, embeddings) for the backward."""

    embedding: Tensor  # (B, E) pooled and projected
    token_mask: Tensor  # (B, N) bool: True for real tokens (text: up to and including EOT)
    attn_mask: Tensor | None  # (B, 1, N, N) bool: True where a query may attend a key; None = all
    embeddings: Tensor | None = None  # (B, N, D)
    tokens: Tensor | None = None  # (B, N, E)
    hidden: dict[int, Tensor] = field(default_factory=dict)  # (B, N, D)
    attn_scores: dict[int, Tensor] = field(default_factory=dict)  # (B, H, N, N), unmasked
    attn_probs: dict[int, Tensor] = field(default_factory=dict)  # (B, H, N, N)
    qkv: dict[int, tuple[Tensor, Tensor, Tensor]] = field(default_factory=dict)  # 3 × (B, H, N, Dh)

    def __setattr__(self, name: str, value) -> None:
        object.__setattr__(self, name, value)
        dict.__setitem__(self, name, value)

    __setitem__ = __setattr__


class QuickGELU(nn.Module):
    """x · sigmoid(1.702 x), the activation of OpenAI's CLIP."""

    def forward(self, x: Tensor) -> Tensor:
        return x * torch.sigmoid(1.702 * x)


class Attention(nn.Module):
    """Multi-head self-attention with a fused ``qkv`` projection (nn.MultiheadAttention layout)."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        if width % heads:
            raise ValueError(f"width {width} is not divisible by heads {heads}")
        self.heads = heads
        self.head_dim = width // heads
        self.qkv = nn.Linear(width, 3 * width)
        self.out = nn.Linear(width, width)

    def forward(self, x: Tensor, causal: bool, return_attention: bool = False,
                return_qkv: bool = False) -> tuple[Tensor, dict]:
        batch, n, width = x.shape
        q, k, v = self.qkv(x).view(batch, n, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
        extras = {}
        if return_qkv:
            extras["qkv"] = (q, k, v)
        if return_attention:
            scores = (q @ k.transpose(-2, -1)) * (self.head_dim ** -0.5)
            masked = scores
            if causal:
                allowed = torch.ones(n, n, dtype=torch.bool, device=x.device).tril()
                masked = scores.masked_fill(~allowed, float("-inf"))
            probs = masked.softmax(dim=-1)
            extras["scores"], extras["probs"] = scores, probs
            out = probs @ v
        else:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
        return self.out(out.transpose(1, 2).reshape(batch, n, width)), extras


class MLP(nn.Module):
    def __init__(self, width: int, hidden: int, act: str):
        super().__init__()
        self.fc = nn.Linear(width, hidden)
        self.act = QuickGELU() if act == "quick_gelu" else nn.GELU()
        self.proj = nn.Linear(hidden, width)

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(self.act(self.fc(x)))


class Block(nn.Module):
    """The shareable part of a layer: attention and MLP (LayerNorms live in `BlockNorms`)."""

    def __init__(self, shape: TowerShape):
        super().__init__()
        self.attn = Attention(shape.width, shape.heads)
        self.mlp = MLP(shape.width, shape.mlp_width, shape.act)


class BlockNorms(nn.Module):
    """The pre-attention and pre-MLP LayerNorms of one effective layer."""

    def __init__(self, shape: TowerShape):
        super().__init__()
        self.ln_1 = nn.LayerNorm(shape.width, eps=shape.ln_eps)
        self.ln_2 = nn.LayerNorm(shape.width, eps=shape.ln_eps)


class Transformer(nn.Module):
    """Pre-LN residual blocks; ``blocks`` are unique, ``norms`` are per effective layer."""

    def __init__(self, shape: TowerShape):
        super().__init__()
        self.repeat = shape.repeat
        self.dropout = shape.dropout
        self.blocks = nn.ModuleList(Block(shape) for _ in range(shape.layers))
        self.norms = nn.ModuleList(BlockNorms(shape) for _ in range(shape.depth))

    @property
    def depth(self) -> int:
        return len(self.norms)

    def forward(self, x: Tensor, request: Request, causal: bool, out: TowerOutput) -> Tensor:
        check_layers(request.layers, self.depth)
        for layer, norms in enumerate(self.norms):
            block = self.blocks[layer // self.repeat]
            wanted = layer in request.layers
            h, extras = block.attn(norms.ln_1(x), causal,
                                   return_attention=wanted and request.attention,
                                   return_qkv=wanted and request.qkv)
            x = x + F.dropout(h, self.dropout, self.training)
            x = x + F.dropout(block.mlp(norms.ln_2(x)), self.dropout, self.training)
            if wanted:
                if request.hidden:
                    out.hidden[layer] = x
                if request.attention:
                    out.attn_scores[layer] = extras["scores"]
                    out.attn_probs[layer] = extras["probs"]
                if request.qkv:
                    out.qkv[layer] = extras["qkv"]
        return x


def check_layers(layers: tuple[int, ...], depth: int) -> None:
    bad = [layer for layer in layers if not 0 <= layer < depth]
    if bad:
        raise ValueError(f"requested layers {bad} do not exist: the tower has {depth} "
                         f"effective layers (0..{depth - 1})")


class VisionTower(nn.Module):
    """ViT image tower: patches + class token + positions → ln_pre → blocks → ln_post → proj."""

    def __init__(self, shape: TowerShape):
        super().__init__()
        if shape.image_size % shape.patch_size:
            raise ValueError(f"image_size {shape.image_size} is not a multiple of "
                             f"patch_size {shape.patch_size}")
        self.shape = shape
        scale = shape.width ** -0.5
        self.patch_embed = nn.Conv2d(3, shape.width, shape.patch_size, shape.patch_size, bias=False)
        self.class_embedding = nn.Parameter(scale * torch.randn(shape.width))
        self.positional_embedding = nn.Parameter(scale * torch.randn(shape.grid ** 2 + 1, shape.width))
        self.ln_pre = nn.LayerNorm(shape.width, eps=shape.ln_eps)
        self.transformer = Transformer(shape)
        self.ln_post = nn.LayerNorm(shape.width, eps=shape.ln_eps)
        self.proj = nn.Parameter(scale * torch.randn(shape.width, shape.output_dim))
        init_blocks(self.transformer, shape)

    def forward(self, images: Tensor, request: Request = Request()) -> TowerOutput:
        x = self.patch_embed(images.to(self.patch_embed.weight.dtype)).flatten(2).transpose(1, 2)
        cls = self.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
        x = torch.cat([cls, x], dim=1) + self.positional_embedding.to(x.dtype)
        token_mask = torch.ones(x.shape[:2], dtype=torch.bool, device=x.device)
        out = TowerOutput(embedding=x.new_empty(0), token_mask=token_mask, attn_mask=None)
        if request.embeddings:
            out.embeddings = x
        x = self.transformer(self.ln_pre(x), request, causal=False, out=out)
        if request.tokens:
            out.tokens = self.ln_post(x) @ self.proj
            out.embedding = out.tokens[:, 0]
        else:
            out.embedding = self.ln_post(x[:, 0]) @ self.proj
        return out


class TextTower(nn.Module):
    """Causal text tower: tokens + positions → blocks → ln_final → pool at EOT → projection."""

    def __init__(self, shape: TowerShape):
        super().__init__()
        self.shape = shape
        self.token_embedding = nn.Embedding(shape.vocab_size, shape.width)
        self.positional_embedding = nn.Parameter(0.01 * torch.randn(shape.context_length, shape.width))
        self.transformer = Transformer(shape)
        self.ln_final = nn.LayerNorm(shape.width, eps=shape.ln_eps)
        self.text_projection = nn.Parameter(shape.width ** -0.5 * torch.randn(shape.width, shape.output_dim))
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        init_blocks(self.transformer, shape)

    def eot_positions(self, ids: Tensor) -> Tensor:
        """Index of the end-of-text token of each sequence, where the text is pooled."""
        if self.shape.eot_token_id is None:
            return ids.argmax(dim=-1)
        return (ids == self.shape.eot_token_id).int().argmax(dim=-1)

    def fit_context(self, ids: Tensor) -> Tensor:
        """Ids tokenized for a longer context, cut to this tower's, keeping the end-of-text token."""
        if ids.shape[1] <= self.shape.context_length:
            return ids
        eot = self.eot_positions(ids)
        cut = ids[:, :self.shape.context_length].clone()
        too_long = eot >= self.shape.context_length
        cut[too_long, -1] = ids[too_long, eot[too_long]]
        return cut

    def trim_padding(self, ids: Tensor) -> Tensor:
        """``ids`` without the columns after the batch's last end-of-text token.

        The tower is causal: what it returns at a position depends on no later one, and every
        output it defines lies at or before a sequence's EOT (the pooled embedding, and per-token
        outputs under ``token_mask`` / ``attn_mask``). So all of them are unchanged, for a
        forward that costs what the batch's longest text needs instead of the whole context
        (COCO and CC3M captions average about ten words; CLIP pads to 77 tokens). Call it on
        ids still on the CPU: the length it reads would otherwise wait for the device."""
        if ids.numel() == 0:
            return ids
        return ids[:, :int(self.eot_positions(ids).max()) + 1]

    def forward(self, ids: Tensor, request: Request = Request()) -> TowerOutput:
        n = ids.shape[1]
        if n > self.shape.context_length:
            raise ValueError(f"text of {n} tokens is longer than the context length "
                             f"{self.shape.context_length}")
        x = self.token_embedding(ids) + self.positional_embedding[:n].to(self.token_embedding.weight.dtype)
        eot = self.eot_positions(ids)
        positions = torch.arange(n, device=ids.device)
        token_mask = positions[None, :] <= eot[:, None]
        causal = positions[None, :] <= positions[:, None]
        attn_mask = causal[None, None] & token_mask[:, None, :, None]
        out = TowerOutput(embedding=x.new_empty(0), token_mask=token_mask, attn_mask=attn_mask)
        if request.embeddings:
            out.embeddings = x
        x = self.ln_final(self.transformer(x, request, causal=True, out=out))
        if request.tokens:
            out.tokens = x @ self.text_projection
            out.embedding = out.tokens[torch.arange(x.shape[0], device=x.device), eot]
        else:
            out.embedding = x[torch.arange(x.shape[0], device=x.device), eot] @ self.text_projection
        return out


def init_blocks(transformer: Transformer, shape: TowerShape) -> None:
    """CLIP's initialisation (std scaled by width and depth), for models built from scratch."""
    proj_std = shape.width ** -0.5 * (2 * shape.depth) ** -0.5
    attn_std = shape.width ** -0.5
    fc_std = (2 * shape.width) ** -0.5
    for block in transformer.blocks:
        nn.init.normal_(block.attn.qkv.weight, std=attn_std)
        nn.init.zeros_(block.attn.qkv.bias)
        nn.init.normal_(block.attn.out.weight, std=proj_std)
        nn.init.zeros_(block.attn.out.bias)
        nn.init.normal_(block.mlp.fc.weight, std=fc_std)
        nn.init.normal_(block.mlp.proj.weight, std=proj_std)


class Clip(nn.Module):
    """An image tower, a text tower and the logit scale (log of CLIP's temperature inverse)."""

    def __init__(self, vision: TowerShape, text: TowerShape, logit_scale: float = math.log(1 / 0.07)):
        super().__init__()
        self.visual = VisionTower(vision)
        self.text = TextTower(text)
        self.logit_scale = nn.Parameter(torch.tensor(float(logit_scale)))

    def encode_image(self, images: Tensor, normalize: bool = False) -> Tensor:
        x = self.visual(images).embedding
        return F.normalize(x, dim=-1) if normalize else x

    def encode_text(self, ids: Tensor, normalize: bool = False) -> Tensor:
        x = self.text(ids).embedding
        return F.normalize(x, dim=-1) if normalize else x
