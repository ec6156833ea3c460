"""Errors a user can cause end as one line on stderr and a non-zero exit status, never a
traceback: out-of-range values, unknown DeepSpeed keys, broken or mis-encoded recipe files,
unusable run directories, missing files (`check` verifies every path) and run names that
would leave runs/. The traceback is there on request (--debug or TINYCLIP_DS_DEBUG=1)."""

from __future__ import annotations

import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from tinyclip_ds.cli import main
from tinyclip_ds.config import PROJECT_ROOT, RecipeError

DEMO = str(PROJECT_ROOT / "recipes" / "demo" / "stage1_image.yaml")
DEMO_STAGE2 = str(PROJECT_ROOT / "recipes" / "demo" / "stage2.yaml")


def error_lines(stderr: str) -> list[str]:
    """stderr without DeepSpeed's own "[date] [WARNING] ..." log lines."""
    return [line for line in stderr.splitlines() if line.strip() and not line.startswith("[")]


def assert_one_line_error(stderr: str, *expected: str) -> None:
    assert "Traceback" not in stderr, stderr
    lines = error_lines(stderr)
    assert len(lines) == 1 and lines[0].startswith("error: "), stderr
    for text in expected:
        assert text in lines[0], lines[0]


# --------------------------------------------------------------------------- the real command

def bad_files(folder) -> dict[str, str]:
    """The bad files of the command-line cases: a broken YAML file and a file as run_dir."""
    broken = folder / "broken.yaml"
    broken.write_text("base: demo.yaml\ntrain: {steps: 3\nloss:\n  rep_l1: 1\n")
    a_file = folder / "a_file"
    a_file.write_text("not a directory\n")
    return {"broken": str(broken), "file": str(a_file)}


# id -> (arguments of `tinyclip-ds`, texts the one error line must contain). Run in-process:
# `main` is where an error becomes one line and a status, whatever the command.
CHECKS = {
    "lr_nan": (["check", DEMO, "--set", "train.lr=nan"], ["'train.lr'", "nan"]),
    "deepspeed_key": (["check", DEMO, "--set", "deepspeed.zero_optimisation.stage=3"],
                      ["deepspeed.zero_optimisation.stage", "did you mean 'deepspeed.zero_optimization.stage'"]),
    "broken_yaml": (["check", "{broken}"], ["{broken}", "invalid YAML", "line 3"]),
    "run_dir_file": (["check", DEMO, "--set", "run_dir={file}"], ["'run_dir'", "{file}", "is a file"]),
    "missing_teacher": (["check", DEMO, "--set", "teacher.source=openai", "--set",
                         "teacher.path=/nonexistent/ViT-B-32.pt"],
                        ["'teacher.path'", "/nonexistent/ViT-B-32.pt", "does not exist"]),
    "name_escapes_runs": (["check", DEMO, "--set", "name=../../elsewhere"], ["'name'", "../../elsewhere", "run_dir"]),
}


@pytest.mark.parametrize("case", CHECKS)
def test_command_ends_with_one_line_and_a_status(case, tmp_path, capsys):
    files = bad_files(tmp_path)
    args, expected = CHECKS[case]
    assert main([arg.format(**files) for arg in args]) == 2
    assert_one_line_error(capsys.readouterr().err, *(text.format(**files) for text in expected))


# id -> (command after the interpreter, environment, texts the error output must contain): the
# real processes, where a traceback would come from an exception escaping `main`.
COMMANDS = {
    "console_command": (["-m", "tinyclip_ds.cli", "check", DEMO, "--set", "train.lr=nan"], {},
                        ["'train.lr'", "nan"]),
    # A training rank, as DeepSpeed's launcher starts it: the error comes before anything is built.
    "train_run_dir_file": (["launch/stage1_image.sh", "--set", "run_dir={file}"], {},
                           ["'run_dir'", "{file}", "is a file"]),
    # With TINYCLIP_DS_DEBUG=1 the same kind of error shows its traceback.
    "debug": (["-m", "tinyclip_ds.cli", "check", DEMO, "--set", "train.log_every=0"], {"TINYCLIP_DS_DEBUG": "1"},
              ["RecipeError", "train.log_every"]),
}


