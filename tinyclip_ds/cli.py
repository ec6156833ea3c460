"""The ``tinyclip-ds`` command."""

from __future__ import annotations

import argparse
import atexit
import os
import sys
import textwrap
import threading
from typing import NoReturn

from tinyclip_ds.config import RecipeError, describe
from tinyclip_ds.recipe import Recipe, check_paths, check_run_dir, load_recipe
from tinyclip_ds.stages import STAGES


def positive_int(text: str, name: str = "the value") -> int:
    """``text`` as an integer >= 1 (command-line and environment numbers)."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise RecipeError(f"{name} must be a positive integer, got {text!r}")
    return value


def _positive_arg(text: str) -> int:
    """`positive_int` as an argparse type (its errors become argparse's usage errors)."""
    try:
        return positive_int(text)
    except RecipeError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def _add_recipe_args(parser: argparse.ArgumentParser, required: bool = True) -> None:
    if required:
        parser.add_argument("recipe", help="recipe YAML file")
    else:
        parser.add_argument("--recipe", default=None, help="recipe YAML file (default: the stage's demo)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a recipe field, e.g. --set train.lr=3e-4 (repeatable); "
                             "deepspeed.* keys override the DeepSpeed config")


def cmd_check(args: argparse.Namespace) -> int:
    """Validate a recipe and its DeepSpeed config, and check that every path it names exists
    and is readable (unless --no-paths); print the resolved tree and batch sizes."""
    from tinyclip_ds.train.deepspeed_config import build_ds_config

    recipe = load_recipe(args.recipe, args.overrides)
    world = args.world_size or positive_int(os.environ.get("WORLD_SIZE", "1"), "$WORLD_SIZE")
    # --no-paths is the quick check: DeepSpeed's own checks import DeepSpeed and torch (seconds).
    ds = build_ds_config(recipe.ds_config, recipe.deepspeed, recipe.train, world, check_deepspeed=not args.no_paths,
                         check_accelerator=not args.skip_accelerator_check)
    if not args.no_paths:
        check_run_dir(recipe)
        check_paths(recipe)
    print(recipe.to_yaml(), end="")
    print(f"# world size {world}: micro batch {ds['train_micro_batch_size_per_gpu']} × "
          f"accumulation {ds['gradient_accumulation_steps']} × world {world} = "
          f"global batch {ds['train_batch_size']}")
    print(f"# DeepSpeed config: {recipe.ds_config} (ZeRO-{ds.get('zero_optimization', {}).get('stage', 0)})"
          + ("; keys and values not checked by DeepSpeed (--no-paths)" if args.no_paths else ""))
    print("# paths: not checked (--no-paths)" if args.no_paths else
          "# paths: teacher, data, evaluation sets and init_from exist and are readable")
    print(f"# recipe OK: {recipe.name} ({recipe.stage}), run directory {recipe.output_dir.absolute()}")
    return 0


def cmd_recipe(args: argparse.Namespace) -> int:
    """Print every recipe field with its type, default and description."""
    rows = [r for r in describe(Recipe) if r[0].startswith(args.prefix or "")]
    width = max(len(r[0]) for r in rows)
    for key, type_name, default, help_text in rows:
        print(f"{key:<{width}}  {type_name} = {default}")
        for line in textwrap.wrap(help_text, 88 - 4):
            print(f"    {line}")
    return 0


def cmd_summary(args: argparse.Namespace) -> int:
    """Build the recipe's teacher and students and print their sizes and layer maps."""
    from tinyclip_ds.summary import summarize

    recipe = load_recipe(args.recipe, args.overrides)
    print(summarize(recipe))
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    """One training rank (what the stage launchers run on every rank)."""
    recipe = load_recipe(args.recipe, args.overrides, stage=args.stage)
    check_run_dir(recipe)
    from tinyclip_ds.train.loop import train  # heavy imports only once the recipe is valid

    return train(recipe, resume=args.resume)


def cmd_convert_ckpt(args: argparse.Namespace) -> int:
    """Convert a ZeRO checkpoint to DeepSpeed's universal format (what --resume does by itself
    when the number of ranks changes); the result is cached in CHECKPOINT/universal."""
    from tinyclip_ds.train import checkpoint
    from tinyclip_ds.train.universal import convert_to_universal

    path = checkpoint.find_checkpoint(args.checkpoint)
    if path is None:
        raise RecipeError(f"{args.checkpoint}: neither a complete checkpoint nor a run directory with one")
    print(f"universal checkpoint: {convert_to_universal(path, workers=args.workers)}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    """Export a run's (or checkpoint's) student for other libraries: open_clip (a local-dir
    model directory), hf (a transformers CLIPModel + CLIPProcessor directory) or tinyclip (plain
    fp32 safetensors for this library); weight sharing is unrolled for open_clip and hf."""
    from tinyclip_ds.export import export

    print(f"{args.format} export: {export(args.model, args.format, args.out, args.checkpoint)}")
    return 0


def cmd_export_weights(args: argparse.Namespace) -> int:
    """Alias of 'export RUN --format tinyclip': a run's student towers as plain fp32
    safetensors (keys image.* / text.*, the recipe in the metadata)."""
    from tinyclip_ds.export import export

    out = args.out or os.path.join(args.run, "")  # a directory: export names the file student_<tag>.safetensors
    print(f"student weights: {export(args.run, 'tinyclip', out, args.checkpoint)}")
    return 0


def cmd_speed(args: argparse.Namespace) -> int:
    """Teacher vs student, per tower and whole model: parameters, GFLOPs per sample (PyTorch's
    FlopCounterMode), latency at batch 1 and throughput at --batch-size; a table and JSON (--out)."""
    import json

    from tinyclip_ds.speed import Settings, format_report, speed_report

    settings = Settings(device=args.device, precision=args.precision, threads=args.threads,
                        batch_size=args.batch_size, warmup=args.warmup, repeats=args.repeats)
    report = speed_report(args.source, settings, args.overrides, args.teacher_shape)
    print(format_report(report))
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(report, f, indent=2)
        print(f"# JSON: {args.out}")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    """Retrieval R@1/5/10 and zero-shot top-1/top-5 of a student (and its teacher) on the given
    sets: a table on the terminal and a JSON report; distributed when started by deepspeed."""
    from tinyclip_ds.evaluate import run_eval

    return run_eval(args)


def cmd_prepare(args: argparse.Namespace) -> int:
    """Turn a source (image folder, .csv/.tsv, COCO captions .json, caption .txt) into webdataset
    shards in img2dataset layout, images resized and centre-cropped to --size, in parallel; prints
    what was skipped and why, and the brace pattern to put in a recipe."""
    from tinyclip_ds.prepare import prepare

    try:
        report = prepare(args.source, args.out, size=args.size, kind=args.kind, shard_size=args.shard_size,
                         workers=args.workers, quality=args.quality, image_root=args.image_root,
                         csv_image_key=args.csv_image_key, csv_caption_key=args.csv_caption_key,
                         overwrite=args.overwrite)
    except ValueError as err:  # a bad value met while reading: an input error like a RecipeError
        raise RecipeError(str(err)) from err
    print(report.recipe_line)
    return 0


DEBUG_HELP = "show the traceback of an error (same as TINYCLIP_DS_DEBUG=1)"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tinyclip-ds", description=__doc__)
    parser.add_argument("--debug", action="store_true", default=False, help=DEBUG_HELP)
    # Also accepted after the command (the stage launchers put their arguments there).
    debug = argparse.ArgumentParser(add_help=False)
    debug.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=DEBUG_HELP)
    sub = parser.add_subparsers(dest="command", required=True)

    check = sub.add_parser("check", parents=[debug], help=cmd_check.__doc__,
                           description=cmd_check.__doc__)
    _add_recipe_args(check)
    check.add_argument("--world-size", type=_positive_arg, default=0,
                       help="world size to compute batch fields for (default: $WORLD_SIZE or 1)")
    check.add_argument("--skip-accelerator-check", action="store_true",
                       help="do not refuse precisions this machine's accelerator cannot run "
                            "(to check a GPU recipe on a CPU machine)")
    check.add_argument("--no-paths", action="store_true",
                       help="do not check that the teacher, data, evaluation sets, init_from and run "
                            "directory exist, nor let DeepSpeed check its config: a check in a second, "
                            "without the files and without importing torch (e.g. on a login node)")
    check.set_defaults(func=cmd_check)

    recipe = sub.add_parser("recipe", parents=[debug], help=cmd_recipe.__doc__,
                            description=cmd_recipe.__doc__)
    recipe.add_argument("prefix", nargs="?", help="only fields whose dotted key starts with this")
    recipe.set_defaults(func=cmd_recipe)

    summary = sub.add_parser("summary", parents=[debug], help=cmd_summary.__doc__,
                             description=cmd_summary.__doc__)
    _add_recipe_args(summary)
    summary.set_defaults(func=cmd_summary)

    train = sub.add_parser("train", parents=[debug], help=cmd_train.__doc__,
                           description=cmd_train.__doc__)
    train.add_argument("--stage", choices=list(STAGES), required=True)
    _add_recipe_args(train, required=False)
    train.add_argument("--resume", default=None, metavar="auto|PATH|TAG",
                       help="continue from a checkpoint: auto = the newest complete one of the run")
    train.add_argument("--local_rank", "--local-rank", type=int, default=None,
                       help="set by DeepSpeed's launcher; the rank is read from the environment")
    train.set_defaults(func=cmd_train)

    convert = sub.add_parser("convert-ckpt", parents=[debug], help=cmd_convert_ckpt.__doc__,
                             description=cmd_convert_ckpt.__doc__)
    convert.add_argument("checkpoint",
                         help="a checkpoint directory, or a run directory (its newest complete checkpoint)")
    convert.add_argument("--workers", type=_positive_arg, default=4, help="parallel conversion processes")
    convert.set_defaults(func=cmd_convert_ckpt)

    export = sub.add_parser("export", parents=[debug], help=cmd_export.__doc__, description=cmd_export.__doc__)
    export.add_argument("model", metavar="RUN_OR_CHECKPOINT",
                        help="a run directory (its newest complete checkpoint) or a checkpoint directory")
    export.add_argument("--format", required=True, choices=("open_clip", "hf", "tinyclip"))
    export.add_argument("--out", required=True, metavar="DIR",
                        help="output directory (tinyclip: a .safetensors file, or a directory that gets "
                             "student_<tag>.safetensors)")
    export.add_argument("--checkpoint", default="auto", metavar="TAG|PATH",
                        help="which checkpoint of a run: a tag (step_00000100), a path, or auto = the newest complete one")
    export.set_defaults(func=cmd_export)

    export = sub.add_parser("export-weights", parents=[debug], help=cmd_export_weights.__doc__,
                            description=cmd_export_weights.__doc__)
    export.add_argument("run", help="run directory")
    export.add_argument("--checkpoint", default="auto", metavar="TAG|PATH",
                        help="which checkpoint: a tag (step_00000100), a path, or auto = the newest complete one")
    export.add_argument("--out", default=None, help="output file (default: RUN/student_<tag>.safetensors)")
    export.set_defaults(func=cmd_export_weights)

    speed = sub.add_parser("speed", parents=[debug], help=cmd_speed.__doc__, description=cmd_speed.__doc__)
    speed.add_argument("source", metavar="RUN_OR_RECIPE",
                       help="a recipe file, a run directory (its recipe.yaml) or a checkpoint directory "
                            "(its recipe and student weights)")
    speed.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                       help="override a recipe field, e.g. --set student.image.layers=6 (repeatable)")
    speed.add_argument("--teacher-shape", default=None, metavar="MODEL",
                       help="time a teacher of this open_clip architecture with random weights (a model "
                            "name such as ViT-B-32, ViT-B-16, ViT-B-32-quickgelu, or a model-config JSON) "
                            "instead of loading the recipe's teacher weights")
    speed.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    speed.add_argument("--precision", choices=("fp32", "bf16", "fp16"), default="fp32",
                       help="dtype of every tower and input")
    speed.add_argument("--threads", type=_positive_arg, default=0,
                       help="CPU threads (torch.set_num_threads; default: PyTorch's)")
    speed.add_argument("--batch-size", type=_positive_arg, default=32, help="batch size of the throughput")
    speed.add_argument("--warmup", type=int, default=3, help="untimed forwards before each measurement")
    speed.add_argument("--repeats", type=_positive_arg, default=10, help="timed forwards per measurement")
    speed.add_argument("--out", default=None, help="also write the report as JSON to this file")
    speed.set_defaults(func=cmd_speed)

    evaluate = sub.add_parser("eval", parents=[debug], help=cmd_eval.__doc__, description=cmd_eval.__doc__)
    evaluate.add_argument("model", help="a run or checkpoint directory, a tinyclip .safetensors file, or an "
                                        "exported open_clip or transformers directory")
    evaluate.add_argument("--checkpoint", default="auto", metavar="TAG|PATH",
                          help="for a run directory: a tag (step_00000100), a path, or auto = the newest complete one")
    evaluate.add_argument("--data", default="", metavar="SPEC",
                          help="retrieval set: COCO captions .json, .csv/.tsv, a Karpathy split file "
                               "(dataset_coco.json / dataset_flickr30k.json) or demo:digit_pairs")
    evaluate.add_argument("--image-root", default="", help="folder the --data image paths are relative to "
                                                           "(default: as eval.image_root, the file's own folder)")
    evaluate.add_argument("--split", default=None, help="Karpathy split files: which split (default: test); "
                          "Hugging Face datasets of several splits: which split (default: the only one)")
    evaluate.add_argument("--csv-image-key", default="filepath", help="--data .csv/.tsv: image path column")
    evaluate.add_argument("--csv-caption-key", default="title", help="--data .csv/.tsv: caption column")
    evaluate.add_argument("--zeroshot", default="", metavar="FOLDER",
                          help="zero-shot set: a folder with one sub-folder per class (ImageNet layout) or demo:digits")
    evaluate.add_argument("--classnames", default=None, metavar="FILE",
                          help="class names, one a line in sorted-folder order (default: classnames.txt in the "
                               "folder, open_clip's ImageNet names for 1000 classes, else the folder names)")
    evaluate.add_argument("--templates", default=None, metavar="FILE",
                          help="prompt templates with one {} each, one a line (default: the set's own, open_clip's "
                               "80 OpenAI ImageNet templates for 1000 classes, else a generic CLIP set)")
    evaluate.add_argument("--batch-size", type=int, default=64, help="per rank (results do not depend on it)")
    evaluate.add_argument("--no-teacher", action="store_true", help="do not evaluate the run's teacher alongside")
    evaluate.add_argument("--out", default=None, metavar="FILE",
                          help="JSON report (default: eval_<name>.json beside MODEL, else in the current folder)")
    evaluate.add_argument("--plots", default=None, metavar="DIR", help="write retrieval_<model>.png grids here")
    evaluate.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"),
                          help="without a launcher: where to run (auto = cuda if available)")
    evaluate.add_argument("--local_rank", "--local-rank", type=int, default=None,
                          help="set by DeepSpeed's launcher; the rank is read from the environment")
    evaluate.set_defaults(func=cmd_eval)

    from tinyclip_ds.prepare import KINDS, cli_default_workers

    prep = sub.add_parser("prepare", parents=[debug], help=cmd_prepare.__doc__, description=cmd_prepare.__doc__)
    prep.add_argument("source", metavar="SOURCE",
                      help="an image folder, a .csv/.tsv (image path + caption columns), a COCO captions "
                           ".json or a caption .txt")
    prep.add_argument("--out", required=True, metavar="DIR", help="output folder for 00000.tar, ... and stats.json")
    prep.add_argument("--size", type=_positive_arg, default=224,
                      help="image side: short side resized to it, then centre-cropped to size x size")
    prep.add_argument("--kind", choices=KINDS, default=None,
                      help="what a sample holds (default: pairs for .csv/.tsv/.json, captions for .txt, "
                           "images for a folder)")
    prep.add_argument("--shard-size", type=_positive_arg, default=10_000,
                      help="source samples per shard (shards are the unit of parallel work)")
    prep.add_argument("--workers", type=_positive_arg, default=cli_default_workers(),
                      help="parallel processes (default: min(8, CPU count)); the output does not depend on it")
    prep.add_argument("--quality", type=int, default=95, help="JPEG quality, 1-100")
    prep.add_argument("--image-root", default="", metavar="R",
                      help="folder relative image paths of a .csv/.tsv/.json are resolved against (default: the "
                           "file's folder, or <root>/<split>/ for <root>/annotations/captions_<split>.json)")
    prep.add_argument("--csv-image-key", default="filepath", help="column of a .csv/.tsv holding the image path")
    prep.add_argument("--csv-caption-key", default="title", help="column of a .csv/.tsv holding the caption")
    prep.add_argument("--overwrite", action="store_true",
                      help="write into a non-empty --out, replacing the shards and stats.json found there")
    prep.set_defaults(func=cmd_prepare)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run a command; an error the user can fix ends as one line on stderr and exit status 2
    (recipe and input errors) or 1 (files and the system), without a traceback unless --debug."""
    args = build_parser().parse_args(argv)
    debug = args.debug or os.environ.get("TINYCLIP_DS_DEBUG", "") not in ("", "0")
    try:
        return args.func(args)
    except RecipeError as err:
        if debug:
            raise
        print(f"error: {err}", file=sys.stderr)
        return 2
    except OSError as err:
        if debug:
            raise
        print(f"error: {err} (--debug or TINYCLIP_DS_DEBUG=1 shows the traceback)", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        if debug:
            raise
        print("interrupted", file=sys.stderr)
        return 130


def exit_process(code: int) -> NoReturn:
    """End the process with ``code``; after success, without the interpreter's teardown.

    Tearing down torch, DeepSpeed and their C++ libraries after the work is done costs 1–2 s of
    a 2-core CPU (freeing every module and tensor, static destructors), about the time a small
    run needs for its last steps. A command that returned 0 has closed what it opened (the
    Trainer stops its loader workers, closes its TensorBoard writer, and every checkpoint and
    log file is written and closed before ``done:``), so what a normal exit still guarantees is
    done here: non-daemon threads joined, atexit handlers run (multiprocessing's joins its
    children), stdio flushed — then ``os._exit``. A failure exits the normal way."""
    if code != 0:
        sys.exit(code)
    for thread in threading.enumerate():
        if thread is not threading.main_thread() and not thread.daemon:
            thread.join()
    atexit._run_exitfuncs()  # what Python runs at exit; no public name for it
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # closed or a broken pipe: nothing left to save
            pass
    os._exit(0)


if __name__ == "__main__":
    exit_process(main())
