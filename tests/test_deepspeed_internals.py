"""The DeepSpeed internals tinyclip_ds relies on (train/deepspeed_internals.py), checked on real
engines: one test per assumption, failing with the name of the assumption a DeepSpeed upgrade
broke. Each compares against what a real DeepSpeed step does, so its check can fail.

Engines are built in this process on one rank (gloo on the CPU), around a three-layer module
whose parameters fall into both AdamW groups (weight matrices with decay, the rest without).
"""

from __future__ import annotations

import copy
import json
import sys
import warnings

import pytest
import torch
from torch import nn

from conftest import free_port
from tinyclip_ds.config import PROJECT_ROOT
from tinyclip_ds.distributed import init_distributed, shutdown
from tinyclip_ds.train.deepspeed_config import build_ds_config, precision, zero_stage
from tinyclip_ds.train.deepspeed_internals import (ds_to_universal, finish_step_without_update,
                                                   optimizer_keeps_grad_norm, repair_zero3_universal_load)
from tinyclip_ds.train.engine import build_engine
from tinyclip_ds.train.config import TrainConfig

# fp16 is left out: engine_step never asks about its norm (fp16 gradients carry the loss scale).
CONFIGS = [path.stem for path in sorted((PROJECT_ROOT / "ds_configs").glob("*.json"))
           if precision(json.loads(path.read_text())) != "fp16"]
WEIGHT_DECAY = 0.1


def broken(assumption: str) -> str:
    return f"DeepSpeed changed: {assumption} (see tinyclip_ds/train/deepspeed_internals.py)"


@pytest.fixture(scope="module")
def one_rank():
    """A one-rank process group for this module's engines; the environment is restored after, and
    so is ``torch.nn.functional.linear``, which a ZeRO-3 engine replaces for the rest of the
    process (DeepSpeed's memory-efficient linear): later tests in this process would otherwise
    compute every linear layer through it (other rounding, and torch.jit cannot trace it)."""
    with pytest.MonkeyPatch.context() as patch:
        for key, value in dict(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                               MASTER_PORT=str(free_port()), DS_ACCELERATOR="cpu").items():
            patch.setenv(key, value)
        patch.setattr(torch.nn.functional, "linear", torch.nn.functional.linear)
        init_distributed()
        yield
        shutdown()


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.first, self.norm, self.last = nn.Linear(4, 8), nn.LayerNorm(8), nn.Linear(8, 2)

    def forward(self, x):
        return self.last(self.norm(self.first(x.to(self.first.weight.device, self.first.weight.dtype)))).float()


def build(name: str, accumulation: int = 1, **checkpoint):
    """(engine, an fp32 copy of its module as built) for the shipped DeepSpeed config ``name``."""
    train = TrainConfig(steps=10, micro_batch=2, accumulation=accumulation, lr=1e-2, warmup_steps=3,
                        weight_decay=WEIGHT_DECAY)
    config = build_ds_config(name, {}, train, 1)
    if checkpoint:
        config["checkpoint"] = checkpoint
    torch.manual_seed(0)
    module = Tiny()
    reference = copy.deepcopy(module)  # before DeepSpeed casts or partitions the parameters
    return build_engine(module, config, train), reference


INPUT = torch.randn(2, 4, generator=torch.Generator().manual_seed(1))


def micro_step(engine, scale: float = 1.0) -> None:
    engine.backward(engine(INPUT).pow(2).sum() * scale)


def output(engine) -> torch.Tensor:
    with torch.no_grad():
        return engine(INPUT)


def plain_torch_optimizer(name: str) -> bool:
    config = json.loads((PROJECT_ROOT / "ds_configs" / f"{name}.json").read_text())
    return zero_stage(config) == 0 and precision(config) == "fp32"


def same(a, b) -> bool:
    """Exactly equal, through nested state dicts."""
    if torch.is_tensor(a):
        return torch.is_tensor(b) and a.shape == b.shape and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return isinstance(b, (list, tuple)) and len(a) == len(b) and all(map(same, a, b))
    return a == b


