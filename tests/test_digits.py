"""The digits demo: a leak-free split, a clean held-out pair set, the tokenizer, the shipped teacher."""

from __future__ import annotations

import pickle
import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from torchvision import transforms

from tinyclip_ds.data.digits import (DIGIT_NAMES, GLYPH, IMAGE_SIZE, SINGLE_TEMPLATES, TEACHER_PATH,
                                     DigitsTokenizer, digit_images, digit_pairs, digit_split,
                                     load_digits_teacher, pair_caption, single_captions)

TOP = (IMAGE_SIZE - GLYPH) // 2


def single_glyph(image) -> bytes:
    """The centred glyph of a single-digit image, as bytes."""
    return np.asarray(image)[TOP:TOP + GLYPH, TOP:TOP + GLYPH].tobytes()


def pair_glyphs(image) -> tuple[bytes, bytes]:
    """The left and right glyphs of a pair image, as bytes."""
    pixels = np.asarray(image)[TOP:TOP + GLYPH]
    return pixels[:, :GLYPH].tobytes(), pixels[:, IMAGE_SIZE - GLYPH:].tobytes()


@pytest.fixture(scope="module")
def glyph_labels() -> dict[str, dict[bytes, int]]:
    return {split: {single_glyph(image): label for image, label in digit_images(split)}
            for split in ("train", "heldout")}


def test_split_is_fixed_disjoint_complete_and_stratified():
    train, heldout = digit_split()
    again_train, again_heldout = digit_split()
    np.testing.assert_array_equal(train, again_train)
    np.testing.assert_array_equal(heldout, again_heldout)
    assert not set(train) & set(heldout)
    labels = load_digits().target
    assert sorted([*train, *heldout]) == list(range(len(labels)))
    fractions = np.bincount(labels[heldout], minlength=10) / np.bincount(labels, minlength=10)
    assert np.all(np.abs(fractions - 0.2) < 0.02)


def test_singles_are_the_split_digits_rendered():
    data = load_digits()
    for split, indices in zip(("train", "heldout"), digit_split()):
        singles = digit_images(split)
        assert [label for _, label in singles] == data.target[indices].tolist()
        assert all(image.mode == "RGB" and image.size == (IMAGE_SIZE, IMAGE_SIZE) for image, _ in singles)
        pixels = np.stack([np.asarray(image) for image, _ in singles]).astype(float)
        assert np.array_equal(pixels[..., 0], pixels[..., 2])  # grey
        # outside the centred glyph the canvas is black; inside, 2×2 block means follow the 8×8 source
        outside = np.ones((IMAGE_SIZE, IMAGE_SIZE), dtype=bool)
        outside[TOP:TOP + GLYPH, TOP:TOP + GLYPH] = False
        assert pixels[:, outside].max() == 0
        blocks = pixels[:, TOP:TOP + GLYPH, TOP:TOP + GLYPH, 0].reshape(-1, 8, 2, 8, 2).mean(axis=(2, 4))
        for block, source in zip(blocks, data.images[indices]):
            assert np.corrcoef(block.ravel(), source.ravel())[0, 1] > 0.9


def test_no_heldout_digit_reaches_training(glyph_labels):
    heldout = set(glyph_labels["heldout"])
    train = set(glyph_labels["train"])
    assert len(heldout) == 360 and len(train) == 1437  # every rendered digit is distinct
    assert not heldout & train
    train_pairs = digit_pairs("train")
    assert len(train_pairs) == 10_000
    for image, caption in train_pairs:
        left, right = pair_glyphs(image)
        assert left in train and right in train  # not in heldout, which is disjoint from train
        assert caption == pair_caption(glyph_labels["train"][left], glyph_labels["train"][right])


def test_heldout_pairs_are_a_clean_retrieval_set(glyph_labels):
    pairs = digit_pairs("heldout")
    assert len(pairs) == 100
    captions = [caption for _, caption in pairs]
    assert len(set(captions)) == 100
    assert set(captions) == {f"a {l} on the left and a {r} on the right" for l in range(10) for r in range(10)}
    for image, caption in pairs:
        assert image.size == (IMAGE_SIZE, IMAGE_SIZE)
        left, right = pair_glyphs(image)
        assert caption == pair_caption(glyph_labels["heldout"][left], glyph_labels["heldout"][right])
    assert [c for _, c in digit_pairs("heldout")] == captions  # deterministic


