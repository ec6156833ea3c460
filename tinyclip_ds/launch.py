"""The shell side of the stage launchers: assemble (or print) the ``deepspeed`` command and see
its ranks to their end.

``bash launch/stage1_image.sh ARGS`` runs ``python3 -m tinyclip_ds.launch
launch/stage1_image.sh ARGS``, which starts DeepSpeed's launcher on the same file; DeepSpeed then
runs that file with Python on every rank (see the file's Python half). Scale comes from the
environment, like torchtitan's launchers:

    NUM_GPUS     GPUs per node (default: all that DeepSpeed finds)
    NUM_NODES    nodes to use from the hostfile
    HOSTFILE     DeepSpeed hostfile ("hostname slots=N" per line) for multi-node runs
    MASTER_ADDR  address of the rank-0 node
    MASTER_PORT  rendezvous port (default: DeepSpeed's 29500)
    NODE_RANK    this node's line in HOSTFILE (from 0) when every node runs its own launcher, e.g.
                 one Slurm task per node: DeepSpeed starts this node's ranks only, without ssh
    DRY_RUN=1    print the command instead of running it

Stopping. DeepSpeed's commands do not wait for a pre-empted run's checkpoint: on one node the
``deepspeed`` runner dies at once on SIGTERM, and its per-node launcher passes SIGTERM/SIGINT to
the ranks and SIGKILLs them 30 s later. So this process runs ``deepspeed`` in a session of its
own (a Ctrl-C or a signal to our process group reaches only us) and, once DeepSpeed's launcher
has started this node's ranks, ends that launcher and looks after the ranks itself, as their
subreaper: SIGTERM/SIGINT is passed on to the ranks alone, which save and exit; a rank that
fails takes the others down, as DeepSpeed's launcher would; and this process exits once every
process it started has ended, with status 0 only if every rank exited 0. Where no launcher runs
on this node (DeepSpeed's pdsh multi-node mode), the runner is left to do what it does.
"""

from __future__ import annotations

import base64
import contextlib
import ctypes
import json
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil

LAUNCHER_MODULE = "deepspeed.launcher.launch"  # DeepSpeed's per-node launcher, the ranks' parent
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
PR_SET_CHILD_SUBREAPER = 36  # <linux/prctl.h>
POLL_S = 0.5  # while waiting for DeepSpeed's launcher to start the ranks (each look lists processes)
REAP_POLL_S = 0.1  # once we look after the ranks: a look is one waitpid, and it is the job's exit latency


class LaunchError(ValueError):
    pass


def _int(env: dict, name: str, least: int = 1) -> str | None:
    value = env.get(name, "").strip()
    if not value:
        return None
    if not value.isdigit() or int(value) < least:
        kind = "a positive integer" if least == 1 else "an integer from 0"
        raise LaunchError(f"{name}={value!r} must be {kind}")
    return value


def deepspeed_command(script: str, args: list[str], env: dict) -> list[str]:
    """The ``deepspeed`` command line for ``script`` under the scale given in ``env``."""
    command = ["deepspeed"]
    hostfile = env.get("HOSTFILE", "").strip()
    if hostfile:
        if not Path(hostfile).is_file():
            raise LaunchError(f"HOSTFILE={hostfile} does not exist; it lists one 'hostname slots=N' per line")
        command += ["--hostfile", hostfile]
    num_nodes = _int(env, "NUM_NODES")
    if num_nodes:
        if int(num_nodes) > 1 and not hostfile:
            raise LaunchError(f"NUM_NODES={num_nodes} needs a HOSTFILE listing the nodes")
        command += ["--num_nodes", num_nodes]
    num_gpus = _int(env, "NUM_GPUS")
    if num_gpus:
        command += ["--num_gpus", num_gpus]
    node_rank = _int(env, "NODE_RANK", least=0)
    if node_rank:
        if not hostfile or not env.get("MASTER_ADDR", "").strip():
            raise LaunchError(f"NODE_RANK={node_rank} needs a HOSTFILE listing the nodes and MASTER_ADDR")
        command += ["--no_ssh", "--node_rank", node_rank]
    if env.get("MASTER_ADDR", "").strip():
        command += ["--master_addr", env["MASTER_ADDR"].strip()]
    master_port = _int(env, "MASTER_PORT")
    if master_port:
        command += ["--master_port", master_port]
    return command + [script, *args]


def exit_status(wait_status: int) -> int:
    """A wait status as the shell reports it: the exit code, or 128 + N for death by signal N."""
    code = os.waitstatus_to_exitcode(wait_status)
    return 128 - code if code < 0 else code


def _cmdline(process: psutil.Process) -> list[str]:
    try:
        return process.cmdline()
    except psutil.Error:  # gone, or a zombie
        return []


def local_rank_count(launcher_cmdline: list[str]) -> int:
    """How many ranks DeepSpeed's per-node launcher starts: its node's entry of ``--world_info``."""
    options: dict[str, str] = {}
    for arg in launcher_cmdline:
        if arg.startswith("--") and "=" in arg:
            name, value = arg[2:].split("=", 1)
            options.setdefault(name, value)  # the launcher's own options come before the script's
    world = json.loads(base64.urlsafe_b64decode(options["world_info"]))
    return len(list(world.values())[int(options.get("node_rank", "0"))])


