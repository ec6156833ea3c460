"""Stage 1 end to end on the digits demo, with real DeepSpeed engines and processes."""

from __future__ import annotations

import math

import numpy as np
import pytest

from conftest import launch, read_metrics, read_tensorboard
from tinyclip_ds.train.checkpoint import complete_checkpoints
from tinyclip_ds.train.consolidate import consolidated_state_dict

FAST = ["--set", "train.micro_batch=16", "--set", "train.warmup_steps=1", "--set", "train.lr=2e-3",
        "--set", "eval.batch_size=64", "--set", "train.log_every=1", "--set", "data.num_workers=0"]


def losses_of(run_dir) -> list[float]:
    scalars, _ = read_tensorboard(run_dir)
    return [value for _, value in scalars["loss/total"]]


@pytest.mark.parametrize("stage,ranks,ds_config", [
    ("stage1_image", 2, "zero2_bf16"),
    ("stage1_text", 1, "zero0_fp32"),
])
def test_demo_trains_logs_evaluates_checkpoints_and_resumes(tmp_path, stage, ranks, ds_config):
    run_dir = tmp_path / "run"
    common = [*FAST, "--set", f"run_dir={run_dir}", "--set", f"ds_config={ds_config}",
              "--set", "eval.every=4", "--set", "checkpoint.every=4"]
    if stage == "stage1_text":
        common += ["--set", "loss.attn_probs=1.0", "--set", "loss.rep_kl=1.0"]
    first = launch(stage, *common, "--set", "train.steps=8", ranks=ranks)
    assert "run directory" in first.stdout and str(run_dir) in first.stdout

    losses = losses_of(run_dir)
    assert len(losses) == 8 and all(np.isfinite(losses))
    assert np.mean(losses[-2:]) < np.mean(losses[:2]), losses

    scalars, images = read_tensorboard(run_dir)
    # train/grad_norm also at ZeRO-0 (stage1_text), where DeepSpeed does not report it
    for tag in ("loss/rep_l1", "loss/rep_cos", "loss/hidden", "train/lr", "train/samples_per_s", "train/grad_norm",
                "train/skipped_samples", "train/skipped_steps", "student/zeroshot_top1", "student/t2i_R@1"):
        assert tag in scalars, (tag, sorted(scalars))
    assert all(0 < norm < math.inf for _, norm in scalars["train/grad_norm"])
    if stage == "stage1_text":
        assert "loss/attn_probs" in scalars and "loss/rep_kl" in scalars
    assert {"eval/similarity_student_vs_teacher", "eval/retrieval_student", "eval/retrieval_teacher"} <= set(images)

    metrics = read_metrics(run_dir)
    assert [m["step"] for m in metrics] == [4, 8]
    for key in ("student/zeroshot_top1", "teacher/zeroshot_top1", "student/i2t_R@1", "student/t2i_R@1",
                "student/mean_score", "student/offdiag_mean"):
        assert 0.0 <= metrics[-1][key] <= 1.0 or key.endswith(("mean_score", "offdiag_mean"))
    assert metrics[-1]["teacher/zeroshot_top1"] > 0.9  # the shipped teacher is good
    assert [p.name for p in complete_checkpoints(run_dir)] == ["step_00000004", "step_00000008"]
    assert (run_dir / "recipe.yaml").is_file() and (run_dir / "ds_config.json").is_file()

    # The same command without --resume refuses to overwrite the run ...
    refused = launch(stage, *common, "--set", "train.steps=10", ranks=ranks, check=False)
    assert refused.returncode != 0 and "--resume auto" in refused.stderr + refused.stdout
    # ... and with it, training continues from step 8.
    resumed = launch(stage, *common, "--set", "train.steps=10", "--resume", "auto", ranks=ranks)
    assert "resumed at step 8" in resumed.stdout
    assert [m["step"] for m in read_metrics(run_dir)] == [4, 8, 10]
    steps = [step for step, _ in read_tensorboard(run_dir)[0]["loss/total"]]
    assert steps[-2:] == [9, 10]


def test_unreadable_image_is_skipped_and_counted(tmp_path):
    from tinyclip_ds.data.digits import digit_images

    folder = tmp_path / "images" / "nested"
    folder.mkdir(parents=True)
    for i, (image, _) in enumerate(digit_images("train")[:40]):
        image.save(folder / f"digit_{i:03d}.png")
    (folder / "broken.jpg").write_bytes(b"this is not an image")
    (folder / "empty.jpg").write_bytes(b"")
    run_dir = tmp_path / "run"
    result = launch("stage1_image", *FAST, "--set", f"run_dir={run_dir}", "--set", "train.steps=6",
                    "--set", f"data.images=[{tmp_path / 'images'}]", "--set", "train.micro_batch=42",
                    "--set", "eval.every=0", "--set", "checkpoint.every=0", "--set", "data.num_workers=2")
    assert "done: 6 steps" in result.stdout
    scalars, _ = read_tensorboard(run_dir)
    # 42 files, two unusable, one global batch per epoch: each skipped once per step
    assert [value for _, value in scalars["train/skipped_samples"]] == [2, 4, 6, 8, 10, 12]
    for reason in ("not_an_image", "zero_byte"):
        assert [value for _, value in scalars[f"data/skipped/{reason}"]] == [1, 2, 3, 4, 5, 6], reason
    assert "skipped 12 (not_an_image 6, zero_byte 6)" in result.stdout
    assert all(np.isfinite(losses_of(run_dir)))


@pytest.mark.parametrize("ds_config", ["zero0_fp32", "zero2_bf16"])
def test_nonfinite_losses_skip_steps_then_stop_the_run_with_a_checkpoint(tmp_path, ds_config):
    """An absurd learning rate makes the weights overflow after the first step: every later loss
    is non-finite; each such step is skipped (nothing applied) and counted, and
    train.max_nonfinite in a row stop the run with a checkpoint and a message that says what to
    do. ZeRO-0 fp32 is skipped by the library, ZeRO-2 bf16 by DeepSpeed's optimizer."""
    run_dir = tmp_path / "run"
    result = launch("stage1_text", *FAST, "--set", f"run_dir={run_dir}", "--set", "train.steps=20",
                    "--set", "train.lr=1e30", "--set", "train.warmup_steps=0", "--set", "train.max_nonfinite=3",
                    "--set", "eval.every=0", "--set", "checkpoint.every=0", "--set", "train.accumulation=2",
                    "--set", f"ds_config={ds_config}", check=False)
    assert result.returncode == 1, result.stdout[-2000:] + result.stderr[-2000:]
    assert result.stdout.count("non-finite loss, step skipped") == 3
    assert "stopping: 3 non-finite losses in a row" in result.stdout and "--resume auto" in result.stdout
    assert [p.name for p in complete_checkpoints(run_dir)] == ["step_00000001"]
    # Saved after the three skipped steps: had any of them been applied, the weights would be NaN.
    weights = consolidated_state_dict(complete_checkpoints(run_dir)[0])
    assert weights and all(bool(value.float().isfinite().all()) for value in weights.values())


def test_throughput_prints_significant_digits():
    """A slow run printed "0 samples/s"."""
    from tinyclip_ds.train.monitor import significant

    assert [significant(v) for v in (0.0123456, 0.4, 1.5, 12.345, 999.4, 12345.6, 0.0)] == \
        ["0.0123", "0.400", "1.50", "12.3", "999", "12346", "0"]
