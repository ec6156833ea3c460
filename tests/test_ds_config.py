"""DeepSpeed configs: batch fields computed from the recipe and accepted by DeepSpeed itself."""

import json

import deepspeed.comm
import pytest
from deepspeed.accelerator import get_accelerator
from deepspeed.runtime.config import DeepSpeedConfig

from tinyclip_ds.config import RecipeError
from tinyclip_ds.train.deepspeed_config import DS_CONFIG_DIR, batch_sizes, build_ds_config
from tinyclip_ds.train.config import TrainConfig

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


@pytest.mark.parametrize("overrides,key,suggestion", [
    ({"zero_optimisation": {"stage": 3}}, "deepspeed.zero_optimisation.stage", "deepspeed.zero_optimization.stage"),
    ({"gradient_cliping": 0.5}, "deepspeed.gradient_cliping", "deepspeed.gradient_clipping"),
    ({"zero_optimization": {"stgae": 3}}, "deepspeed.zero_optimization.stgae", "deepspeed.zero_optimization.stage"),
    ({"zero_optimization": {"offload_optimizer": {"devise": "cpu"}}},
     "deepspeed.zero_optimization.offload_optimizer.devise", "deepspeed.zero_optimization.offload_optimizer.device"),
    ({"bf16": {"enable": True}}, "deepspeed.bf16.enable", "deepspeed.bf16.enabled"),
    ({"tensorboard": {"output_pth": "tb"}}, "deepspeed.tensorboard.output_pth", "deepspeed.tensorboard.output_path"),
])
def test_unknown_deepspeed_keys_are_refused_with_a_suggestion(overrides, key, suggestion):
    with pytest.raises(RecipeError, match=rf"unknown DeepSpeed config key '{key}'.*did you mean '{suggestion}'"):
        build_ds_config("zero2_bf16", overrides, TrainConfig(micro_batch=2), 1, check_accelerator=False)


def test_known_deepspeed_keys_and_aliases_pass():
    overrides = {"zero_optimization": {"stage": 3, "stage3_prefetch_bucket_size": 1000,
                                       "offload_optimizer": {"device": "cpu"}},
                 "activation_checkpointing": {"partition_activations": False},
                 "flops_profiler": {"enabled": False}, "tensorboard": {"enabled": False},
                 "checkpoint": {"use_node_local_storage": False}}
    config = build_ds_config("zero2_bf16", overrides, TrainConfig(micro_batch=2), 4, check_accelerator=False)
    assert config["zero_optimization"]["stage"] == 3 and config["train_batch_size"] == 8


def test_deepspeed_schema_comes_from_deepspeed():
    from tinyclip_ds.train.deepspeed_config import deepspeed_schema

    top_level, models = deepspeed_schema()
    # keys DeepSpeed reads with .get(), [] and `in param_dict.keys()` alike
    assert {"zero_optimization", "bf16", "fp16", "gradient_clipping", "steps_per_print", "optimizer",
            "activation_checkpointing", "flops_profiler", "train_micro_batch_size_per_gpu"} <= top_level
    assert "stage" in models["zero_optimization"].model_fields


def test_unknown_key_in_the_json_file_is_refused(tmp_path):
    typo = tmp_path / "typo.json"
    typo.write_text(json.dumps({"gradient_clipping": 1.0, "zero_optimisation": {"stage": 2}}))
    with pytest.raises(RecipeError, match=r"'zero_optimisation.stage' \(in typo.json\).*'zero_optimization.stage'"):
        build_ds_config(str(typo), {}, TrainConfig(micro_batch=2), 1, check_accelerator=False)


@pytest.mark.parametrize("overrides,message", [
    ({"zero_optimization": {"stage": 7}}, r"zero_optimization\.stage: Input should be"),
    ({"fp16": {"enabled": True}, "bf16": {"enabled": True}}, "bfloat16 and fp16"),
    ({"zero_optimization": 3}, "must be a mapping"),
])
def test_values_deepspeed_rejects_are_one_line_errors_before_the_run(overrides, message):
    with pytest.raises(RecipeError, match=r"DeepSpeed rejects the config \(zero0_fp32.json.*" + message) as err:
        build_ds_config("zero0_fp32", overrides, TrainConfig(micro_batch=2), 1, check_accelerator=False)
    assert "\n" not in str(err.value)


def test_unreadable_json_is_a_recipe_error(tmp_path):
    latin1 = tmp_path / "latin1.json"
    latin1.write_bytes('{"gradient_clipping": 1.0, "comment": "caf\xe9"}'.encode("latin-1"))
    with pytest.raises(RecipeError, match="latin1.json.*not valid JSON"):
        build_ds_config(str(latin1), {}, TrainConfig(micro_batch=2), 1, check_accelerator=False)
