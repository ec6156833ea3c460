"""The shell side of the stage launchers: assemble (or print) the ``deepspeed`` command.

``bash launch/stage1_image.sh ARGS`` runs ``python3 -m tinyclip_ds.launch
launch/stage1_image.sh ARGS``, which starts DeepSpeed's launcher on the same file; DeepSpeed then
runs that file with Python on every rank (see the file's Python half). Scale comes from the
environment, like torchtitan's launchers:

    NUM_GPUS     GPUs per node (default: all that DeepSpeed finds)
    NUM_NODES    nodes to use from the hostfile
    HOSTFILE     DeepSpeed hostfile ("hostname slots=N" per line) for multi-node runs
    MASTER_ADDR  address of the rank-0 node
    MASTER_PORT  rendezvous port (default: DeepSpeed's 29500)
    DRY_RUN=1    print the command instead of running it
"""

from __future__ import annotations

import os
import shlex
import sys
from pathlib import Path


class LaunchError(ValueError):
    pass


def _positive_int(env: dict, name: str) -> str | None:
    value = env.get(name, "").strip()
    if not value:
        return None
    if not value.isdigit() or int(value) < 1:
        raise LaunchError(f"{name}={value!r} must be a positive integer")
    return value


def deepspeed_command(script: str, args: list[str], env: dict) -> list[str]:
    """The ``deepspeed`` command line for ``script`` under the scale given in ``env``."""
    command = ["deepspeed"]
    hostfile = env.get("HOSTFILE", "").strip()
    if hostfile:
        if not Path(hostfile).is_file():
            raise LaunchError(f"HOSTFILE={hostfile} does not exist; it lists one 'hostname slots=N' per line")
        command += ["--hostfile", hostfile]
    num_nodes = _positive_int(env, "NUM_NODES")
    if num_nodes:
        if int(num_nodes) > 1 and not hostfile:
            raise LaunchError(f"NUM_NODES={num_nodes} needs a HOSTFILE listing the nodes")
        command += ["--num_nodes", num_nodes]
    num_gpus = _positive_int(env, "NUM_GPUS")
    if num_gpus:
        command += ["--num_gpus", num_gpus]
    if env.get("MASTER_ADDR", "").strip():
        command += ["--master_addr", env["MASTER_ADDR"].strip()]
    master_port = _positive_int(env, "MASTER_PORT")
    if master_port:
        command += ["--master_port", master_port]
    return command + [script, *args]


def main(argv: list[str] | None = None) -> int:
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
    os.execvp(command[0], command)


if __name__ == "__main__":
    sys.exit(main())
