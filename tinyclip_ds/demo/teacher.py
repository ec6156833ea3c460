"""The digits demo teacher: its tower shapes, its word vocabulary, and the script that retrains it.

    python -m tinyclip_ds.demo.teacher [--out PATH]

writes ``teacher.safetensors`` next to this file (`DEMO_TEACHER_PATH`), with its shapes and
vocabulary in the file's metadata so that `tinyclip_ds.models.teachers` loads it without this
package. A small `Clip` trained contrastively on the *train* split of `tinyclip_ds.data.digits` only:
single digits with template captions and digit pairs with pair captions, mixed in every batch,
with light geometric augmentation (never a flip: left and right matter). Everything is seeded
and the data order is fixed, so a rerun on the same machine reproduces the file. Prints the loss
per epoch and the held-out zero-shot accuracy and pair retrieval; about 6 minutes on 2 idle CPU cores.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

from tinyclip_ds.data.digits import (DIGIT_NAMES, IMAGE_SIZE, SINGLE_TEMPLATES, digit_images, digit_pairs,
                                    pair_caption, single_captions)
from tinyclip_ds.eval.metrics import class_embeddings, retrieval_metrics, zeroshot_accuracy
from tinyclip_ds.models.teachers import DEMO_TEACHER_PATH, save_word_teacher
from tinyclip_ds.models.tokenizer import WordTokenizer, split_words
from tinyclip_ds.models.transformer import Clip, TowerShape
from tinyclip_ds.progress import progress

IMAGE_MEAN = (0.5, 0.5, 0.5)
IMAGE_STD = (0.5, 0.5, 0.5)
CONTEXT_LENGTH = 16
SEED = 0
EPOCHS = 12
BATCH = 256
SINGLE_REPEATS = 4  # each training single appears this often per epoch, each time with a random template
LR = 3e-4
WEIGHT_DECAY = 0.05
WARMUP_STEPS = 100
MAX_LOGIT_SCALE = math.log(100.0)
MAX_ROTATION_DEG = 8.0
MAX_SHIFT_PX = 2.0


def vocabulary() -> list[str]:
    """The teacher's words, sorted: those of the templates, digit names, numerals and pair captions."""
    words = {word for text in single_captions() + [pair_caption(0, 0)] for word in split_words(text)}
    return sorted(words | {str(digit) for digit in range(10)})


def demo_tokenizer(context_length: int = CONTEXT_LENGTH) -> WordTokenizer:
    """The teacher's tokenizer: a `WordTokenizer` over `vocabulary`."""
    return WordTokenizer(vocabulary(), context_length)


def teacher_shapes(tokenizer: WordTokenizer) -> tuple[TowerShape, TowerShape]:
    """Image and text tower shapes: ~1.1M parameters (≈2.3 MB in fp16)."""
    vision = TowerShape(width=96, layers=6, heads=4, mlp_width=384, output_dim=64,
                        image_size=IMAGE_SIZE, patch_size=8)
    text = TowerShape(width=96, layers=4, heads=4, mlp_width=384, output_dim=64,
                      vocab_size=tokenizer.vocab_size, context_length=tokenizer.context_length,
                      eot_token_id=tokenizer.eot_token_id)
    return vision, text


def gray_pixels(images: list[Image.Image]) -> Tensor:
    """RGB PIL images with equal channels → ``(N, 1, H, W)`` floats in [0, 1] (as ToTensor)."""
    return torch.from_numpy(np.stack([np.asarray(image)[:, :, 0] for image in images])
                            ).unsqueeze(1).float() / 255


def normalize(gray: Tensor) -> Tensor:
    """``(N, 1, H, W)`` in [0, 1] → ``(N, 3, H, W)`` normalised with IMAGE_MEAN / IMAGE_STD."""
    mean = torch.tensor(IMAGE_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGE_STD).view(1, 3, 1, 1)
    return (gray.expand(-1, 3, -1, -1) - mean) / std