@pytest.fixture(scope="module")
def command_results(tmp_path_factory):
    """Every case of COMMANDS run as a real process, two at a time (each spends seconds
    importing torch and DeepSpeed)."""
    files = bad_files(tmp_path_factory.mktemp("bad_inputs"))
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
    env.pop("TINYCLIP_DS_DEBUG", None)

    def run(case):
        args, extra_env, expected = COMMANDS[case]
        result = subprocess.run([sys.executable, *(a.format(**files) for a in args)], cwd=PROJECT_ROOT,
                                capture_output=True, text=True, timeout=300, env={**env, **extra_env})
        return case, (result, [text.format(**files) for text in expected])

    with ThreadPoolExecutor(max_workers=2) as pool:
        return dict(pool.map(run, COMMANDS))


@pytest.mark.parametrize("case", ["console_command", "train_run_dir_file"])
def test_process_ends_with_one_line_and_a_status(case, command_results):
    result, expected = command_results[case]
    assert result.returncode == 2, (result.stdout[-2000:], result.stderr[-4000:])
    assert_one_line_error(result.stderr, *expected)


def test_debug_environment_variable_shows_the_traceback(command_results):
    result, expected = command_results["debug"]
    assert result.returncode != 0
    assert "Traceback" in result.stderr and all(text in result.stderr for text in expected), result.stderr


def test_debug_flag_raises_in_process():
    with pytest.raises(RecipeError, match="train.lr"):
        main(["check", DEMO, "--debug", "--set", "train.lr=-1"])
    with pytest.raises(RecipeError, match="train.lr"):
        main(["--debug", "check", DEMO, "--set", "train.lr=-1"])


# --------------------------------------------------------------------------- values (item 8)

BAD_VALUES = [
    ("train.lr=nan", "finite"), ("train.lr=-0.001", ">= 0"), ("train.lr=inf", "finite"),
    ("train.log_every=0", ">= 1"), ("eval.batch_size=0", ">= 1"), ("data.num_workers=-1", ">= 0"),
    ("data.randaugment_magnitude=100", "[0, 30]"), ("data.randaugment_ops=-1", ">= 0"),
    ("train.weight_decay=-0.05", ">= 0"), ("train.beta1=1", "[0, 1)"), ("train.beta2=nan", "finite"),
    ("train.eps=0", "> 0"), ("train.min_lr=nan", "finite"), ("train.max_nonfinite=0", ">= 1"),
    ("eval.every=-1", ">= 0"), ("eval.heatmap_size=0", ">= 1"), ("checkpoint.every=-5", ">= 0"),
    ("checkpoint.keep_last=-1", ">= 0"), ("seed=-1", "[0, "), ("student.image.dropout=1", "[0, 1)"),
    ("student.image.mlp_ratio=0", "> 0"), ("student.image.width=-8", ">= 0"),
    ("loss.rep_l1=nan", "finite"), ("loss.rep_kl_temperature=0", "> 0"),
    ("loss.vit_kd_mask_ratio=1", "[0, 1)"), ("loss.logit_scale_max=inf", "finite"),
    ("loss.filip_chunk=0", ">= 1"),
]


@pytest.mark.parametrize("override,bound", BAD_VALUES, ids=[o for o, _ in BAD_VALUES])
def test_out_of_range_value_is_one_line_error(override, bound, capsys):
    assert main(["check", DEMO, "--no-paths", "--set", override]) == 2
    err = capsys.readouterr().err
    key = override.split("=")[0]
    assert_one_line_error(err, f"'{key}' (--set) must be", bound)


def test_cross_field_ranges(capsys):
    assert main(["check", DEMO, "--no-paths", "--set", "train.lr=1e-4", "--set", "train.min_lr=1e-3"]) == 2
    assert_one_line_error(capsys.readouterr().err, "'train.min_lr'", "'train.lr'")
    assert main(["check", DEMO, "--no-paths", "--set", "loss.logit_scale_init=200"]) == 2
    assert_one_line_error(capsys.readouterr().err, "'loss.logit_scale_init'", "'loss.logit_scale_max'")


def test_bounds_themselves_are_accepted(capsys):
    assert main(["check", DEMO, "--set", "train.lr=0", "--set", "train.log_every=1", "--set", "eval.every=0",
                 "--set", "data.num_workers=0", "--set", "data.randaugment_magnitude=30",
                 "--set", "checkpoint.keep_last=0", "--set", "data.randaugment_ops=0"]) == 0
    assert "recipe OK" in capsys.readouterr().out


# --------------------------------------------------------------------------- files (items 8, 11)

