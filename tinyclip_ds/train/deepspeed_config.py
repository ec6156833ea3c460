"""The DeepSpeed config of a run: a JSON from ds_configs/, the recipe's overrides, and batch
fields computed from the recipe and the world size so ``micro × accumulation × world = batch``.

Building it is torch-free; only letting DeepSpeed itself check the keys and values imports
DeepSpeed (and torch), so ``tinyclip-ds check --no-paths`` skips that.
"""

from __future__ import annotations

import difflib
import functools
import json
import typing
from pathlib import Path

from tinyclip_ds.config import PROJECT_ROOT, RecipeError, deep_merge, dotted_leaves
from tinyclip_ds.train.config import TrainConfig

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
                    check_deepspeed: bool = True, check_accelerator: bool = True) -> dict:
    """The resolved DeepSpeed config dict for a run (raises RecipeError on any contradiction).

    ``check_deepspeed``: DeepSpeed itself checks every key and value (`check_keys`,
    `deepspeed_accepts`), which imports it; then ``check_accelerator`` refuses a precision this
    machine's accelerator cannot run (`check_precision`)."""
    path = resolve_ds_config_path(ds_config)
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise RecipeError(f"{path} (recipe key 'ds_config') is not valid JSON: {err}") from None
    except OSError as err:
        raise RecipeError(f"{path} (recipe key 'ds_config') cannot be read ({err.strerror})") from None
    if not isinstance(config, dict):
        raise RecipeError(f"{path} must hold a JSON object of DeepSpeed config keys")
    if check_deepspeed:
        check_keys(config, path.name, "")
        check_keys(overrides, "recipe key 'deepspeed'", "deepspeed.")
    try:
        deep_merge(config, json.loads(json.dumps(overrides)))
    except (TypeError, ValueError) as err:
        raise RecipeError(f"recipe key 'deepspeed': DeepSpeed config values must be JSON values "
                          f"({err})") from None

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
    if check_deepspeed:
        deepspeed_accepts(config, path.name)
        if check_accelerator:
            check_precision(config)
    return config


class _LookupRecorder(dict):
    """A config dict that records every top-level key DeepSpeed's parser looks up."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.looked_up: set[str] = set()

    def get(self, key, *default):
        self.looked_up.add(key)
        return super().get(key, *default)

    def __getitem__(self, key):
        self.looked_up.add(key)
        return super().__getitem__(key)

    def __contains__(self, key):
        self.looked_up.add(key)
        return super().__contains__(key)

    def keys(self):
        return _RecordedKeys(self)


class _RecordedKeys:
    """``config.keys()`` whose ``in`` tests are recorded too (DeepSpeed uses both forms)."""

    def __init__(self, recorder: _LookupRecorder):
        self.recorder = recorder

    def __contains__(self, key) -> bool:
        return key in self.recorder

    def __iter__(self):
        return iter(dict.keys(self.recorder))


@functools.cache
def deepspeed_schema() -> tuple[frozenset[str], dict[str, type]]:
    """DeepSpeed's own view of its config, taken from DeepSpeed rather than a hand-kept list:
    the top-level keys its config parser looks up, and the pydantic model of each section it
    validates field by field (zero_optimization, fp16, bf16 and the monitors)."""
    from deepspeed.runtime.config import DeepSpeedConfig

    probe = _LookupRecorder(train_micro_batch_size_per_gpu=1, gradient_accumulation_steps=1)
    parsed = DeepSpeedConfig(probe)
    models = {"zero_optimization": type(parsed.zero_config), "fp16": type(parsed.float16_config),
              "bf16": type(parsed.bfloat16_config)}
    models.update({name: _as_model(field.annotation)
                   for name, field in type(parsed.monitor_config).model_fields.items()})
    return frozenset(probe.looked_up), models


def check_keys(tree: dict, where: str, prefix: str) -> None:
    """Refuse a key DeepSpeed would silently ignore: an unknown top-level key, or an unknown
    field of a section DeepSpeed describes with a model; the error suggests the closest key."""
    top_level, models = deepspeed_schema()
    for dotted in dotted_leaves(tree):
        parts = dotted.split(".")
        valid, model = top_level, None
        for depth, part in enumerate(parts):
            if depth and model is None:
                break  # a section DeepSpeed reads as a plain dict: its keys cannot be checked
            if part not in valid:
                close = difflib.get_close_matches(part, sorted(valid), n=1, cutoff=0.6)
                fixed = ".".join([*parts[:depth], *close, *parts[depth + 1:]])
                hint = (f"did you mean '{prefix}{fixed}'?" if close else
                        f"DeepSpeed knows: {', '.join(sorted(valid))}")
                raise RecipeError(f"unknown DeepSpeed config key '{prefix}{dotted}' (in {where}); {hint}")
            model = models.get(part) if depth == 0 else _field_model(model, part)
            valid = _model_keys(model) if model else set()


def _model_keys(model: type) -> set[str]:
    """The names a pydantic model accepts: its fields and their aliases."""
    keys = set(model.model_fields)
    keys |= {field.alias for field in model.model_fields.values() if field.alias}
    return keys


def _field_model(model: type, key: str) -> type | None:
    """The pydantic model of a field that is itself a section (e.g. ZeRO's offload_optimizer)."""
    field = next(f for name, f in model.model_fields.items() if key in (name, f.alias))
    return _as_model(field.annotation)


def _as_model(annotation) -> type | None:
    """The pydantic model in a field's type (``Model`` or ``Optional[Model]``), if any."""
    import pydantic

    candidates = typing.get_args(annotation) or (annotation,)
    return next((c for c in candidates if isinstance(c, type) and issubclass(c, pydantic.BaseModel)), None)


def deepspeed_accepts(config: dict, where: str) -> None:
    """Let DeepSpeed's own config parser check the values now rather than when the engine is
    built; what it rejects becomes a one-line RecipeError."""
    import pydantic
    from deepspeed.runtime.config import DeepSpeedConfig

    # The batch fields were checked above; without train_batch_size DeepSpeed derives it from
    # the per-rank fields for whatever process group it sees (none in `check`).
    parsed = {key: value for key, value in json.loads(json.dumps(config)).items()
              if key != "train_batch_size"}
    try:
        DeepSpeedConfig(parsed)
    except pydantic.ValidationError as err:
        sections = {model.__name__: name for name, model in deepspeed_schema()[1].items() if model}
        section = sections.get(err.title, err.title)
        problems = "; ".join(f"{'.'.join(str(p) for p in (section, *e['loc']))}: {e['msg']}"
                             for e in err.errors())
        raise RecipeError(f"DeepSpeed rejects the config ({where} with the deepspeed.* overrides): "
                          f"{problems}") from err
    except Exception as err:  # DeepSpeed's parser asserts and raises many types on bad values
        message = " ".join(str(err).split()) or type(err).__name__
        raise RecipeError(f"DeepSpeed rejects the config ({where} with the deepspeed.* overrides): "
                          f"{message}") from err


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
