"""Failures real runs meet, with real DataLoader workers: runs end (never hang) after a normal
finish, an error, a failed checkpoint write or a pre-emption; a data source with no readable
image stops the run with an error naming it; partly unreadable data trains and is counted."""

from __future__ import annotations

import json
import os
import resource
import signal
import subprocess
import sys
import textwrap
import threading

from conftest import launch, read_tensorboard
from tinyclip_ds.config import PROJECT_ROOT
from tinyclip_ds.train.checkpoint import complete_checkpoints

FAST = ["--set", "train.micro_batch=8", "--set", "train.warmup_steps=1", "--set", "train.log_every=1",
        "--set", "eval.every=0", "--set", "eval.data=", "--set", "eval.zeroshot=", "--set", "checkpoint.every=0",
        "--set", "data.num_workers=2", "--set", "ds_config=zero0_fp32"]
STAGE2 = ["--set", "student.image.init_from=", "--set", "student.text.init_from=", "--set", "train.accumulation=2"]
ENV = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
HANG = 240  # seconds after which a run that should have ended counts as hung


def digit_files(folder, count: int) -> list[str]:
    """Write ``count`` demo digit images as PNG files; their names."""
    from tinyclip_ds.data.digits import digit_images

    folder.mkdir(parents=True, exist_ok=True)
    names = []
    for i, (image, _) in enumerate(digit_images("train")[:count]):
        names.append(f"digit_{i:04d}.png")
        image.save(folder / names[-1])
    return names


def zero_byte_files(folder, count: int) -> list[str]:
    """``count`` empty .jpg files (interrupted downloads); their names."""
    folder.mkdir(parents=True, exist_ok=True)
    names = [f"empty_{i:04d}.jpg" for i in range(count)]
    for name in names:
        (folder / name).write_bytes(b"")
    return names


def pairs_csv(path, names: list[str]) -> None:
    path.write_text("filepath,title\n" + "".join(f"{name},a photo of digit {i % 10}\n" for i, name in enumerate(names)))


def test_no_readable_image_stops_stage1_with_an_error_naming_the_source(tmp_path):
    bad = tmp_path / "bad"
    zero_byte_files(bad, 24)
    result = launch("stage1_image", *FAST, "--set", f"run_dir={tmp_path / 'run'}", "--set", "train.steps=5",
                    "--set", f"data.images=[{bad}]", "--set", "train.max_unusable=4", timeout=HANG, check=False)
    assert result.returncode == 2, result.stdout[-2000:] + result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if "stopping at step" in line]
    assert len(errors) == 1, result.stderr[-3000:]
    assert "stopping at step 0: 4 steps in a row had too few usable samples" in errors[0]
    assert f"came from {bad} 32 (zero_byte 32)" in errors[0] and "no step was trained" in errors[0]
    assert "Traceback" not in result.stderr


def test_no_readable_image_stops_stage2_with_an_error_naming_the_source(tmp_path):
    listing = tmp_path / "pairs.csv"
    pairs_csv(listing, zero_byte_files(tmp_path, 24))
    result = launch("stage2", *FAST, *STAGE2, "--set", f"run_dir={tmp_path / 'run'}", "--set", "train.steps=5",
                    "--set", f"data.pairs=[{listing}]", "--set", "train.max_unusable=3", timeout=HANG, check=False)
    assert result.returncode == 2, result.stdout[-2000:] + result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if "stopping at step" in line]
    assert len(errors) == 1, result.stderr[-3000:]
    assert "stopping at step 0: 3 steps in a row had too few usable samples" in errors[0]
    assert f"came from {listing} 48 (zero_byte 48)" in errors[0]
    assert "Traceback" not in result.stderr


