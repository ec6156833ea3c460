"""The DeepSpeed config of a run: a JSON from ds_configs/, the recipe's overrides, and batch
fields computed from the recipe and the world size so ``micro × accumulation × world = batch``.
"""

from __future__ import annotations

import json
from pathlib import Path

from tinyclip_ds.config import PROJECT_ROOT, RecipeError, deep_merge
from tinyclip_ds.train.optim import TrainConfig

DS_CONFIG_DIR = PROJECT_ROOT / "ds_configs"


def resolve_ds_config_path(name: str) -> Path:
    """A path to a JSON file, or the name of one in ds_configs/ (with or without .json)."""
    candidates = [Path(name), DS_CONFIG_DIR / name, DS_CONFIG_DIR / f"{name}.json"]
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    shipped = ", ".join(sorted(p.stem for p in DS_CONFIG_DIR.glob("*.json")))
    raise RecipeError(f"DeepSpeed config '{name}' (recipe key 'ds_config') not found; "
                      f"give a JSON path or one of: {shipped}")


def batch_sizes(train: TrainConfig, world_size: int) -> tuple[int, int, int]:
    """``(micro_batch, accumulation, global_batch)`` for this world size, or a RecipeError."""
    micro = train.micro_batch
    per_pass = micro * world_size
    if train.global_batch:
        if train.accumulation:
            if per_pass * train.accumulation != train.global_batch:
                raise RecipeError(
                    f"batch sizes contradict: train.micro_batch ({micro}) × train.accumulation "
                    f"({train.accumulation}) × world size ({world_size}) = {per_pass * train.accumulation}, "
                    f"but train.global_batch = {train.global_batch}; set train.accumulation=0 to "
                    f"derive it, or change one of them")
            return micro, train.accumulation, train.global_batch
        if train.global_batch % per_pass:
            raise RecipeError(
                f"train.global_batch ({train.global_batch}) is not divisible by train.micro_batch "
                f"({micro}) × world size ({world_size}) = {per_pass}; change train.micro_batch "
                f"or train.global_batch")
        return micro, train.global_batch // per_pass, train.global_batch
    accumulation = train.accumulation or 1
    return micro, accumulation, per_pass * accumulation


BATCH_FIELDS = ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "train_batch_size")


def build_ds_config(ds_config: str, overrides: dict, train: TrainConfig, world_size: int,
                    check_accelerator: bool = True) -> dict:
    """The resolved DeepSpeed config dict for a run (raises RecipeError on any contradiction)."""
    path = resolve_ds_config_path(ds_config)
    try:
        config = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise RecipeError(f"{path} is not valid JSON: {err}") from None
    deep_merge(config, json.loads(json.dumps(overrides)))

    computed = dict(zip(BATCH_FIELDS, batch_sizes(train, world_size)))
    for key, value in computed.items():
        given = config.get(key, "auto")
        if given != "auto" and given != value:
            raise RecipeError(
                f"{path.name} (or a deepspeed.* override) sets {key}={given}, but the recipe "
                f"implies {value} (micro {computed['train_micro_batch_size_per_gpu']} × "
                f"accumulation {computed['gradient_accumulation_steps']} × world {world_size}); "
                f"batch fields are computed from train.*: remove {key} or set it to \"auto\"")
        config[key] = value

    if "gradient_clipping" not in config:
        raise RecipeError(f"{path.name} does not set gradient_clipping; set it explicitly "
                          f"(0.0 disables clipping; DeepSpeed >= 0.19.3 silently defaults to 1.0)")
    for key in ("optimizer", "scheduler"):
        if key in config:
            raise RecipeError(f"{path.name} has an '{key}' block, but the optimizer and schedule "
                              f"are built from the recipe's train.* fields; remove it")
    if check_accelerator:
        check_precision(config)
    return config


def precision(config: dict) -> str:
    """'fp16', 'bf16' or 'fp32' according to the DeepSpeed config."""
    if config.get("fp16", {}).get("enabled", False):
        return "fp16"
    if config.get("bf16", {}).get("enabled", False):
        return "bf16"
    return "fp32"


def zero_stage(config: dict) -> int:
    """The ZeRO stage the DeepSpeed config asks for (0 when it has no ZeRO block)."""
    return int(config.get("zero_optimization", {}).get("stage", 0))


def check_precision(config: dict) -> None:
    """Refuse a precision the accelerator cannot run, before DeepSpeed fails somewhere deep."""
    from deepspeed.accelerator import get_accelerator

    accelerator = get_accelerator()
    wanted = precision(config)
    supported = {"fp16": accelerator.is_fp16_supported(), "bf16": accelerator.is_bf16_supported(),
                 "fp32": True}
    if not supported[wanted]:
        usable = [p for p, ok in supported.items() if ok]
        raise RecipeError(
            f"the DeepSpeed config enables {wanted}, which the '{accelerator.device_name()}' "
            f"accelerator cannot run; pick a config with {' or '.join(usable)} "
            f"(e.g. --set ds_config=zero2_bf16) or --set deepspeed.{wanted}.enabled=false")
