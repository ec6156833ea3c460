"""DeepSpeed configs: batch fields computed from the recipe and accepted by DeepSpeed itself."""

import json

import deepspeed.comm
import pytest
from deepspeed.accelerator import get_accelerator
from deepspeed.runtime.config import DeepSpeedConfig

from tinyclip_ds.config import RecipeError
from tinyclip_ds.train.deepspeed_config import DS_CONFIG_DIR, batch_sizes, build_ds_config
from tinyclip_ds.train.optim import TrainConfig

SHIPPED = sorted(p.stem for p in DS_CONFIG_DIR.glob("*.json"))


def deepspeed_accepts(config: dict, world_size: int, monkeypatch) -> DeepSpeedConfig:
    """Construct DeepSpeed's own config object as a run of `world_size` ranks would."""
    monkeypatch.setattr(deepspeed.comm, "get_rank", lambda *a, **k: 0)
    monkeypatch.setattr(deepspeed.comm, "get_world_size", lambda *a, **k: world_size)
    return DeepSpeedConfig(json.loads(json.dumps(config)))


def test_required_configs_are_shipped():
    assert {"zero0_fp32", "zero1_bf16", "zero2_bf16", "zero3_bf16", "zero2_fp16"} <= set(SHIPPED)


@pytest.mark.parametrize("name", SHIPPED)
@pytest.mark.parametrize("world,micro,accumulation", [(1, 8, 1), (2, 4, 4), (8, 16, 2), (3, 5, 7)])
def test_batch_fields_satisfy_deepspeed(name, world, micro, accumulation, monkeypatch):
    train = TrainConfig(micro_batch=micro, accumulation=accumulation)
    config = build_ds_config(name, {}, train, world, check_accelerator=False)
    assert config["train_batch_size"] == micro * accumulation * world
    assert "gradient_clipping" in json.loads((DS_CONFIG_DIR / f"{name}.json").read_text())
    ds = deepspeed_accepts(config, world, monkeypatch)
    assert (ds.train_batch_size, ds.train_micro_batch_size_per_gpu, ds.gradient_accumulation_steps) == \
        (micro * accumulation * world, micro, accumulation)
    assert ds.gradient_clipping == config["gradient_clipping"]


@pytest.mark.parametrize("world", [1, 2, 4, 8])
def test_accumulation_derived_from_global_batch(world, monkeypatch):
    train = TrainConfig(micro_batch=4, global_batch=64)
    micro, accumulation, total = batch_sizes(train, world)
    assert (micro, accumulation, total) == (4, 64 // (4 * world), 64)
    deepspeed_accepts(build_ds_config("zero2_bf16", {}, train, world, check_accelerator=False),
                      world, monkeypatch)


def test_contradictions_are_clear_errors():
    with pytest.raises(RecipeError, match=r"micro_batch \(4\) × train.accumulation \(2\) × world size \(2\) = 16.*global_batch = 64"):
        batch_sizes(TrainConfig(micro_batch=4, accumulation=2, global_batch=64), 2)
    with pytest.raises(RecipeError, match="not divisible"):
        batch_sizes(TrainConfig(micro_batch=4, global_batch=60), 4)
    with pytest.raises(RecipeError, match="train_batch_size=99"):
        build_ds_config("zero0_fp32", {"train_batch_size": 99}, TrainConfig(micro_batch=4), 1,
                        check_accelerator=False)


def test_overrides_apply_and_clipping_must_be_explicit(tmp_path):
    config = build_ds_config("zero2_bf16", {"zero_optimization": {"stage": 3}, "gradient_clipping": 0.5},
                             TrainConfig(micro_batch=2), 1, check_accelerator=False)
    assert config["zero_optimization"]["stage"] == 3 and config["gradient_clipping"] == 0.5
    assert config["zero_optimization"]["overlap_comm"] is True  # untouched keys stay
    no_clip = tmp_path / "noclip.json"
    no_clip.write_text(json.dumps({"zero_optimization": {"stage": 0}}))
    with pytest.raises(RecipeError, match="gradient_clipping"):
        build_ds_config(str(no_clip), {}, TrainConfig(micro_batch=2), 1, check_accelerator=False)
    with pytest.raises(RecipeError, match="not found.*zero0_fp32"):
        build_ds_config("zero9", {}, TrainConfig(micro_batch=2), 1)


def test_fp16_where_the_accelerator_cannot_is_a_clear_error():
    train = TrainConfig(micro_batch=2)
    if get_accelerator().is_fp16_supported():
        assert build_ds_config("zero2_fp16", {}, train, 1)["fp16"]["enabled"]
    else:
        with pytest.raises(RecipeError, match=r"enables fp16.*cannot run.*bf16"):
            build_ds_config("zero2_fp16", {}, train, 1)
