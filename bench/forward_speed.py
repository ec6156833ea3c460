"""Forward speed of our towers against open_clip's own, same weights, fp32 on the CPU.

For each tower: the median time of open_clip's ``encode_image`` / ``encode_text``, of our tower
with nothing requested, and of our tower with every intermediate requested (all layers:
hidden states, attention scores and probabilities, q/k/v, embeddings, projected tokens).
Target: ours / open_clip ≤ 1.10 with nothing requested. The last column is our tower as training
runs it: text cut after the batch's longest caption (``--caption`` sets every row's text).

    python bench/forward_speed.py --batch 8 --threads 2 --repeats 10
    python bench/forward_speed.py --config /tmp/vs/configs/bench-teacher.json --batch 64
        # any open_clip model-config JSON instead (here bench/vs_open_clip.py's teacher), with
        # --caption "a red stripe number 1000 on a plain background" (one of its longest captions)
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import open_clip
import torch

from tinyclip_ds.models.teachers import load_open_clip
from tinyclip_ds.models.transformer import Request

MODELS = {"ViT-B-32-quickgelu": ("image", "text"), "ViT-B-16-quickgelu": ("image",)}


def median_seconds(functions: dict[str, Callable[[], object]], warmup: int,
                   repeats: int) -> dict[str, float]:
    """Median wall time per function; calls are interleaved so load drift hits all alike."""
    for _ in range(warmup):
        for function in functions.values():
            function()
    times: dict[str, list[float]] = {name: [] for name in functions}
    for _ in range(repeats):
        for name, function in functions.items():
            start = time.perf_counter()
            function()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--caption", default="a photo of a cat", help="the text of every row of a text batch")
    parser.add_argument("--config", action="append", default=[],
                        help="an open_clip model-config JSON to time (both towers) instead of the ViT-Bs")
    args = parser.parse_args()
    models = MODELS
    if args.config:
        for config in args.config:
            open_clip.add_model_config(config)
        models = {Path(config).stem: ("image", "text") for config in args.config}
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, open_clip {open_clip.__version__}, fp32 CPU, "
          f"{args.threads} threads, batch {args.batch}, median of {args.repeats} after "
          f"{args.warmup} warm-up")
    header = (f"{'model':<20} {'tower':<6} {'open_clip ms':>12} {'ours ms':>9} "
              f"{'ours+all ms':>12} {'ratio':>6} {'ratio+all':>9} {'as trained ms':>13}")
    print(header)
    print("-" * len(header))
    with tempfile.TemporaryDirectory() as tmp:
        for name, towers in models.items():
            library = open_clip.create_model(name).eval()
            weights = Path(tmp) / f"{name}.pt"
            torch.save(library.state_dict(), weights)
            clip = load_open_clip(name, weights).eval()
            for tower in towers:
                ours = clip.visual if tower == "image" else clip.text
                if tower == "image":
                    size = clip.visual.shape.image_size
                    inputs = torch.randn(args.batch, 3, size, size)
                    reference = library.encode_image
                else:
                    inputs = open_clip.tokenize([args.caption] * args.batch, clip.text.shape.context_length)
                    reference = library.encode_text
                everything = Request(layers=tuple(range(ours.transformer.depth)), hidden=True,
                                     attention=True, qkv=True, embeddings=True, tokens=True)
                with torch.inference_mode():
                    times = median_seconds({
                        "open_clip": lambda: reference(inputs),
                        "ours": lambda: ours(inputs),
                        "all": lambda: ours(inputs, everything),
                        # training's text: cut after the longest caption (TextTower.trim_padding)
                        "trained": lambda: ours(ours.trim_padding(inputs) if tower == "text" else inputs),
                    }, args.warmup, args.repeats)
                ms = {key: 1e3 * value for key, value in times.items()}
                print(f"{name:<20} {tower:<6} {ms['open_clip']:>12.1f} {ms['ours']:>9.1f} "
                      f"{ms['all']:>12.1f} {ms['ours'] / ms['open_clip']:>6.2f} "
                      f"{ms['all'] / ms['open_clip']:>9.2f} {ms['trained']:>13.1f}")


if __name__ == "__main__":
    main()
