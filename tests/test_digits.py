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

from safetensors.torch import load_file, save_file

from tinyclip_ds.data.digits import (DIGIT_NAMES, GLYPH, IMAGE_SIZE, SINGLE_TEMPLATES, digit_images, digit_pairs,
                                    digit_split, pair_caption, single_captions)
from tinyclip_ds.demo.teacher import demo_tokenizer, teacher_shapes, vocabulary
from tinyclip_ds.config import RecipeError
from tinyclip_ds.models.config import TeacherConfig
from tinyclip_ds.models.teachers import DEMO_TEACHER_PATH, load_teacher, load_word_teacher, save_word_teacher
from tinyclip_ds.models.tokenizer import WordTokenizer
from tinyclip_ds.models.transformer import Clip

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
    tokenizer = demo_tokenizer()
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
    tokenizer = demo_tokenizer()
    demo_words = {w for text in single_captions() + [pair_caption(l, r) for l in range(10) for r in range(10)]
                  for w in re.findall(r"[a-z0-9]+", text.lower())}
    assert demo_words | set(DIGIT_NAMES) | set("0123456789") <= set(tokenizer.vocab)
    assert len(set(tokenizer.vocab)) == tokenizer.vocab_size
    ids = tokenizer(["a zebra on the left"])[0].tolist()
    assert ids[:6] == [tokenizer.start_token_id, tokenizer.ids["a"], tokenizer.unknown_token_id,
                       tokenizer.ids["on"], tokenizer.ids["the"], tokenizer.ids["left"]]
    assert len(single_captions()) == len(SINGLE_TEMPLATES) * 10


def test_tokenizer_truncates_keeping_eot_and_pickles():
    tokenizer = demo_tokenizer(context_length=6)
    ids = tokenizer(["one two three four five six seven"])[0].tolist()
    assert ids == [tokenizer.start_token_id, *[tokenizer.ids[w] for w in ["one", "two", "three", "four"]],
                   tokenizer.eot_token_id]
    texts = single_captions()[:5]
    assert torch.equal(pickle.loads(pickle.dumps(tokenizer))(texts), tokenizer(texts))


def test_word_tokenizer_ids_follow_the_vocabulary_and_refuse_bad_words():
    tokenizer = WordTokenizer(["zebra", "a", "7"], context_length=5)
    assert tokenizer.vocab == ["<pad>", "<start>", "<end>", "<unk>", "zebra", "a", "7"]
    assert tokenizer("A zebra, 7!").tolist() == [[1, 5, 4, 6, 2]]
    assert tokenizer("dog").tolist() == [[1, 3, 2, 0, 0]]  # a lone string is one text
    with pytest.raises(ValueError, match=r"more than once"):
        WordTokenizer(["a", "b", "a"], 8)
    with pytest.raises(ValueError, match=r"lowercase a-z/0-9.*'Zebra'"):
        WordTokenizer(["Zebra"], 8)
    with pytest.raises(ValueError, match="at least 2"):
        WordTokenizer(["a"], 1)


def test_shipped_teacher_zero_shot_on_heldout_singles():
    assert DEMO_TEACHER_PATH.stat().st_size <= 3_000_000
    clip, tokenizer, mean, std = load_word_teacher(DEMO_TEACHER_PATH)
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
    clip, tokenizer, mean, std = load_word_teacher(DEMO_TEACHER_PATH)
    preprocess = transforms.Compose([transforms.ToTensor(), transforms.Normalize(mean, std)])
    pairs = digit_pairs("heldout")
    with torch.no_grad():
        image_emb = F.normalize(clip.visual(torch.stack([preprocess(image) for image, _ in pairs])).embedding, dim=-1)
        text_emb = F.normalize(clip.text(tokenizer([caption for _, caption in pairs])).embedding, dim=-1)
    similarity = image_emb @ text_emb.T
    truth = torch.arange(100)
    assert (similarity.argmax(dim=0) == truth).float().mean() >= 0.8  # text → image R@1
    assert (similarity.argmax(dim=1) == truth).float().mean() >= 0.8  # image → text R@1


def test_shipped_teacher_describes_itself_as_the_demo_code_does():
    """The file's metadata (what loading reads) agrees with the demo's vocabulary and shapes."""
    clip, tokenizer, mean, std = load_word_teacher(DEMO_TEACHER_PATH)
    assert tokenizer.vocab[4:] == vocabulary()
    assert torch.equal(tokenizer(single_captions()), demo_tokenizer()(single_captions()))
    vision, text = teacher_shapes(demo_tokenizer())
    assert (clip.visual.shape, clip.text.shape) == (vision, text)
    assert mean == std == (0.5, 0.5, 0.5)


def test_word_teacher_files_round_trip_and_others_are_refused(tmp_path):
    torch.manual_seed(0)
    clip = Clip(*teacher_shapes(demo_tokenizer())).eval()
    path = tmp_path / "teacher.safetensors"
    save_word_teacher(path, clip, vocabulary(), (0.1, 0.2, 0.3), (0.4, 0.5, 0.6))
    loaded, tokenizer, mean, std = load_word_teacher(path)
    assert (mean, std) == ((0.1, 0.2, 0.3), (0.4, 0.5, 0.6))
    assert tokenizer.vocab == demo_tokenizer().vocab and tokenizer.context_length == 16
    for name, value in clip.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], value.half().float()), name
    with pytest.raises(ValueError, match="cannot read a WordTokenizer of 42 ids"):
        save_word_teacher(path, clip, [*vocabulary(), "zebra"], mean, std)
    bare = tmp_path / "bare.safetensors"
    save_file(load_file(str(path)), str(bare))  # the same tensors without the metadata
    with pytest.raises(ValueError, match=r"no 'word_teacher' metadata.*python -m tinyclip_ds\.demo\.teacher"):
        load_word_teacher(bare)
    with pytest.raises(RecipeError, match=r"teacher\.path: .*bare\.safetensors has no 'word_teacher' metadata"):
        load_teacher(TeacherConfig(source="demo", path=str(bare)))
    assert load_teacher(TeacherConfig(source="demo", path=str(path))).tokenizer.vocab == tokenizer.vocab
    with pytest.raises(FileNotFoundError, match="python -m tinyclip_ds.demo.teacher"):
        load_word_teacher(tmp_path / "absent.safetensors")