def test_recipe_file_problems_are_one_line_errors(tmp_path, capsys):
    latin1 = tmp_path / "latin1.yaml"
    latin1.write_bytes(f"base: {DEMO}\nname: caf\xe9\n".encode("latin-1"))
    assert main(["check", str(latin1)]) == 2
    assert_one_line_error(capsys.readouterr().err, str(latin1), "not UTF-8", "line 2")

    tabs = tmp_path / "tabs.yaml"
    tabs.write_text(f"base: {DEMO}\ntrain:\n\tsteps: 3\n")
    assert main(["check", str(tabs)]) == 2
    assert_one_line_error(capsys.readouterr().err, str(tabs), "invalid YAML", "line 3")

    child = tmp_path / "child.yaml"
    child.write_text("base: tabs.yaml\n")
    assert main(["check", str(child)]) == 2
    assert_one_line_error(capsys.readouterr().err, str(tabs), f"named as a base in {child}")

    bad_base = tmp_path / "bad_base.yaml"
    bad_base.write_text("base: {a: 1}\n")
    assert main(["check", str(bad_base)]) == 2
    assert_one_line_error(capsys.readouterr().err, str(bad_base), "'base'")

    assert main(["check", str(tmp_path)]) == 2
    assert_one_line_error(capsys.readouterr().err, str(tmp_path), "is a directory")

    assert main(["check", DEMO, "--set", "student.image.layer_map=[1, 2"]) == 2
    assert_one_line_error(capsys.readouterr().err, "student.image.layer_map", "not a valid YAML value")


def test_an_unquoted_brace_pattern_in_a_list_says_how_to_quote_it(tmp_path, capsys):
    """YAML reads {00000..00331} inside [...] as a mapping: the error shows the quoted list, and
    the quoted list is what loads."""
    value = "[/data/a.tsv, /data/cc3m/{00000..00331}.tar, /data/x/{a,b}.tar]"
    quoted = '["/data/a.tsv", "/data/cc3m/{00000..00331}.tar", "/data/x/{a,b}.tar"]'
    assert main(["check", DEMO, "--no-paths", "--set", f"data.pairs={value}"]) == 2
    assert_one_line_error(capsys.readouterr().err, "not a valid YAML value",
                          f"a brace pattern inside [...] needs quotes: --set 'data.pairs={quoted}'")
    assert main(["check", DEMO, "--no-paths", "--set", f"data.pairs={quoted}"]) == 0
    assert "- /data/cc3m/{00000..00331}.tar\n  - /data/x/{a,b}.tar" in capsys.readouterr().out

    recipe = tmp_path / "shards.yaml"
    recipe.write_text(f"base: {DEMO}\ndata:\n  pairs: {value}\n")
    assert main(["check", str(recipe), "--no-paths"]) == 2
    assert_one_line_error(capsys.readouterr().err, str(recipe), "invalid YAML at line 3",
                          f"a brace pattern inside [...] needs quotes: pairs: {quoted}")
    recipe.write_text(f"base: {DEMO}\ndata:\n  pairs: {quoted}\n")
    assert main(["check", str(recipe), "--no-paths"]) == 0

    assert main(["check", DEMO, "--set", "student.image.layer_map=[1, 2"]) == 2
    assert "quotes" not in capsys.readouterr().err  # other YAML problems get no such hint


def test_recipe_with_a_byte_order_mark_loads(tmp_path, capsys):
    bom = tmp_path / "excel.yaml"
    bom.write_bytes(b"\xef\xbb\xbf" + f"base: {DEMO}\nseed: 3\n".encode())
    assert main(["check", str(bom), "--no-paths"]) == 0
    assert "seed: 3" in capsys.readouterr().out


def test_run_dir_that_cannot_hold_a_run(tmp_path, capsys):
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    assert main(["check", DEMO, "--set", f"run_dir={a_file / 'run'}"]) == 2
    assert_one_line_error(capsys.readouterr().err, "'run_dir'", f"inside {a_file}, which is a file")
    assert main(["check", DEMO, "--set", f"run_dir={tmp_path / 'new' / 'run'}"]) == 0
    assert not (tmp_path / "new").exists()  # check creates nothing


def test_run_dir_that_is_not_writable(tmp_path, capsys):
    # Permissions do not stop root; a process's /proc folder stops everyone (tests run as root in CI).
    if os.geteuid() == 0:
        locked = Path(f"/proc/{os.getpid()}")
    else:
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o555)
    assert main(["check", DEMO, "--set", f"run_dir={locked / 'run'}"]) == 2
    assert_one_line_error(capsys.readouterr().err, "'run_dir'", "not writable")


