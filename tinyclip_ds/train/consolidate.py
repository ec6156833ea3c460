"""A checkpoint's weights as one plain state dict, whatever its ZeRO stage: what export,
evaluation, speed reports and stage 2's ``init_from`` read."""

from __future__ import annotations

from pathlib import Path

import torch

from tinyclip_ds.train.checkpoint import marker_info


def consolidated_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Plain fp32 weights of the engine's module from a checkpoint, whatever its ZeRO stage.

    ZeRO 1-3 shards are consolidated from the fp32 master weights (DeepSpeed's zero_to_fp32);
    a ZeRO-0 checkpoint holds the whole module already (bf16 modules are upcast).
    """
    path = Path(path)
    if marker_info(path)["zero_stage"] == 0:
        states = torch.load(path / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=True)
        return {name: value.float() for name, value in states["module"].items()}
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    return get_fp32_state_dict_from_zero_checkpoint(str(path.parent), tag=path.name)
