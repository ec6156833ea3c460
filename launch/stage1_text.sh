#!/usr/bin/env bash
""":"
# Launcher of stage1_text. Two ways to run it:
#   deepspeed [--num_gpus N | --hostfile H ...] launch/stage1_text.sh [--recipe R] [--set k=v ...]
#   [NUM_GPUS=N NUM_NODES=M HOSTFILE=H MASTER_PORT=P DRY_RUN=1] bash launch/stage1_text.sh [--recipe R] [--set k=v ...]
# Without --recipe it runs the digits demo (recipes/demo/stage1_text.yaml).
# This file is both a bash script and a Python program: bash runs the lines up to 'exec'
# (which starts DeepSpeed's launcher on this very file and returns once the ranks have ended,
# see tinyclip_ds/launch.py); DeepSpeed runs it with Python on every rank, for which
# everything from here to the closing quotes is a string.
exec python3 -m tinyclip_ds.launch "$0" "$@"
":"""
import sys

from tinyclip_ds.cli import exit_process, main

exit_process(main(["train", "--stage", "stage1_text", *sys.argv[1:]]))
