"""Resuming on another number of ranks: a run saved at step k and continued elsewhere gives the
same losses and the same samples for steps k+1…2k as the run that never stopped.

Real DeepSpeed engines and launches on CPU ranks (gloo). The global batch is fixed and the
accumulation derived, so 1 rank does 2 micro-steps where 2 ranks do 1 each. Checkpoints saved
by one world size are converted to DeepSpeed's universal format when loaded by another.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from conftest import launch, read_tensorboard
from tinyclip_ds.export import export_weights, load_student_weights
from tinyclip_ds.train.checkpoint import complete_checkpoints, tag_for
from tinyclip_ds.train.consolidate import consolidated_state_dict
from tinyclip_ds.train.universal import UNIVERSAL

K = 3  # saved at step K, compared over steps K+1 … 2K
FAST = ["--set", "train.micro_batch=4", "--set", "train.global_batch=8", "--set", "train.accumulation=0",
        "--set", "train.warmup_steps=1", "--set", "train.lr=3e-3", "--set", f"train.steps={2 * K}",
        "--set", "train.log_every=1", "--set", "train.log_samples=true", "--set", "eval.every=0",
        "--set", "eval.data=", "--set", "eval.zeroshot=", "--set", "data.num_workers=0",
        "--set", f"checkpoint.every={K}", "--set", "checkpoint.keep_last=0"]


def losses_by_step(run_dir) -> dict[int, float]:
    scalars, _ = read_tensorboard(run_dir)
    return dict(scalars["loss/total"])


def samples_by_step(run_dir) -> dict[int, list[int]]:
    lines = (run_dir / "samples.jsonl").read_text().splitlines()
    return {record["step"]: record["samples"] for record in map(json.loads, lines)}


def train(stage: str, run_dir, ranks: int, ds_config: str, *extra: str):
    return launch(stage, *FAST, "--set", f"run_dir={run_dir}", "--set", f"ds_config={ds_config}", *extra,
                  ranks=ranks)


def check_resumed_like_uninterrupted(stage: str, ds_config: str, saved_ranks: int, resumed_ranks: int, tmp_path):
    reference = tmp_path / "uninterrupted"
    train(stage, reference, saved_ranks, ds_config)
    saved = reference / "checkpoints" / tag_for(K)
    assert [p.name for p in complete_checkpoints(reference)] == [tag_for(K), tag_for(2 * K)]

    resumed = tmp_path / "resumed"
    result = train(stage, resumed, resumed_ranks, ds_config, "--resume", str(saved))
    assert f"resumed at step {K}" in result.stdout
    # Another world size: converted once, cached beside the checkpoint, loaded as universal.
    assert (saved / UNIVERSAL / "zero").is_dir()
    assert json.loads((resumed / "ds_config.json").read_text())["checkpoint"]["load_universal"] is True

    expected, got = losses_by_step(reference), losses_by_step(resumed)
    assert sorted(expected) == list(range(1, 2 * K + 1)) and sorted(got) == list(range(K + 1, 2 * K + 1))
    steps = range(K + 1, 2 * K + 1)
    # Training still moves the loss by much more than the tolerance: the comparison can fail.
    assert abs(expected[2 * K] - expected[K + 1]) > 1e-3 * abs(expected[K + 1])
    np.testing.assert_allclose([got[s] for s in steps], [expected[s] for s in steps], rtol=1e-4, atol=0)

    expected_samples, got_samples = samples_by_step(reference), samples_by_step(resumed)
    assert sorted(got_samples) == list(steps)
    for step in steps:
        assert len(got_samples[step]) == 8 and got_samples[step] == expected_samples[step], step
    seen = [i for step in range(1, 2 * K + 1) for i in expected_samples[step]]
    assert len(set(seen)) == len(seen)  # within an epoch no sample repeats
    return reference, resumed


def test_zero2_saved_on_two_ranks_resumes_on_one(tmp_path):
    reference, resumed = check_resumed_like_uninterrupted("stage1_image", "zero2_fp32", 2, 1, tmp_path)
    # Both ends consolidate to the same student: 2 ZeRO-2 shards vs 1 after the universal load.
    a = load_student_weights(export_weights(reference, tag_for(2 * K), tmp_path / "a.safetensors"))[1]
    b = load_student_weights(export_weights(resumed, tag_for(2 * K), tmp_path / "b.safetensors"))[1]
    for (name, x), (_, y) in zip(a["image"].state_dict().items(), b["image"].state_dict().items()):
        torch.testing.assert_close(y, x, rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.slow
def test_zero3_saved_on_two_ranks_resumes_on_one(tmp_path):
    check_resumed_like_uninterrupted("stage2", "zero3_fp32", 2, 1, tmp_path)


@pytest.mark.slow
def test_zero2_saved_on_one_rank_resumes_on_two(tmp_path):
    check_resumed_like_uninterrupted("stage1_text", "zero2_fp32", 1, 2, tmp_path)


@pytest.mark.slow
def test_zero3_saved_on_one_rank_resumes_on_two(tmp_path):
    check_resumed_like_uninterrupted("stage1_image", "zero3_fp32", 1, 2, tmp_path)


def test_resuming_an_older_checkpoint_on_the_same_ranks(tmp_path):
    """Same world size and ZeRO stage: loaded as saved. The newer checkpoint of the abandoned
    timeline is replaced, when training reaches it again, by an identical one."""
    run_dir = tmp_path / "run"
    common = [*FAST, "--set", f"run_dir={run_dir}"]  # the demo's ZeRO-0, one rank
    launch("stage1_text", *common)
    old = tmp_path / "old"
    shutil.copytree(run_dir / "checkpoints" / tag_for(2 * K), old)

    refused = launch("stage1_text", *common, "--set", "train.global_batch=16", "--resume", "auto", check=False)
    assert refused.returncode == 2 and "train.global_batch=8" in refused.stderr

    resumed = launch("stage1_text", *common, "--resume", tag_for(K))
    assert f"resumed at step {K}" in resumed.stdout and "loaded as saved" in resumed.stdout
    assert [p.name for p in complete_checkpoints(run_dir)] == [tag_for(K), tag_for(2 * K)]
    new = run_dir / "checkpoints" / tag_for(2 * K)
    before, after = consolidated_state_dict(old), consolidated_state_dict(new)
    assert before.keys() == after.keys()
    for name in before:
        torch.testing.assert_close(after[name], before[name], rtol=1e-5, atol=1e-7, msg=name)
    samples = [json.loads(line) for line in (run_dir / "samples.jsonl").read_text().splitlines()]
    first, again = samples[:2 * K], samples[2 * K:]
    assert [r["step"] for r in again] == list(range(K + 1, 2 * K + 1)) and again == first[K:]