def test_partly_unreadable_pairs_train_and_are_counted_per_reason(tmp_path):
    """Stage 2 on 2 ranks with 2 workers each: of 22 images one is empty and one is not an
    image; the counts are summed over the ranks. The run also ends (stage 2's loader iterator
    was held by a reference cycle past interpreter exit, where its workers hung the ranks)."""
    names = digit_files(tmp_path, 20) + zero_byte_files(tmp_path, 1)
    (tmp_path / "notes.png").write_text("not an image")
    listing = tmp_path / "pairs.csv"
    pairs_csv(listing, names + ["notes.png"])
    run_dir = tmp_path / "run"
    result = launch("stage2", *FAST, *STAGE2, "--set", f"run_dir={run_dir}", "--set", "train.steps=4",
                    "--set", "train.micro_batch=11", "--set", "train.accumulation=1",
                    "--set", f"data.pairs=[{listing}]", ranks=2, timeout=HANG)
    assert "done: 4 steps" in result.stdout
    scalars, _ = read_tensorboard(run_dir)
    # A global batch of 22 (11 per rank) is the whole set: both bad files are drawn every step.
    assert [value for _, value in scalars["data/skipped/zero_byte"]] == [1, 2, 3, 4]
    assert [value for _, value in scalars["data/skipped/not_an_image"]] == [1, 2, 3, 4]
    assert [value for _, value in scalars["train/skipped_samples"]] == [2, 4, 6, 8]
    assert "skipped 8 (" in result.stdout and "zero_byte 4" in result.stdout
    assert len(scalars["loss/total"]) == 4


def test_the_sample_log_keeps_a_skipped_try_apart_from_the_step(tmp_path):
    """train.log_samples writes what every optimizer step used: a try that was not applied
    (here: one of its two micro-batches held no readable image) is its own line, marked so, and
    its samples are not added to the next step's."""
    bad, good = tmp_path / "bad", tmp_path / "good"
    zero_byte_files(bad, 40)
    digit_files(good, 8)
    run_dir = tmp_path / "run"
    result = launch("stage1_image", *FAST, "--set", f"run_dir={run_dir}", "--set", "train.steps=6",
                    "--set", "train.micro_batch=4", "--set", "train.accumulation=2", "--set", "train.log_samples=true",
                    "--set", f"data.images=[{bad}, {good}]", timeout=HANG)
    assert "done: 6 steps" in result.stdout
    lines = [json.loads(line) for line in (run_dir / "samples.jsonl").read_text().splitlines()]
    applied = [line for line in lines if "applied" not in line]
    tries = [line for line in lines if line.get("applied", True) is False]
    assert [line["step"] for line in applied] == [1, 2, 3, 4, 5, 6]
    assert tries and all(line["reason"] == "unusable" for line in tries), lines
    assert any(line["samples"] for line in tries), "the seed's order was expected to skip a try with readable images"
    for skipped in tries:  # written before the step it was a try at
        assert lines.index(skipped) < lines.index(applied[skipped["step"] - 1])
    # Every line is one try of 2 × 4 samples: the readable ones it lists plus the skipped ones.
    scalars, _ = read_tensorboard(run_dir)
    skipped_samples = scalars["train/skipped_samples"][-1][1]
    assert sum(len(line["samples"]) for line in lines) + skipped_samples == 8 * len(lines)
    assert all(min(line["samples"], default=40) >= 40 for line in lines)  # the empty files are never listed


def fsize_limit(limit: int):
    def apply() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return apply