@pytest.mark.parametrize("name", CONFIGS)
def test_the_optimizer_keeps_the_grad_norm_unless_it_is_a_plain_torch_one(one_rank, name):
    """engine_step measures the norm itself exactly where `optimizer_keeps_grad_norm` says no;
    where it says yes, the engine reports the norm of the gradients before clipping."""
    engine, reference = build(name)
    reference(INPUT).pow(2).sum().backward()
    norm = torch.nn.utils.get_total_norm([p.grad for p in reference.parameters()]).item()
    assert norm > 2 * engine.gradient_clipping()  # the norm after clipping would be told apart

    plain = plain_torch_optimizer(name)
    assert optimizer_keeps_grad_norm(engine) != plain, broken(
        f"{name}: the optimizer DeepSpeed wraps ({type(engine.optimizer).__name__}) "
        f"{'now has' if plain else 'no longer has'} a private _global_grad_norm")
    micro_step(engine)
    engine.step()
    reported = engine.get_global_grad_norm()
    if plain:
        assert reported is None, broken(f"{name}: the engine now reports a gradient norm with a plain "
                                        f"torch optimizer; engine_step need not measure it")
    else:
        assert reported is not None, broken(f"{name}: the engine no longer reports its optimizer's "
                                            f"_global_grad_norm through get_global_grad_norm()")
        tolerance = 2e-2 if engine.bfloat16_enabled() else 1e-5
        assert float(reported) == pytest.approx(norm, rel=tolerance), broken(
            f"{name}: the optimizer's _global_grad_norm is not the gradient norm before clipping")


@pytest.mark.parametrize("name", CONFIGS)
def test_only_a_plain_torch_optimizer_applies_nonfinite_gradients(one_rank, name):
    """engine_step skips a non-finite step itself only where `optimizer_keeps_grad_norm` says no:
    everywhere else DeepSpeed's optimizer skips it, leaving parameters and schedule unchanged."""
    engine, _ = build(name)
    micro_step(engine)
    engine.step()  # a finite step first: the optimizer state exists
    before, rate, skipped = output(engine), engine.get_lr(), engine.skipped_steps
    micro_step(engine, float("nan"))
    engine.step()
    after = output(engine)
    if plain_torch_optimizer(name):
        assert engine.was_step_applied() and not after.isfinite().all(), broken(
            f"{name}: the engine no longer applies non-finite gradients with a plain torch "
            f"optimizer; engine_step's own skip may be unnecessary")
        return
    assert not engine.was_step_applied() and engine.skipped_steps == skipped + 1, broken(
        f"{name}: {type(engine.optimizer).__name__} no longer reports a step with non-finite "
        f"gradients as skipped (was_step_applied / skipped_steps)")
    assert torch.equal(after, before), broken(f"{name}: {type(engine.optimizer).__name__} changed the "
                                              f"parameters in a step with non-finite gradients")
    assert engine.get_lr() == rate, broken(f"{name}: the engine advanced the learning-rate schedule on a "
                                           f"step its optimizer skipped")


def test_finish_step_without_update_runs_deepspeeds_bookkeeping_only(one_rank):
    """At the first boundary, with non-finite gradients, as engine_step meets it; then a real
    step as the control: both advance the same counts and clear the gradients the same way; the
    parameters, optimizer state and schedule, which the real step changes, stay as they were."""
    engine, _ = build("zero0_fp32", accumulation=2)
    optimizer, schedule = engine.optimizer, engine.lr_scheduler

    def accumulate(scale: float = 1.0) -> None:
        micro_step(engine, scale)
        engine.step()
        micro_step(engine, scale)
        assert engine.is_gradient_accumulation_boundary()

    def snapshot() -> dict:
        return {"parameters": [p.detach().clone() for p in engine.module.parameters()],
                "optimizer": copy.deepcopy(optimizer.state_dict()["state"]), "schedule": schedule.state_dict(),
                "lr": engine.get_lr(),
                "counts": (engine.global_steps, engine.micro_steps, engine.global_samples)}

    def advanced(before: dict, after: dict) -> tuple:
        return tuple(b - a for a, b in zip(before["counts"], after["counts"]))

    def cleared() -> bool:
        return all(p.grad is None or not p.grad.any() for p in engine.module.parameters())

    accumulate(float("nan"))
    groups = [list(group["params"]) for group in optimizer.param_groups]
    before = snapshot()
    with warnings.catch_warnings():
        # torch's schedule warns at its first step when the optimizer's step looks replaced
        warnings.filterwarnings("error", message=r".*optimizer\.step\(\)")
        finish_step_without_update(engine)
    skipped = snapshot()
    assert same(skipped["parameters"], before["parameters"]), broken(
        "the ZeRO-0 step changed the parameters although the torch optimizer's groups were empty")
    assert same(skipped["optimizer"], before["optimizer"]), broken(
        "the ZeRO-0 step changed the torch optimizer's state although its groups were empty")
    assert [group["params"] for group in optimizer.param_groups] == groups
    assert same(skipped["schedule"], before["schedule"]) and skipped["lr"] == before["lr"], broken(
        "the learning-rate schedule is not where it was after restoring engine.lr_scheduler's "
        "state_dict and the groups' lr")
    assert cleared()

    accumulate()  # in phase with the accumulation, and the non-finite gradients are gone
    boundary = snapshot()
    engine.step()
    real = snapshot()
    assert advanced(before, skipped) == advanced(boundary, real) == (1, 1, engine.train_batch_size()), broken(
        "engine.step() at a boundary no longer advances (global steps, micro steps, samples) "
        "the same with the optimizer's parameter groups emptied as in a real step")
    assert cleared() and all(p.isfinite().all() for p in real["parameters"])
    for key in ("parameters", "optimizer", "schedule", "lr"):
        assert not same(boundary[key], real[key]), f"control: a real step leaves the {key} as it was"


