"""The ``tinyclip-ds`` command."""

from __future__ import annotations

import argparse
import os
import sys
import textwrap

from tinyclip_ds.config import RecipeError, describe
from tinyclip_ds.recipe import STAGES, Recipe, check_paths, check_run_dir, load_recipe


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
    ds = build_ds_config(recipe.ds_config, recipe.deepspeed, recipe.train, world,
                         check_accelerator=not args.skip_accelerator_check)
    if not args.no_paths:
        check_run_dir(recipe)
        check_paths(recipe)
    print(recipe.to_yaml(), end="")
    print(f"# world size {world}: micro batch {ds['train_micro_batch_size_per_gpu']} × "
          f"accumulation {ds['gradient_accumulation_steps']} × world {world} = "
          f"global batch {ds['train_batch_size']}")
    print(f"# DeepSpeed config: {recipe.ds_config} (ZeRO-{ds.get('zero_optimization', {}).get('stage', 0)})")
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

    path = checkpoint.find_checkpoint(args.checkpoint)
    if path is None:
        raise RecipeError(f"{args.checkpoint}: neither a complete checkpoint nor a run directory with one")
    print(f"universal checkpoint: {checkpoint.convert_to_universal(path, workers=args.workers)}")
    return 0


def cmd_export_weights(args: argparse.Namespace) -> int:
    """Write a run's student towers as plain fp32 safetensors (keys image.* / text.*, the
    recipe in the metadata), consolidated from the checkpoint's ZeRO shards."""
    from tinyclip_ds.export import export_weights

    print(f"student weights: {export_weights(args.run, args.checkpoint, args.out)}")
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
                            "directory exist (e.g. on a login node without the data)")
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
    train.add_argument("--stage", choices=STAGES, required=True)
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

    export = sub.add_parser("export-weights", parents=[debug], help=cmd_export_weights.__doc__,
                            description=cmd_export_weights.__doc__)
    export.add_argument("run", help="run directory")
    export.add_argument("--checkpoint", default="auto", metavar="TAG|PATH",
                        help="which checkpoint: a tag (step_00000100), a path, or auto = the newest complete one")
    export.add_argument("--out", default=None, help="output file (default: RUN/student_<tag>.safetensors)")
    export.set_defaults(func=cmd_export_weights)
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


if __name__ == "__main__":
    sys.exit(main())
