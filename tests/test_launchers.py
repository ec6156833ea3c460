"""Stage launchers: one file that works under `bash` (assembles the deepspeed command and sees
the ranks to their end) and under `deepspeed` (runs the rank with Python); a job started with
`bash launch/<stage>.sh` that is told to stop returns 0 only once its checkpoint is complete."""

import contextlib
import os
import shlex
import signal
import subprocess
import sys
import threading
import time

import psutil
import pytest

from conftest import free_port, kill_during_save
from test_checkpoint_faults import FAST, preempted_at
from tinyclip_ds.config import PROJECT_ROOT
from tinyclip_ds.train.checkpoint import complete_checkpoints, tag_for

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


def test_node_rank_starts_only_this_nodes_ranks(tmp_path):
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("node-a slots=8\nnode-b slots=8\n")
    result = dry_run("stage2", HOSTFILE=str(hostfile), NODE_RANK="1", MASTER_ADDR="node-a")
    assert result.returncode == 0, result.stderr
    assert shlex.split(result.stdout) == ["deepspeed", "--hostfile", str(hostfile), "--no_ssh", "--node_rank", "1",
                                          "--master_addr", "node-a", "launch/stage2.sh"]
    missing = dry_run("stage2", NODE_RANK="0", MASTER_ADDR="node-a")
    assert missing.returncode == 2
    assert "NODE_RANK=0 needs a HOSTFILE listing the nodes and MASTER_ADDR" in missing.stderr


# ---------------------------------------------------------------- stopping a real job

