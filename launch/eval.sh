#!/usr/bin/env bash
""":"
# Launcher of 'tinyclip-ds eval' on several ranks (one process per GPU). Two ways to run it:
#   deepspeed [--num_gpus N | --hostfile H ...] launch/eval.sh MODEL --data SPEC [--zeroshot FOLDER ...]
#   [NUM_GPUS=N NUM_NODES=M HOSTFILE=H MASTER_PORT=P DRY_RUN=1] bash launch/eval.sh MODEL --data SPEC ...
# The numbers are the same as on one rank (python -m tinyclip_ds.cli eval ...); only faster.
# This file is both a bash script and a Python program, like the stage launchers: bash runs
# the lines up to 'exec'; DeepSpeed runs it with Python on every rank.
exec python3 -m tinyclip_ds.launch "$0" "$@"
":"""
import sys

from tinyclip_ds.cli import exit_process, main

exit_process(main(["eval", *sys.argv[1:]]))