def test_tokenizer_round_trips_known_words():
    tokenizer = DigitsTokenizer()
    texts = ["A photo of the number SEVEN!", pair_caption(3, 7)]
    expected_words = [["a", "photo", "of", "the", "number", "seven"],
                      ["a", "3", "on", "the", "left", "and", "a", "7", "on", "the", "right"]]
    ids = tokenizer(texts)
    assert ids.shape == (2, 16) and ids.dtype == torch.long
    for row, words in zip(ids.tolist(), expected_words):
        assert row[0] == tokenizer.start_token_id
        assert [tokenizer.vocab[i] for i in row[1:1 + len(words)]] == words
        assert row[1 + len(words)] == tokenizer.eot_token_id
        assert row[2 + len(words):] == [0] * (16 - 2 - len(words))
        assert row.count(tokenizer.eot_token_id) == 1


def test_tokenizer_vocabulary_covers_the_demo_and_maps_the_rest_to_unknown():
    tokenizer = DigitsTokenizer()
    demo_words = {w for text in single_captions() + [pair_caption(l, r) for l in range(10) for r in range(10)]
                  for w in re.findall(r"[a-z0-9]+", text.lower())}
    assert demo_words | set(DIGIT_NAMES) | set("0123456789") <= set(tokenizer.vocab)
    assert len(set(tokenizer.vocab)) == tokenizer.vocab_size
    ids = tokenizer(["a zebra on the left"])[0].tolist()
    assert ids[:6] == [tokenizer.start_token_id, tokenizer.ids["a"], tokenizer.unknown_token_id,
                       tokenizer.ids["on"], tokenizer.ids["the"], tokenizer.ids["left"]]
    assert len(single_captions()) == len(SINGLE_TEMPLATES) * 10


def test_tokenizer_truncates_keeping_eot_and_pickles():
    tokenizer = DigitsTokenizer(context_length=6)
    ids = tokenizer(["one two three four five six seven"])[0].tolist()
    assert ids == [tokenizer.start_token_id, *[tokenizer.ids[w] for w in ["one", "two", "three", "four"]],
                   tokenizer.eot_token_id]
    texts = single_captions()[:5]
    assert torch.equal(pickle.loads(pickle.dumps(tokenizer))(texts), tokenizer(texts))


def test_shipped_teacher_zero_shot_on_heldout_singles():
    assert TEACHER_PATH.stat().st_size <= 3_000_000
    clip, tokenizer, mean, std = load_digits_teacher()
    assert clip.text.shape.eot_token_id == tokenizer.eot_token_id
    assert all(p.dtype == torch.float32 for p in clip.parameters())
    preprocess = transforms.Compose([transforms.ToTensor(), transforms.Normalize(mean, std)])
    singles = digit_images("heldout")
    images = torch.stack([preprocess(image) for image, _ in singles])
    labels = torch.tensor([label for _, label in singles])
    with torch.no_grad():
        image_emb = F.normalize(clip.visual(images).embedding, dim=-1)
        prompts = tokenizer([t.format(name) for name in DIGIT_NAMES for t in SINGLE_TEMPLATES])
        text_emb = F.normalize(clip.text(prompts).embedding, dim=-1).view(10, len(SINGLE_TEMPLATES), -1)
        classes = F.normalize(text_emb.mean(dim=1), dim=-1)
        accuracy = ((image_emb @ classes.T).argmax(dim=1) == labels).float().mean().item()
    assert accuracy >= 0.90, f"held-out zero-shot accuracy {accuracy:.3f}"


def test_shipped_teacher_retrieves_heldout_pairs():
    clip, tokenizer, mean, std = load_digits_teacher()
    preprocess = transforms.Compose([transforms.ToTensor(), transforms.Normalize(mean, std)])
    pairs = digit_pairs("heldout")
    with torch.no_grad():
        image_emb = F.normalize(clip.visual(torch.stack([preprocess(image) for image, _ in pairs])).embedding, dim=-1)
        text_emb = F.normalize(clip.text(tokenizer([caption for _, caption in pairs])).embedding, dim=-1)
    similarity = image_emb @ text_emb.T
    truth = torch.arange(100)
    assert (similarity.argmax(dim=0) == truth).float().mean() >= 0.8  # text → image R@1
    assert (similarity.argmax(dim=1) == truth).float().mean() >= 0.8  # image → text R@1
