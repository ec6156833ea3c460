"""Does each part of the method earn its place? The digits demo's quality table.

Trains, for every seed, the variants below with the demo launchers' recipes (recipes/demo/) at the
demo's steps, each as its own process (``python launch/<stage>.sh --set run_dir=... --set seed=S``),
and reads each run's held-out evaluation (the last line of its metrics.jsonl): zero-shot accuracy
on held-out single digits and R@1 both ways on 100 held-out digit pairs.

  teacher                      the shipped demo teacher (its figures from the same evaluations)
  stage 1 + stage 2            the full method: the three demo launchers in order, stage 2 starting
                               from this seed's two stage-1 students
  stage 2 only                 stage 2 from weight inheritance of the teacher (no stage 1)
  contrastive alone            no teacher: random init, loss.affinity=0, loss.fd=0 (README baseline)
  ... without affinity         stage 2 with loss.affinity=0 (from the stage-1 students by default)
  ... + FILIP distillation     stage 2 with loss.filip_distill > 0 added (same init)

Mean ± sample standard deviation over the seeds; wall time is each variant's processes end to
end (start-up and the final evaluation included; stage 1's runs counted where it is used).
Finished runs are reused when the script is run again with the same settings (``--fresh`` redoes
them); a run that did not finish is started over.

    python bench/quality_digits.py                      # 3 seeds, the demo's steps
    python bench/quality_digits.py --quick              # smoke run: 1 seed, 2 % of the steps
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

METRICS = (("zero-shot top-1", "zeroshot_top1"), ("image→text R@1", "i2t_R@1"), ("text→image R@1", "t2i_R@1"))
STAGE1 = ("stage1_image", "stage1_text")
NO_INIT_FROM = ["student.image.init_from=", "student.text.init_from="]
# Idle-machine wall times of the demo runs at full steps (README, 2-core CPU) and the part of
# each that does not scale with the steps (start-up, teacher, final evaluation): for the estimate.
DEMO_SECONDS = {"stage1_image": 63.0, "stage1_text": 23.0, "stage2": 50.0}
FIXED_SECONDS = 10.0


@dataclass
class Variant:
    """One row of the table: a stage-2 run's settings and whether it starts from stage 1."""

    key: str
    label: str
    sets: list[str] = field(default_factory=list)
    from_stage1: bool = False


def variants(args: argparse.Namespace) -> list[Variant]:
    """The table's student rows, in order."""
    ablation_init = [] if args.ablate_from == "stage1" else NO_INIT_FROM
    base = "stage 1 + stage 2" if args.ablate_from == "stage1" else "stage 2 only"
    return [
        Variant("full", "student: stage 1 + stage 2 (the full method)", from_stage1=True),
        Variant("stage2_only", "student: stage 2 only (inherited init)", NO_INIT_FROM),
        Variant("contrastive", "student: `contrastive` alone (no teacher, random init)",
                [*NO_INIT_FROM, "student.image.init=random", "student.text.init=random",
                 "loss.affinity=0", "loss.fd=0"]),
        Variant("no_affinity", f"student: {base}, without affinity", [*ablation_init, "loss.affinity=0"],
                from_stage1=args.ablate_from == "stage1"),
        Variant("filip", f"student: {base} + FILIP distillation ({args.filip_weight:g})",
                [*ablation_init, f"loss.filip_distill={args.filip_weight:g}"],
                from_stage1=args.ablate_from == "stage1"),
    ]


def demo_train(stage: str):
    """The demo recipe's ``train`` settings for ``stage``."""
    from tinyclip_ds.recipe import load_recipe

    return load_recipe(None, stage=stage).train


def schedule_sets(stage: str, scale: float) -> list[str]:
    """Steps (scaled), warm-up and logging for ``stage``; evaluation only at the last step."""
    train = demo_train(stage)
    steps = max(2, round(train.steps * scale))
    warmup = min(steps - 1, max(1, round(train.warmup_steps * scale)))
    return [f"train.steps={steps}", f"train.warmup_steps={warmup}", f"train.log_every={min(train.log_every, steps)}",
            "eval.every=0", "checkpoint.every=0"]


def run_stage(work: Path, name: str, stage: str, seed: int, sets: list[str], scale: float, fresh: bool) -> dict:
    """Train one run in its own process (or reuse a finished one); its last metrics and wall time."""
    run_dir = work / f"seed{seed}" / name
    done_file = run_dir / "quality_digits.json"
    all_sets = [f"run_dir={run_dir}", f"seed={seed}", *schedule_sets(stage, scale), *sets]
    if done_file.exists() and not fresh:
        done = json.loads(done_file.read_text())
        if done["sets"] == all_sets:
            print(f"  seed {seed} {name}: reused ({done['wall_s']:.0f} s)", flush=True)
            return done
    shutil.rmtree(run_dir, ignore_errors=True)  # unfinished or other settings: the trainer would refuse it
    run_dir.mkdir(parents=True)
    command = [sys.executable, f"launch/{stage}.sh", *[x for s in all_sets for x in ("--set", s)]]
    log = run_dir.parent / f"{name}.log"
    start = time.monotonic()
    with open(log, "w") as out:
        code = subprocess.call(command, stdout=out, stderr=subprocess.STDOUT)
    wall = time.monotonic() - start
    if code != 0:
        sys.stderr.write(log.read_text()[-3000:])
        raise SystemExit(f"error: {' '.join(command)} exited with {code} (log: {log})")
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    done = {"sets": all_sets, "wall_s": wall, "metrics": json.loads(lines[-1])}
    done_file.write_text(json.dumps(done, indent=1) + "\n")
    print(f"  seed {seed} {name}: {wall:.0f} s, zero-shot {done['metrics']['student/zeroshot_top1']:.3f}, "
          f"t2i R@1 {done['metrics']['student/t2i_R@1']:.2f}", flush=True)
    return done


