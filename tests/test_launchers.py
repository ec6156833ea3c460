"""Stage launchers: one file that works under `bash` (assembles the deepspeed command) and
under `deepspeed` (runs the rank with Python)."""

import os
import shlex
import subprocess
import sys

import pytest

from tinyclip_ds.config import PROJECT_ROOT

STAGES = ["stage1_image", "stage1_text", "stage2"]


def dry_run(stage, *args, **env):
    result = subprocess.run(
        ["bash", f"launch/{stage}.sh", *args], cwd=PROJECT_ROOT, capture_output=True, text=True,
        env={**os.environ, "DRY_RUN": "1", **env}, timeout=120)
    return result


@pytest.mark.parametrize("stage", STAGES)
def test_one_node_dry_run(stage):
    result = dry_run(stage, "--set", "train.lr=1e-4", NUM_GPUS="2")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    assert len(lines) == 1
    assert shlex.split(lines[0]) == ["deepspeed", "--num_gpus", "2", f"launch/{stage}.sh",
                                     "--set", "train.lr=1e-4"]


def test_hostfile_nodes_and_master_port(tmp_path):
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("node-a slots=8\nnode-b slots=8\n")
    result = dry_run("stage2", "--recipe", "recipes/demo/stage2.yaml", HOSTFILE=str(hostfile),
                     NUM_NODES="2", MASTER_ADDR="node-a", MASTER_PORT="29611")
    assert result.returncode == 0, result.stderr
    assert shlex.split(result.stdout) == [
        "deepspeed", "--hostfile", str(hostfile), "--num_nodes", "2", "--master_addr", "node-a",
        "--master_port", "29611", "launch/stage2.sh", "--recipe", "recipes/demo/stage2.yaml"]


def test_arguments_with_spaces_survive():
    result = dry_run("stage1_text", "--set", "name=my run")
    assert shlex.split(result.stdout) == ["deepspeed", "launch/stage1_text.sh", "--set", "name=my run"]


@pytest.mark.parametrize("env,message", [
    ({"NUM_GPUS": "two"}, "NUM_GPUS='two' must be a positive integer"),
    ({"HOSTFILE": "/nonexistent/hostfile"}, "HOSTFILE=/nonexistent/hostfile does not exist"),
    ({"NUM_NODES": "2"}, "NUM_NODES=2 needs a HOSTFILE"),
])
def test_bad_environment_is_a_clear_error(env, message):
    result = dry_run("stage1_image", **env)
    assert result.returncode == 2 and message in result.stderr and result.stdout == ""


@pytest.mark.parametrize("stage", STAGES)
def test_python_half_runs_the_stage(stage):
    """What DeepSpeed's launcher does on each rank: `python -u launch/X.sh --local_rank=0 ...`.
    A misspelt override must reach the recipe loader of the right stage and fail there."""
    result = subprocess.run(
        [sys.executable, "-u", f"launch/{stage}.sh", "--local_rank=0", "--set", "train.stpes=3"],
        cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert "unknown recipe key 'train.stpes'" in result.stderr and "train.steps" in result.stderr