@pytest.mark.parametrize("name", ["../escape", "a/../../escape", "/abs/escape", "..", "."])
def test_run_name_cannot_leave_runs(name, capsys):
    assert main(["check", DEMO, "--no-paths", "--set", f"name={name}"]) == 2
    assert_one_line_error(capsys.readouterr().err, "'name'", "run_dir")


def test_run_name_may_hold_subfolders_and_run_dir_may_be_anywhere(tmp_path, capsys):
    assert main(["check", DEMO, "--set", "name=sweep/w384"]) == 0
    assert "runs/sweep/w384" in capsys.readouterr().out
    assert main(["check", DEMO, "--set", "name=../x", "--set", f"run_dir={tmp_path}/../elsewhere"]) == 2
    capsys.readouterr()
    assert main(["check", DEMO, "--set", f"run_dir={tmp_path}/../elsewhere"]) == 0


# --------------------------------------------------------------------------- paths (item 15)

def hf_directory(root, tokenizer: bool = True):
    """A Hugging Face model directory's file layout (check only looks at which files exist)."""
    root.mkdir()
    for name in ("config.json", "model.safetensors", *(["vocab.json", "merges.txt"] if tokenizer else [])):
        (root / name).write_text("{}")
    return root


def test_check_verifies_every_path(tmp_path, capsys):
    nope = tmp_path / "nope"
    eval_csv = tmp_path / "val.csv"
    eval_csv.write_text("filepath,title\ngone.png,a photo of a seven\n")
    cases = [
        (DEMO, ["teacher.source=openai", f"teacher.path={nope}.pt"], ["'teacher.path'", f"{nope}.pt"]),
        (DEMO, ["teacher.source=hf", f"teacher.path={nope}"], ["'teacher.path'", str(nope)]),
        (DEMO, ["teacher.source=hf", f"teacher.path={hf_directory(tmp_path / 'hf', tokenizer=False)}"],
         ["'teacher.path'", "tokenizer"]),
        (DEMO, ["teacher.source=open_clip", "teacher.model=ViT-B-32", f"teacher.path={nope}.bin"],
         ["'teacher.path'", f"{nope}.bin"]),
        (DEMO, ["teacher.source=open_clip", f"teacher.model={nope}.json", "teacher.path=x.bin"],
         ["'teacher.model'", f"{nope}.json"]),
        (DEMO, [f"data.images=[demo:digits, {nope}]"], ["'data.images[1]'", str(nope)]),
        (DEMO, [f"eval.data={nope}.csv"], ["'eval.data'", f"{nope}.csv"]),
        (DEMO, [f"eval.data={eval_csv}"], ["'eval.data'", str(tmp_path / "gone.png")]),
        (DEMO, [f"eval.zeroshot={nope}"], ["'eval.zeroshot'", str(nope)]),
        (DEMO, ["eval.zeroshot=demo:digits", f"eval.templates={nope}.txt"], ["'eval.templates'", f"{nope}.txt"]),
        (DEMO_STAGE2, [f"data.pairs=[{nope}.tsv]"], ["'data.pairs", f"{nope}.tsv"]),
        (DEMO_STAGE2, [f"student.image.init_from={nope}", "student.image.init_from_missing=error"],
         ["'student.image.init_from'", str(nope)]),
    ]
    for recipe, overrides, expected in cases:
        args = [a for o in overrides for a in ("--set", o)]
        assert main(["check", recipe, *args]) == 2, overrides
        assert_one_line_error(capsys.readouterr().err, *expected)
        assert main(["check", recipe, *args, "--no-paths"]) == 0, overrides
        assert "paths: not checked" in capsys.readouterr().out


def test_check_accepts_present_files(tmp_path, capsys):
    hf = hf_directory(tmp_path / "hf")
    assert main(["check", DEMO, "--set", "teacher.source=hf", "--set", f"teacher.path={hf}"]) == 0
    missing_but_allowed = ["--set", f"student.image.init_from={tmp_path / 'not_yet'}",
                           "--set", "student.image.init_from_missing=init"]
    assert main(["check", DEMO_STAGE2, *missing_but_allowed]) == 0
    assert "paths: teacher, data" in capsys.readouterr().out


def test_templates_file_in_another_encoding_is_named_with_its_line(tmp_path):
    from tinyclip_ds.eval.evaluator import resolve_templates

    templates = tmp_path / "templates.txt"
    templates.write_bytes("a photo of a {}.\nune photo d'un {} trouvé.\n".encode("latin-1"))
    with pytest.raises(RecipeError, match=r"'eval.templates': .*templates.txt line 2 is not UTF-8"):
        resolve_templates(str(templates), None)