def parameter_counts() -> tuple[int, int]:
    """(teacher, student) parameters over both towers of the demo stage-2 recipe."""
    from tinyclip_ds.models.students import build_students
    from tinyclip_ds.models.teachers import load_teacher
    from tinyclip_ds.recipe import load_recipe

    recipe = load_recipe(None, NO_INIT_FROM, stage="stage2")
    students = build_students(recipe.student, load_teacher(recipe.teacher).clip, recipe.towers, recipe.seed)
    teacher = sum(p.numel() for s in students.values() for p in s.teacher.parameters())
    student = sum(p.numel() for s in students.values() for p in s.tower.parameters())
    return teacher, student


def spread(values: list[float], digits: int) -> str:
    """``mean ± std`` (sample std over seeds; just the value for one seed)."""
    mean = statistics.fmean(values)
    if len(values) < 2:
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def estimate_seconds(args: argparse.Namespace, rows: list[Variant]) -> float:
    """Idle-machine estimate of the whole table (see DEMO_SECONDS)."""
    scaled = {stage: FIXED_SECONDS + (s - FIXED_SECONDS) * args.steps_scale for stage, s in DEMO_SECONDS.items()}
    per_seed = scaled["stage1_image"] + scaled["stage1_text"] + len(rows) * scaled["stage2"]
    return per_seed * len(args.seeds)


def main() -> None:
    """Run every variant for every seed and print the markdown table."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=None, help="default 0 1 2 (--quick: 0)")
    parser.add_argument("--steps-scale", type=float, default=None,
                        help="multiply every run's steps (and warm-up) by this; default 1 (--quick: 0.02)")
    parser.add_argument("--quick", action="store_true", help="smoke run: 1 seed, 2 %% of the steps")
    parser.add_argument("--work", default="runs/quality_digits", help="where the runs go")
    parser.add_argument("--filip-weight", type=float, default=1.0, help="loss.filip_distill of the FILIP row")
    parser.add_argument("--ablate-from", choices=("stage1", "inherit"), default="stage1",
                        help="init of the no-affinity and FILIP rows: the stage-1 students or inheritance")
    parser.add_argument("--fresh", action="store_true", help="retrain runs even when finished ones exist")
    args = parser.parse_args()
    args.seeds = args.seeds if args.seeds is not None else ([0] if args.quick else [0, 1, 2])
    args.steps_scale = args.steps_scale if args.steps_scale is not None else (0.02 if args.quick else 1.0)
    if args.steps_scale <= 0:
        parser.error("--steps-scale must be > 0")
    work = Path(args.work)
    rows = variants(args)
    print(f"{len(args.seeds)} seed(s) × ({len(STAGE1)} stage-1 + {len(rows)} stage-2 runs), steps × "
          f"{args.steps_scale:g}; estimate on an idle 2-core CPU: {estimate_seconds(args, rows) / 60:.0f} min",
          flush=True)
    start = time.monotonic()
    results: dict[str, list[dict]] = {row.key: [] for row in rows}
    stage1: dict[int, dict[str, dict]] = {}
    for seed in args.seeds:
        stage1[seed] = {stage: run_stage(work, stage, stage, seed, [], args.steps_scale, args.fresh)
                        for stage in STAGE1}
        for row in rows:
            sets = list(row.sets)
            if row.from_stage1:
                sets += [f"student.image.init_from={work / f'seed{seed}' / 'stage1_image'}",
                         f"student.text.init_from={work / f'seed{seed}' / 'stage1_text'}",
                         "student.image.init_from_missing=error", "student.text.init_from_missing=error"]
            done = run_stage(work, row.key, "stage2", seed, sets, args.steps_scale, args.fresh)
            if row.from_stage1:
                done = {**done, "wall_s": done["wall_s"] + sum(r["wall_s"] for r in stage1[seed].values())}
            results[row.key].append(done)
    teacher_params, student_params = parameter_counts()
    steps = {stage: int(schedule_sets(stage, args.steps_scale)[0].split("=")[1]) for stage in (*STAGE1, "stage2")}
    table = [f"| model | {' | '.join(name for name, _ in METRICS)} | parameters | steps | wall time (s) |",
             "|---|" + "---|" * (len(METRICS) + 3)]
    first = results[rows[0].key]
    table.append("| teacher (shipped) | " + " | ".join(spread([r["metrics"][f"teacher/{m}"] for r in first], 3)
                                                    for _, m in METRICS) + f" | {teacher_params / 1e6:.2f}M | — | — |")
    for row in rows:
        runs = results[row.key]
        step_text = (f"{steps['stage1_image']} + {steps['stage1_text']} + {steps['stage2']}" if row.from_stage1
                     else str(steps["stage2"]))
        table.append(f"| {row.label} | " + " | ".join(spread([r["metrics"][f"student/{m}"] for r in runs], 3)
                                                   for _, m in METRICS)
                     + f" | {student_params / 1e6:.2f}M | {step_text} | {spread([r['wall_s'] for r in runs], 0)} |")
    text = "\n".join(table)
    seeds = " ".join(map(str, args.seeds))
    print(f"\nDigits demo, held-out data, seeds {seeds} (mean ± std), steps × {args.steps_scale:g}; "
          f"{(time.monotonic() - start) / 60:.1f} min in all\n")
    print(text)
    (work / "results.md").write_text(text + "\n")
    (work / "results.json").write_text(json.dumps({"seeds": args.seeds, "steps_scale": args.steps_scale,
                                                   "results": results}, indent=1) + "\n")


if __name__ == "__main__":
    main()
