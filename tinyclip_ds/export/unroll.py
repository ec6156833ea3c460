"""Weight-shared towers as plain ones, for formats that have no weight sharing.

A MiniViT-style tower (`TowerShape.repeat` > 1) stores ``layers`` unique blocks (attention and
MLP) and ``layers × repeat`` per-layer LayerNorms; effective layer ``e`` runs block
``e // repeat`` with ``norms[e]`` (models/transformer.py). Unrolled, it is a tower of
``layers × repeat`` independent blocks, ``repeat == 1``: block ``e`` is a copy of the shared block
``e // repeat`` and keeps its own ``norms[e]``, so the two compute the same function.
"""

from __future__ import annotations

import re

import torch

from tinyclip_ds.models.transformer import TextTower, VisionTower

_SHARED_BLOCK = re.compile(r"transformer\.blocks\.(\d+)\.(.+)")


def unroll(tower: VisionTower | TextTower) -> VisionTower | TextTower:
    """A copy of ``tower`` (fp32, eval mode) with weight sharing written out as independent
    blocks; a tower without sharing is copied as it is."""
    shape = tower.shape
    plain = shape.replace(layers=shape.depth, repeat=1, dropout=0.0)
    state = {}
    for name, value in tower.state_dict().items():
        value = value.detach().float()
        if match := _SHARED_BLOCK.fullmatch(name):
            unique, rest = int(match.group(1)), match.group(2)
            for layer in range(unique * shape.repeat, (unique + 1) * shape.repeat):
                state[f"transformer.blocks.{layer}.{rest}"] = value.clone()
        else:
            state[name] = value.clone()
    with torch.device("meta"):  # every parameter is assigned below: skip the random initialisation
        out = type(tower)(plain)
    out.load_state_dict(state, strict=True, assign=True)
    return out.eval()