def augment(gray: Tensor, generator: torch.Generator) -> Tensor:
    """Small random rotation and translation of ``(N, 1, H, W)`` images (black fill, no flips)."""
    n, size = gray.shape[0], gray.shape[-1]
    angle = (torch.rand(n, generator=generator) * 2 - 1) * math.radians(MAX_ROTATION_DEG)
    shift = (torch.rand(n, 2, generator=generator) * 2 - 1) * MAX_SHIFT_PX * 2 / size
    cos, sin = angle.cos(), angle.sin()
    theta = torch.stack([torch.stack([cos, -sin, shift[:, 0]], 1),
                         torch.stack([sin, cos, shift[:, 1]], 1)], 1)
    grid = F.affine_grid(theta, list(gray.shape), align_corners=False)
    return F.grid_sample(gray, grid, padding_mode="zeros", align_corners=False)


def multi_positive_clip_loss(image: Tensor, text: Tensor, keys: Tensor, logit_scale: Tensor) -> Tensor:
    """Symmetric InfoNCE where every pair with the same caption content is a positive.

    ``image``, ``text``: ``(B, E)`` normalised; ``keys``: ``(B,)`` content ids (digit class for
    singles, left/right classes for pairs). With ``L = s · image @ textᵀ`` and targets
    ``P_ij = [k_i = k_j] / #{j : k_j = k_i}``:
    ``loss = ½ (CE(L, P) + CE(Lᵀ, P))``, ``CE(L, P) = −mean_i Σ_j P_ij log softmax_j(L_ij)``.
    Plain one-hot targets would push apart same-digit images and same-digit templates, which a
    batch of 10 classes is full of.
    """
    logits = logit_scale.exp() * image @ text.T
    same = (keys[:, None] == keys[None, :]).float()
    targets = same / same.sum(dim=1, keepdim=True)
    image_to_text = -(targets * logits.log_softmax(dim=1)).sum(dim=1).mean()
    text_to_image = -(targets * logits.T.log_softmax(dim=1)).sum(dim=1).mean()
    return (image_to_text + text_to_image) / 2


@torch.no_grad()
def zero_shot_accuracy(clip: Clip, tokenizer: WordTokenizer, images: Tensor, labels: Tensor) -> float:
    """Held-out zero-shot accuracy with the template ensemble (the project's own metric)."""
    classes = class_embeddings(clip.encode_text, tokenizer, DIGIT_NAMES, SINGLE_TEMPLATES, batch_size=256)
    return zeroshot_accuracy(clip.encode_image(images), labels, classes)["zeroshot_top1"]


@torch.no_grad()
def pair_retrieval(clip: Clip, tokenizer: WordTokenizer, images: Tensor, captions: list[str]) -> tuple[float, float]:
    """(text→image R@1, image→text R@1) of a set with one caption per image."""
    metrics = retrieval_metrics(clip.encode_image(images), clip.encode_text(tokenizer(captions)),
                                torch.arange(len(captions)))
    return metrics["t2i_R@1"], metrics["i2t_R@1"]