class Job:
    """``bash launch/stage1_text.sh`` on two CPU ranks, in a session of its own (as a terminal's
    foreground job or a Slurm task is), training "forever"; its output is collected as it comes."""

    def __init__(self, run_dir, *extra: str, env: dict | None = None):
        command = ["bash", "launch/stage1_text.sh", *FAST, "--set", f"run_dir={run_dir}",
                   "--set", "ds_config=zero2_fp32", "--set", "train.steps=100000", "--set", "checkpoint.every=0",
                   *extra]
        self.process = subprocess.Popen(
            command, cwd=PROJECT_ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            start_new_session=True, env={**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1",
                                         "NUM_GPUS": "2", "MASTER_PORT": str(free_port()), **(env or {})})
        self.lines: list[str] = []
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self):
        for line in self.process.stdout:
            self.lines.append(line)

    def output(self) -> str:
        """Everything the job printed so far."""
        return "".join(self.lines)

    def wait_for_step(self, step: int, timeout: int = 300) -> None:
        """Return once training has logged ``step``; fail if the job ends or takes too long first."""
        deadline = time.monotonic() + timeout
        while not any(line.startswith(f"step {step}/") for line in self.lines):
            assert self.process.poll() is None and time.monotonic() < deadline, self.output()[-4000:]
            time.sleep(0.2)

    def processes(self) -> list[psutil.Process]:
        """Every process the job started and still has (none once it has returned)."""
        try:
            return psutil.Process(self.process.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            return []

    def ranks(self) -> list[psutil.Process]:
        """The two rank processes (``--local_rank=`` on their command line)."""
        ranks = []
        for process in self.processes():
            with contextlib.suppress(psutil.Error):  # a process that has just ended
                if any(arg.startswith("--local_rank=") for arg in process.cmdline()):
                    ranks.append(process)
        assert len(ranks) == 2, self.output()[-4000:]
        return ranks

    def finish(self, timeout: int = 300) -> str:
        """The output, once every process of the job has closed it."""
        self.reader.join(timeout)
        assert not self.reader.is_alive(), "processes of the job still hold its output"
        return self.output()


def alive(processes: list[psutil.Process]) -> list[psutil.Process]:
    """Those of ``processes`` still running (an exited process nobody reaped yet is not)."""
    return [p for p in processes if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]


@contextlib.contextmanager
def cleanup(job: Job):
    """Whatever happens in the test, leave no process of the job behind."""
    family = []
    try:
        yield family
    finally:
        for process in [*family, *job.processes()]:
            with contextlib.suppress(psutil.Error):
                process.kill()
        with contextlib.suppress(ProcessLookupError):
            job.process.kill()
        job.process.wait(timeout=60)


def stopped_cleanly(job: Job, returncode: int, complete_at_return: list, ranks: list, run_dir) -> None:
    """Status 0, returned only once the ranks had saved the checkpoint of the step they stopped
    at and exited."""
    assert not alive(ranks), "the launcher returned while ranks were still running"
    output = job.finish()
    assert returncode == 0, output[-4000:]
    step = preempted_at(output, run_dir)
    assert complete_at_return == [run_dir / "checkpoints" / tag_for(step)], output[-4000:]


def signalled_job_stops_cleanly(run_dir, send) -> None:
    """Start a 2-rank job, let it train 2 steps, stop it with ``send(job, ranks)``, and check it
    returned 0 only once the ranks had saved and exited (`stopped_cleanly`)."""
    job = Job(run_dir)
    with cleanup(job) as family:
        job.wait_for_step(2)
        ranks = job.ranks()
        family += ranks
        send(job, ranks)
        returncode = job.process.wait(timeout=300)
        complete_at_return = complete_checkpoints(run_dir)
        stopped_cleanly(job, returncode, complete_at_return, ranks, run_dir)


def test_sigterm_to_the_launchers_process_group_returns_0_after_the_checkpoint(tmp_path):
    """`kill -TERM -<pgid>` (or Ctrl-C, which signals the foreground group): DeepSpeed's own
    `deepspeed` command exited 143 at once, while the ranks were still saving. The group holds
    the launcher alone, so this is also `kill -TERM <its pid>`."""
    def to_the_group(job, ranks):
        assert all(os.getpgid(rank.pid) != job.process.pid for rank in ranks)
        os.killpg(job.process.pid, signal.SIGTERM)

    signalled_job_stops_cleanly(tmp_path / "run", to_the_group)


@pytest.mark.slow
def test_sigterm_to_every_process_of_the_job_returns_0_after_the_checkpoint(tmp_path):
    """As Slurm signals a job step: every process, DeepSpeed's and the ranks' included."""
    def to_every_process(job, ranks):
        for process in [psutil.Process(job.process.pid), *job.processes()]:
            with contextlib.suppress(psutil.NoSuchProcess):
                process.send_signal(signal.SIGTERM)

    signalled_job_stops_cleanly(tmp_path / "run", to_every_process)


@pytest.mark.slow
def test_a_rank_that_dies_fails_the_launcher_with_its_status(tmp_path):
    """Rank 1 dies (SIGKILL) while saving step 2: the launcher stops the other rank and exits
    with the dead rank's status, as a shell reports it (DeepSpeed's launcher reported 247)."""
    run_dir = tmp_path / "run"
    job = Job(run_dir, "--set", "train.steps=4", "--set", "checkpoint.every=2",
              env=kill_during_save(rank=1, step=2))
    with cleanup(job):
        returncode = job.process.wait(timeout=300)
        output = job.finish()
    assert returncode == 128 + signal.SIGKILL, output[-4000:]
    assert "error: local rank 1 exited with status 137; stopping the other ranks" in output
    assert complete_checkpoints(run_dir) == []


@pytest.mark.slow
def test_a_rank_that_dies_while_stopping_fails_the_launcher_after_every_rank_ended(tmp_path):
    """SIGTERM, then a rank dies before the checkpoint is complete: a non-zero status, returned
    only once no rank is left."""
    run_dir = tmp_path / "run"
    job = Job(run_dir)
    with cleanup(job) as family:
        job.wait_for_step(2)
        ranks = job.ranks()
        family += ranks
        os.kill(job.process.pid, signal.SIGTERM)
        ranks[1].kill()
        returncode = job.process.wait(timeout=300)
        assert not alive(ranks), "the launcher returned while ranks were still running"
        output = job.finish()
    assert returncode != 0, output[-4000:]
    assert complete_checkpoints(run_dir) == []
