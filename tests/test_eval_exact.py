"""Evaluation is computed once on gathered embeddings: the same numbers on 1 and 2 ranks, and
with evaluation batch sizes 7 and 64 (the research notes' metric depended on both). Evaluation
data in real runs: checked at start, its own image root, and a failing evaluation never costs
the checkpoint of its step."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from conftest import DEEPSPEED, free_port, launch, read_metrics
from tinyclip_ds.config import PROJECT_ROOT
from tinyclip_ds.train.checkpoint import complete_checkpoints

WORKER = PROJECT_ROOT / "tests" / "workers" / "evaluate.py"
RANK_METRICS = ("i2t_R@1", "i2t_R@5", "i2t_R@10", "t2i_R@1", "t2i_R@5", "t2i_R@10", "mean_recall",
                "zeroshot_top1", "zeroshot_top5")


def evaluate(tmp_path, ranks: int) -> dict[int, dict]:
    out = tmp_path / f"metrics_{ranks}.json"
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
    if ranks == 1:
        command = [sys.executable, str(WORKER)]
        env.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    else:
        command = [DEEPSPEED, "--num_gpus", str(ranks), "--master_port", str(free_port()), str(WORKER)]
    result = subprocess.run([*command, "--out", str(out), "--batch-sizes", "7", "64"], env=env,
                            capture_output=True, text=True, timeout=600, cwd=PROJECT_ROOT)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    return {int(k): v for k, v in json.loads(out.read_text()).items()}


def test_same_metrics_for_any_world_size_and_batch_size(tmp_path):
    one, two = evaluate(tmp_path, 1), evaluate(tmp_path, 2)
    assert set(one[64]) >= set(RANK_METRICS) | {"mean_score", "offdiag_mean", "offdiag_std"}
    assert one[64]["zeroshot_top1"] > 0.9 and one[64]["t2i_R@1"] > 0.3  # a real, trained teacher
    # Any world size: bit-identical (each chunk is embedded with the same shapes on any rank).
    assert two[64] == one[64]
    assert two[7] == one[7]
    # Any batch size: rank metrics identical (counts: the demo set's smallest top-k margins,
    # ~7e-5, are far above the ~3e-8 that batch shapes change its embeddings by); cosine
    # statistics differ at most by the model's own last-bit differences (fp32 BLAS).
    for key in RANK_METRICS:
        assert one[7][key] == one[64][key], key
    for key in ("mean_score", "offdiag_mean", "offdiag_std", "score_gap"):
        assert one[7][key] == pytest.approx(one[64][key], abs=1e-6), key


# ---------------------------------------------------------------- evaluation data in real runs

RUN = ["--set", "train.micro_batch=8", "--set", "train.warmup_steps=1", "--set", "train.log_every=1",
       "--set", "checkpoint.every=0", "--set", "data.num_workers=1", "--set", "ds_config=zero0_fp32"]


def eval_set(folder, count: int = 12) -> list[str]:
    """Held-out demo digits as PNG files in ``folder``/imgs; their paths relative to ``folder``."""
    from tinyclip_ds.data.digits import DIGIT_NAMES, digit_images

    (folder / "imgs").mkdir(parents=True, exist_ok=True)
    names = []
    for i, (image, label) in enumerate(digit_images("heldout")[:count]):
        names.append(f"imgs/{DIGIT_NAMES[label]}_{i:03d}.png")
        image.save(folder / names[-1])
    return names


def eval_csv(path, names: list[str]) -> None:
    path.write_text("filepath,title\n" + "".join(f"{n},a photo of the digit {n.split('/')[1].split('_')[0]}\n"
                                                 for n in names))


def test_eval_image_root_applies_to_eval_data_and_stray_files_are_ignored(tmp_path):
    """eval.data's relative paths resolve against eval.image_root (data.image_root is for training
    data only); a README.txt in a zero-shot class folder is not an image."""
    root = tmp_path / "eval_root"
    listing = tmp_path / "lists" / "val.csv"
    listing.parent.mkdir()
    eval_csv(listing, eval_set(root))
    classes = tmp_path / "classes"
    for name in eval_set(tmp_path / "zs"):
        label = name.split("/")[1].split("_")[0]
        (classes / label).mkdir(parents=True, exist_ok=True)
        (tmp_path / "zs" / name).rename(classes / label / name.split("/")[1])
    (classes / label / "README.txt").write_text("where these images came from")
    run_dir = tmp_path / "run"
    result = launch("stage1_image", *RUN, "--set", f"run_dir={run_dir}", "--set", "train.steps=1",
                    "--set", f"eval.data={listing}", "--set", f"eval.image_root={root}",
                    "--set", f"data.image_root={tmp_path / 'not_here'}", "--set", f"eval.zeroshot={classes}")
    metrics = read_metrics(run_dir)
    assert [m["step"] for m in metrics] == [1], result.stdout[-3000:]
    assert "student/t2i_R@1" in metrics[0] and "student/zeroshot_top1" in metrics[0]


def test_a_missing_eval_image_fails_at_start_before_training(tmp_path):
    names = eval_set(tmp_path)
    listing = tmp_path / "val.csv"
    eval_csv(listing, names[:5] + ["imgs/three_999.png"] + names[5:])
    result = launch("stage1_image", *RUN, "--set", f"run_dir={tmp_path / 'run'}", "--set", "train.steps=2",
                    "--set", f"eval.data={listing}", check=False)
    assert result.returncode == 2, result.stdout[-2000:] + result.stderr[-3000:]
    assert f"evaluation image {tmp_path / 'imgs' / 'three_999.png'} cannot be used (missing_file)" in result.stderr
    assert "step 1/" not in result.stdout and "Traceback" not in result.stderr


def test_a_failing_evaluation_keeps_the_checkpoint_of_its_step(tmp_path):
    """An evaluation image removed while training runs: the evaluation at step 2 fails and ends
    the run with its message, after step 2's checkpoint is written."""
    names = eval_set(tmp_path)
    listing = tmp_path / "val.csv"
    eval_csv(listing, names)
    run_dir = tmp_path / "run"
    command = [sys.executable, "launch/stage1_image.sh", *RUN, "--set", f"run_dir={run_dir}",
               "--set", "train.steps=4", "--set", "eval.every=2", "--set", "checkpoint.every=2",
               "--set", f"eval.data={listing}", "--set", "eval.zeroshot="]
    process = subprocess.Popen(command, cwd=PROJECT_ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               env={**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"})
    try:
        for line in process.stdout:
            if line.startswith("step 1/"):
                (tmp_path / names[3]).unlink()
                break
        output, errors = process.communicate(timeout=600)
    finally:
        process.kill()
    assert process.returncode == 2, output[-2000:] + errors[-3000:]
    assert f"evaluation image {tmp_path / names[3]} cannot be used (missing_file)" in errors
    assert [p.name for p in complete_checkpoints(run_dir)] == ["step_00000002"]