def become_subreaper() -> None:
    """Adopt our orphaned descendants (the ranks, once DeepSpeed's launcher is gone) to wait for them."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_CHILD_SUBREAPER) failed")


class Supervisor:
    """Runs a ``deepspeed`` command and sees this node's ranks to their end (see the module docstring)."""

    def __init__(self, command: list[str]):
        self.stop: int | None = None  # the first stop signal received
        self.unsent = 0  # stop signals received and not yet passed on
        self.ranks: dict[int, tuple[psutil.Process, str]] = {}  # ranks we look after: pid -> (process, local rank)
        self.took_over = False
        self.failed: int | None = None  # exit status of the first rank that failed
        self.runner_status: int | None = None
        self.runner_signalled = False
        become_subreaper()
        for sig in STOP_SIGNALS:
            signal.signal(sig, self._on_stop)
        if signal.getsignal(signal.SIGHUP) is not signal.SIG_IGN:  # under nohup, stay immune
            signal.signal(signal.SIGHUP, self._on_hangup)
        self.runner = subprocess.Popen(command, start_new_session=True)

    def _on_stop(self, signum, frame) -> None:
        self.stop = self.stop or signum
        self.unsent += 1

    def _on_hangup(self, signum, frame) -> None:
        """The terminal went away: the whole job ends, as it would without a session of its own."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.runner.pid, signal.SIGHUP)
        signal.signal(signal.SIGHUP, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGHUP)

    def run(self) -> int:
        """Wait until every process of the job has ended; the job's exit status."""
        while True:
            if not self.took_over:
                self._take_over()
            self._pass_on_stop()
            if not self._reap():
                break
            time.sleep(REAP_POLL_S if self.took_over else POLL_S)
        if self.took_over:
            return self.failed or 0
        return self.runner_status

    def _take_over(self) -> None:
        """Once DeepSpeed's launcher has started all its ranks, end it and adopt them."""
        for launcher in psutil.Process().children(recursive=True):
            command = _cmdline(launcher)
            if LAUNCHER_MODULE not in command:
                continue
            expected = local_rank_count(command)
            try:
                launcher.suspend()  # so that it neither reaps nor signals a rank while we look
                ranks = {}
                for child in launcher.children():
                    local = [arg.split("=", 1)[1] for arg in _cmdline(child) if arg.startswith("--local_rank=")]
                    if local:
                        ranks[child.pid] = (child, local[0])
                if len(ranks) < expected:  # still starting them
                    launcher.resume()
                    continue
                launcher.kill()
            except psutil.NoSuchProcess:
                continue
            self.ranks.update(ranks)
            self.took_over = True
            if self.stop:
                self._signal_ranks()

    def _pass_on_stop(self) -> None:
        if not self.unsent:
            return
        self.unsent = 0
        if self.took_over:
            self._signal_ranks()
            print(f"stopping ({signal.Signals(self.stop).name}): the {len(self.ranks)} rank(s) save a checkpoint "
                  f"and exit; to abort without saving: kill -KILL -- -{self.runner.pid}", flush=True)
        elif not self.runner_signalled and self.runner_status is None:
            # The ranks are not running yet (or not on this node): DeepSpeed's runner ends the job.
            self.runner_signalled = True
            self.runner.send_signal(signal.SIGTERM)

    def _signal_ranks(self) -> None:
        """Ask the ranks to save and exit: SIGTERM for SIGINT too, so that a rank still starting up
        ends quietly rather than with a KeyboardInterrupt traceback."""
        for process, _ in self.ranks.values():
            with contextlib.suppress(psutil.NoSuchProcess):
                process.send_signal(signal.SIGTERM)

    def _reap(self) -> bool:
        """Collect the exit of every child that ended; False once no child is left."""
        while True:
            try:
                pid, wait_status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return False
            if pid == 0:
                return True
            status = exit_status(wait_status)
            if pid == self.runner.pid:
                self.runner_status = self.runner.returncode = status
            elif pid in self.ranks:
                _, local_rank = self.ranks.pop(pid)
                if status and self.failed is None:
                    self.failed = status
                    print(f"error: local rank {local_rank} exited with status {status}; stopping the other ranks",
                          file=sys.stderr, flush=True)
                    self._kill_ranks()

    def _kill_ranks(self) -> None:
        """A rank failed: the others cannot finish a step or a checkpoint without it."""
        for process, _ in self.ranks.values():
            with contextlib.suppress(psutil.NoSuchProcess):
                for member in [process, *process.children(recursive=True)]:
                    with contextlib.suppress(psutil.NoSuchProcess):
                        member.kill()


def main(argv: list[str] | None = None) -> int:
    """Assemble the ``deepspeed`` command, then print it (DRY_RUN) or run it to its end."""
    argv = sys.argv[1:] if argv is None else argv
    if not argv:
        print("usage: python -m tinyclip_ds.launch SCRIPT [ARGS...]", file=sys.stderr)
        return 2
    script, *args = argv
    try:
        command = deepspeed_command(script, args, dict(os.environ))
    except LaunchError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if os.environ.get("DRY_RUN", "") not in ("", "0"):
        print(shlex.join(command))
        return 0
    try:
        return Supervisor(command).run()
    except FileNotFoundError:
        print("error: the deepspeed command is not on PATH; activate the environment tinyclip-ds is installed in",
              file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
