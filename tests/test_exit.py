"""`cli.exit_process`, how the launchers end a rank: after success it skips the interpreter's
teardown but still does what a normal exit guarantees; a failure exits the normal way."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

from tinyclip_ds.config import PROJECT_ROOT

SCRIPT = textwrap.dedent('''
    import atexit, sys, threading, time
    from pathlib import Path
    from tinyclip_ds.cli import exit_process

    out = Path(sys.argv[1])
    atexit.register(lambda: (out / "atexit").write_text("ran"))

    def late_writer():
        time.sleep(0.5)  # still running when exit_process is called
        (out / "thread").write_text("ran")

    threading.Thread(target=late_writer).start()
    sys.stdout.write("buffered, not flushed")  # a pipe: block-buffered
    exit_process(int(sys.argv[2]))
''')


def run(tmp_path, code: int) -> subprocess.CompletedProcess:
    """Run SCRIPT ending with exit_process(code)."""
    script = tmp_path / "script.py"
    script.write_text(SCRIPT)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}  # so stdout is buffered
    return subprocess.run([sys.executable, str(script), str(tmp_path), str(code)], cwd=PROJECT_ROOT,
                          capture_output=True, text=True, timeout=120, env=env)


def test_a_successful_exit_joins_threads_runs_atexit_and_flushes(tmp_path):
    result = run(tmp_path, 0)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout == "buffered, not flushed"
    assert (tmp_path / "atexit").read_text() == "ran"
    assert (tmp_path / "thread").read_text() == "ran"


def test_a_failure_keeps_its_status_and_the_normal_exit(tmp_path):
    result = run(tmp_path, 3)
    assert result.returncode == 3, result.stderr[-3000:]
    assert result.stdout == "buffered, not flushed"
    assert (tmp_path / "atexit").read_text() == "ran"
