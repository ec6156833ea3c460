"""`bench/gpu_check.sh --tiny`: the lent-GPU check's own code path, run as the real script on the
CPU (tiny shapes, bf16 ZeRO-2 under DS_ACCELERATOR=cpu). It exits 0 and prints both stages' rows
with numbers; a failing step makes it exit non-zero; its FLOP accounting matches the towers'
own counts; the peak-FLOP table reads GPU names as torch reports them. Timings are printed by
the script but never asserted."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tinyclip_ds.config import PROJECT_ROOT

sys.path.insert(0, str(PROJECT_ROOT / "bench"))
import gpu_check  # noqa: E402  (bench/ is no package)

SCRIPT = PROJECT_ROOT / "bench" / "gpu_check.sh"
NUMBER = r"\d+(?:\.\d+)?"


def run_script(out: Path, *args: str) -> subprocess.CompletedProcess:
    """``bash bench/gpu_check.sh --tiny --out OUT ARGS`` with this interpreter."""
    return subprocess.run(["bash", str(SCRIPT), "--tiny", "--out", str(out), *args], cwd=PROJECT_ROOT,
                          capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHON": sys.executable})


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> tuple[subprocess.CompletedProcess, Path]:
    """One --tiny run of the whole script."""
    out = tmp_path_factory.mktemp("gpu_check")
    return run_script(out), out


def test_tiny_run_prints_both_rows_with_numbers(tiny_run):
    result, out = tiny_run
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    for stage in gpu_check.STAGES:
        row = re.search(rf"^\| {stage} \| (.+?) \| ({NUMBER}) \| ({NUMBER}) \| n/a \| ({NUMBER}) \| n/a \| n/a \| n/a \|$",
                        result.stdout, re.MULTILINE)
        assert row, f"no {stage} row with numbers in:\n{result.stdout[-3000:]}"
        assert float(row.group(2)) > 0 and float(row.group(3)) > 0 and float(row.group(4)) > 0
        assert "bf16, ZeRO-2" in row.group(1)
    lines = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    assert [line["stage"] for line in lines] == list(gpu_check.STAGES)
    stage1, stage2 = lines
    assert stage1["loss_terms"] == sorted(gpu_check.STAGE1_TERMS)  # every intermediate term ran
    assert stage2["loss_terms"] == sorted(gpu_check.STAGE2_TERMS)
    assert stage2["accumulation"] > 1 and stage2["global_batch"] == stage2["micro_batch"] * stage2["accumulation"]
    assert stage1["measured_samples"] == gpu_check.TINY.stage1_measured * gpu_check.TINY.stage1_micro
    assert stage2["measured_samples"] == gpu_check.TINY.stage2_measured * gpu_check.TINY.stage2_global
    assert (out / "results.md").read_text() in result.stdout


def test_flops_are_the_towers_own_counts(tiny_run):
    """Stage 2's teacher FLOPs per sample are its two towers' forwards; the students' forward is
    both student towers; stage 1's student counts more than its tower (the objective's parts)."""
    from tinyclip_ds.models.students import build_students
    from tinyclip_ds.models.teachers import load_teacher
    from tinyclip_ds.recipe import load_recipe
    from tinyclip_ds.speed import count_flops, example_input

    result, out = tiny_run
    assert result.returncode == 0, result.stderr[-3000:]
    stage1, stage2 = (json.loads((out / f"{stage}.json").read_text()) for stage in gpu_check.STAGES)
    recipe = load_recipe(out / "recipes" / "stage2.yaml", ["student.image.init_from="])
    teacher = load_teacher(recipe.teacher).clip.float()
    students = build_students(recipe.student, teacher, ("image", "text"), 0)
    # counted at the length training runs the micro-batch's text at: up to its longest caption
    assert 2 < stage2["text_tokens"] < teacher.text.shape.context_length
    towers = {"teacher": (teacher.visual, teacher.text),
              "student": (students["image"].tower, students["text"].tower)}

    def inputs(tower):
        x = example_input(tower, 1)
        return x if x.is_floating_point() else x[:, :stage2["text_tokens"]]

    flops = {name: sum(count_flops(t, inputs(t)) for t in pair) for name, pair in towers.items()}
    assert stage2["teacher_gflops_per_sample"] * 1e9 == pytest.approx(flops["teacher"], rel=1e-6)
    assert stage2["student_gflops_per_sample"] * 1e9 == pytest.approx(flops["student"], rel=1e-6)
    image_student = count_flops(students["image"].tower, example_input(students["image"].tower, 1))
    assert stage1["student_gflops_per_sample"] * 1e9 > image_student


def test_a_failing_step_stops_the_script_non_zero(tmp_path):
    # Attention maps need equal head counts: refused for the 2× heads student, inside stage 1.
    result = run_script(tmp_path, "--set", "loss.attn_probs=1.0")
    assert result.returncode != 0
    assert "attn_probs" in result.stderr
    assert "gpu_check stage1_image" in result.stderr and "| stage2 |" not in result.stdout
    assert not (tmp_path / "stage2.json").exists()


@pytest.mark.parametrize("name, tflops", [("NVIDIA H100 80GB HBM3", 989), ("NVIDIA H100 PCIe", 756),
                                          ("NVIDIA H100 NVL", 835), ("NVIDIA H200", 989),
                                          ("NVIDIA A100-SXM4-80GB", 312), ("NVIDIA GeForce RTX 4090", None)])
def test_peak_flops_by_gpu_name(name, tflops):
    peak = gpu_check.peak_bf16_flops(name)
    assert (peak / 1e12 if peak else None) == tflops