def test_a_failed_checkpoint_write_ends_the_run(tmp_path):
    """A file-size limit (as a full disk would) makes the checkpoint write fail: the rank reports
    the error and exits, with its loader workers, instead of hanging."""
    run_dir = tmp_path / "run"
    command = [sys.executable, "launch/stage1_text.sh", *FAST, "--set", f"run_dir={run_dir}",
               "--set", "train.steps=3", "--set", "checkpoint.every=1"]
    result = subprocess.run(command, cwd=PROJECT_ROOT, capture_output=True, text=True, env=ENV, timeout=HANG,
                            preexec_fn=fsize_limit(200_000))  # Python ignores SIGXFSZ: writes raise EFBIG
    assert result.returncode == 1, result.stdout[-2000:] + result.stderr[-3000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    message = result.stderr.strip().splitlines()[-1]
    assert message.startswith("error: rank 0 could not write the checkpoint of step 1") and \
        "there is no complete checkpoint yet" in message and "--resume auto" in message, result.stderr[-3000:]
    assert "step 1/3" in result.stdout and "done:" not in result.stdout
    assert not complete_checkpoints(run_dir)


def test_sigterm_with_workers_saves_and_exits_zero(tmp_path):
    """Pre-emption as Slurm does it on one rank: every process of the job, the loader workers
    included, gets SIGTERM; the rank finishes its step with its workers, saves and exits 0."""
    run_dir = tmp_path / "run"
    command = [sys.executable, "launch/stage2.sh", *FAST, *STAGE2, "--set", f"run_dir={run_dir}",
               "--set", "train.steps=100000"]
    process = subprocess.Popen(command, cwd=PROJECT_ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True, env=ENV, start_new_session=True)
    lines = []
    try:
        for line in process.stdout:
            lines.append(line)
            if line.startswith("step 2/"):
                break
        os.killpg(process.pid, signal.SIGTERM)
        reader = threading.Thread(target=lambda: lines.append(process.stdout.read()), daemon=True)
        reader.start()
        reader.join(timeout=HANG)  # the output ends when every process of the job has
        assert not reader.is_alive(), "the job did not end after SIGTERM:\n" + "".join(lines)[-4000:]
        returncode = process.wait(timeout=HANG)
    finally:
        try:
            os.killpg(process.pid, signal.SIGKILL)  # whatever is left of the job
        except ProcessLookupError:
            pass
    output = "".join(lines)
    assert returncode == 0, output[-4000:]
    stopped = [line for line in output.splitlines() if line.startswith("pre-empted (SIGTERM/SIGINT) at step")]
    assert len(stopped) == 1, output[-4000:]
    step = int(stopped[0].split()[4].rstrip(";"))
    assert [p.name for p in complete_checkpoints(run_dir)] == [f"step_{step:08d}"]


EXIT_WITHOUT_CLOSING = textwrap.dedent('''
    """Take a batch from TrainBatches with a worker, then exit without closing them, the
    iterator kept alive by a reference cycle (the case the loop's close() prevents)."""
    import torch
    from torch.utils.data import Dataset

    from tinyclip_ds.data import sampler
    from tinyclip_ds.data.order import GlobalOrder


    class Numbers(Dataset):
        def __len__(self):
            return 64

        def __getitem__(self, key):
            return {"index": key[0], "text": torch.zeros(3, dtype=torch.long)}


    sampler.WORKER_GRACE_S = 2.0
    batches = sampler.TrainBatches(Numbers(), sampler.GlobalBatchSampler(GlobalOrder([64], seed=0), 8, 1, 1, 0), num_workers=1)
    assert next(batches)["index"].numel() == 8
    batches.cycle = batches
    print("exiting", flush=True)
''')


def test_a_worker_never_outlives_an_exiting_rank_for_long(tmp_path):
    """At exit multiprocessing sends the worker SIGTERM and waits: without new work the worker
    leaves after the grace period instead of being waited for forever."""
    script = tmp_path / "exit_without_closing.py"
    script.write_text(EXIT_WITHOUT_CLOSING)
    result = subprocess.run([sys.executable, str(script)], cwd=PROJECT_ROOT, capture_output=True, text=True,
                            env=ENV, timeout=90)  # a 2-second grace period, and the time to import torch
    assert result.returncode == 0 and "exiting" in result.stdout, result.stderr[-3000:]


def test_stage2_objective_on_an_empty_batch_is_zero_not_a_division_by_zero():
    import torch

    from tinyclip_ds.distill.config import LossConfig
    from tinyclip_ds.distill.objectives import Stage2Objective
    from tinyclip_ds.train.contrastive import Features

    objective = Stage2Objective(LossConfig(contrastive=1.0, affinity=1.0, fd=1.0))
    empty = Features(torch.zeros(0, 8, requires_grad=True), torch.zeros(0, 8), None, None, None)
    loss, terms = objective(empty, empty, torch.tensor(10.0), torch.zeros(0, dtype=torch.long))
    assert loss.item() == 0.0 and terms == {}
