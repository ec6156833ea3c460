"""``tinyclip-ds check --no-paths`` loads and validates a recipe without torch, DeepSpeed or the
model code (a check in a fraction of a second, e.g. on a login node); the full check may import
them for DeepSpeed's own config parser. Each command runs in a fresh process that records every
module imported by the time it exits."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import pytest

from tinyclip_ds.config import PROJECT_ROOT

DEMO_STAGE2 = str(PROJECT_ROOT / "recipes" / "demo" / "stage2.yaml")

# The real command (`python -m tinyclip_ds.cli`), with an exit hook that writes sys.modules: the
# command's successful exit runs atexit handlers before os._exit (cli.exit_process).
RECORDER = """
import atexit, json, runpy, sys
out = sys.argv.pop(1)
atexit.register(lambda: open(out, "w").write(json.dumps(sorted(sys.modules))))
runpy.run_module("tinyclip_ds.cli", run_name="__main__", alter_sys=True)
"""


def heavy(modules: list[str]) -> list[str]:
    """The modules a quick check must not import: torch, DeepSpeed and the model code."""
    return [name for name in modules
            if name.split(".")[0] in ("torch", "torchvision", "deepspeed")
            or name.startswith("tinyclip_ds.models.") and name != "tinyclip_ds.models.config"]


@pytest.fixture(scope="module")
def imported(tmp_path_factory) -> dict[str, list[str]]:
    """Every module each check imported: ``quick`` with --no-paths, ``full`` without."""
    folder = tmp_path_factory.mktemp("modules")
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}

    def run(case: str) -> tuple[str, list[str]]:
        out = folder / f"{case}.json"
        args = ["check", DEMO_STAGE2, *(["--no-paths"] if case == "quick" else [])]
        result = subprocess.run([sys.executable, "-c", RECORDER, str(out), *args], cwd=PROJECT_ROOT,
                                capture_output=True, text=True, timeout=300, env=env)
        assert result.returncode == 0 and "recipe OK" in result.stdout, result.stderr[-4000:]
        return case, json.loads(out.read_text())

    with ThreadPoolExecutor(max_workers=2) as pool:
        return dict(pool.map(run, ("quick", "full")))


def test_check_without_paths_imports_no_torch_deepspeed_or_models(imported):
    modules = imported["quick"]
    assert {"tinyclip_ds.recipe", "tinyclip_ds.models.config", "tinyclip_ds.distill.config",
            "tinyclip_ds.train.deepspeed_config"} <= set(modules)
    assert heavy(modules) == []


def test_the_recorder_sees_what_the_full_check_imports(imported):
    """The control: DeepSpeed's config parser in the full check imports torch and DeepSpeed, and
    the same recording finds them."""
    assert {"torch", "deepspeed"} <= set(heavy(imported["full"]))