def train(out: Path) -> None:
    """Train the teacher on the train split, report held-out numbers and save it to ``out``."""
    torch.manual_seed(SEED)
    torch.set_num_threads(2)
    generator = torch.Generator().manual_seed(SEED)
    tokenizer = demo_tokenizer()

    singles = digit_images("train")
    pairs = digit_pairs("train")
    single_pixels = gray_pixels([image for image, _ in singles])
    single_labels = torch.tensor([label for _, label in singles])
    pair_pixels = gray_pixels([image for image, _ in pairs])
    pair_ids = tokenizer([caption for _, caption in pairs])
    # content ids: 0-9 for singles (their class), 10 + 10·left + right for pairs
    pair_key = {pair_caption(left, right): 10 + 10 * left + right for left in range(10) for right in range(10)}
    pair_keys = torch.tensor([pair_key[caption] for _, caption in pairs])
    template_ids = tokenizer([t.format(n) for n in DIGIT_NAMES for t in SINGLE_TEMPLATES]
                             ).view(len(DIGIT_NAMES), len(SINGLE_TEMPLATES), -1)

    heldout_singles = digit_images("heldout")
    heldout_pairs = digit_pairs("heldout")
    heldout_single_images = normalize(gray_pixels([image for image, _ in heldout_singles]))
    heldout_labels = torch.tensor([label for _, label in heldout_singles])
    heldout_pair_images = normalize(gray_pixels([image for image, _ in heldout_pairs]))
    heldout_captions = [caption for _, caption in heldout_pairs]

    vision, text = teacher_shapes(tokenizer)
    clip = Clip(vision, text)
    decay = [p for p in clip.parameters() if p.ndim >= 2]
    no_decay = [p for p in clip.parameters() if p.ndim < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": WEIGHT_DECAY},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=LR)
    # samples 0..len(pairs)-1 are pairs, the rest index singles (repeated)
    per_epoch = len(pairs) + SINGLE_REPEATS * len(singles)
    steps_per_epoch = per_epoch // BATCH
    total_steps = EPOCHS * steps_per_epoch
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(
        (step + 1) / WARMUP_STEPS, 0.5 * (1 + math.cos(math.pi * step / total_steps))))

    start = time.time()
    bar = progress(total=total_steps, desc="teacher", unit="step", leave=True)
    for epoch in range(EPOCHS):
        clip.train()
        order = torch.randperm(per_epoch, generator=generator)
        losses = []
        for step in range(steps_per_epoch):
            batch = order[step * BATCH:(step + 1) * BATCH]
            is_pair = batch < len(pairs)
            pair_index = batch[is_pair]
            single_index = (batch[~is_pair] - len(pairs)) % len(singles)
            labels = single_labels[single_index]
            templates = torch.randint(len(SINGLE_TEMPLATES), (len(single_index),), generator=generator)
            gray = torch.cat([pair_pixels[pair_index], single_pixels[single_index]])
            ids = torch.cat([pair_ids[pair_index], template_ids[labels, templates]])
            keys = torch.cat([pair_keys[pair_index], labels])

            images = normalize(augment(gray, generator))
            loss = multi_positive_clip_loss(clip.encode_image(images, normalize=True),
                                            clip.encode_text(ids, normalize=True), keys, clip.logit_scale)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
            with torch.no_grad():
                clip.logit_scale.clamp_(0, MAX_LOGIT_SCALE)
            losses.append(loss.item())
            bar.update()
        clip.eval()
        accuracy = zero_shot_accuracy(clip, tokenizer, heldout_single_images, heldout_labels)
        bar.write(f"epoch {epoch + 1}/{EPOCHS}  loss {np.mean(losses):.4f}  "  # above the bar, if any
                  f"logit scale {clip.logit_scale.exp().item():.1f}  held-out zero-shot {accuracy:.4f}  "
                  f"({time.time() - start:.0f} s)", file=sys.stdout)
        sys.stdout.flush()
    bar.close()

    accuracy = zero_shot_accuracy(clip, tokenizer, heldout_single_images, heldout_labels)
    text_to_image, image_to_text = pair_retrieval(clip, tokenizer, heldout_pair_images, heldout_captions)
    print(f"held-out zero-shot accuracy ({len(heldout_labels)} singles, {len(SINGLE_TEMPLATES)}-template "
          f"ensemble): {accuracy:.4f}")
    print(f"held-out pair retrieval ({len(heldout_captions)} pairs): text→image R@1 {text_to_image:.2f}  "
          f"image→text R@1 {image_to_text:.2f}")

    save_word_teacher(out, clip, vocabulary(), IMAGE_MEAN, IMAGE_STD)
    print(f"wrote {out} ({out.stat().st_size / 1e6:.2f} MB)")


def main(argv: list[str] | None = None) -> None:
    """Command line: ``python -m tinyclip_ds.demo.teacher [--out PATH]``."""
    parser = argparse.ArgumentParser(description="Retrain the digits demo teacher.")
    parser.add_argument("--out", type=Path, default=DEMO_TEACHER_PATH,
                        help=f"where to write the weights (default: {DEMO_TEACHER_PATH})")
    train(parser.parse_args(argv).out)


if __name__ == "__main__":
    main()