def test_zero3_universal_load_needs_the_repair_and_it_resumes_exactly(one_rank, tmp_path):
    """A ZeRO-3 checkpoint saved, converted to the universal format and loaded into a new engine
    (as a resume on another world size does). DeepSpeed's loader gives the second group the
    first group's weight decay and every group one shared ``step`` tensor; after
    `repair_zero3_universal_load` the next step is the one the saving engine takes."""
    engine, _ = build("zero3_fp32")
    for _ in range(2):
        micro_step(engine)
        engine.step()
    torch_optimizer = getattr(engine.optimizer, "optimizer", None)
    assert isinstance(torch_optimizer, torch.optim.Optimizer), broken(
        "the ZeRO-3 optimizer no longer wraps the torch optimizer as engine.optimizer.optimizer")
    decays = [group["weight_decay"] for group in torch_optimizer.param_groups]
    assert decays == [WEIGHT_DECAY, 0.0]
    steps = [state.get("step") for state in torch_optimizer.state.values()]
    assert len(steps) == 2 and all(torch.is_tensor(s) and s.item() == 2 for s in steps), broken(
        "the ZeRO-3 torch optimizer no longer holds one state with a step tensor per parameter group")

    from deepspeed.checkpoint.constants import UNIVERSAL_CHECKPOINT_INFO

    saved = tmp_path / "checkpoints" / "step"
    engine.save_checkpoint(str(saved.parent), tag=saved.name, client_state={UNIVERSAL_CHECKPOINT_INFO: {}},
                           save_latest=False)
    ds_to_universal(saved, saved / "universal")
    loaded, _ = build("zero3_fp32", load_universal=True)
    loaded.load_checkpoint(str(saved), tag="universal", load_module_strict=True, load_optimizer_states=True,
                           load_lr_scheduler_states=True)
    groups, states = loaded.optimizer.optimizer.param_groups, list(loaded.optimizer.optimizer.state.values())
    # The control: without the repair the resumed run would differ (repair_zero3_universal_load
    # may go once a DeepSpeed release no longer makes these slips).
    assert [group["weight_decay"] for group in groups] == [WEIGHT_DECAY] * 2, broken(
        "the ZeRO-3 universal loader no longer gives every group the first group's hyperparameters")
    assert states[0]["step"] is states[1]["step"], broken(
        "the ZeRO-3 universal loader no longer gives every group the same step tensor")

    try:
        repair_zero3_universal_load(loaded, saved / "universal")
    except Exception as err:
        pytest.fail(broken(f"the universal checkpoint's zero/optimizer_state.pt is not what "
                           f"repair_zero3_universal_load reads ({type(err).__name__}: {err})"))
    states = list(loaded.optimizer.optimizer.state.values())
    assert [group["weight_decay"] for group in groups] == decays
    assert states[0]["step"] is not states[1]["step"] and all(s["step"].item() == 2 for s in states)
    for resumed in (engine, loaded):
        micro_step(resumed)
        resumed.step()
    assert all(s["step"].item() == 3 for s in states)
    torch.testing.assert_close(output(loaded), output(engine), rtol=0, atol=1e-6)


def test_ds_to_universal_passes_every_argument_of_deepspeeds_script(monkeypatch, tmp_path):
    """DeepSpeed's converter is a script: `ds_to_universal` hands its ``main`` a namespace that
    must hold every argument its parser defines, with no others."""
    from deepspeed.checkpoint import ds_to_universal as script

    passed = []
    monkeypatch.setattr(script, "main", passed.append)
    ds_to_universal(tmp_path / "in", tmp_path / "out")
    monkeypatch.setattr(sys, "argv", ["ds_to_universal", "--input_folder", "in", "--output_folder", "out"])
    parsed = vars(script.parse_arguments())
    assert set(vars(passed[0])) == set(parsed), broken(
        f"ds_to_universal's arguments are now {sorted(parsed)}, not {sorted(vars(passed[0]))}")
