"""``tinyclip-ds eval``: recalls on a hand-checked similarity matrix, Karpathy split files, zero-shot
class names, and the same numbers on 1 and 2 ranks and at batch sizes 7 and 64."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image

from conftest import launch
from tinyclip_ds.cli import main
from tinyclip_ds.config import RecipeError
from tinyclip_ds.eval.metrics import retrieval_metrics
from tinyclip_ds.evaluate import karpathy_pairs, retrieval_set, zeroshot_set

# Cosines of 3 images (rows) with 6 captions (columns); captions 0-1 describe image 0, 2-4 image 1,
# 5 image 2 (several captions per image, as in COCO and Flickr).
SIMILARITY = [[0.10, 0.50, 0.30, 0.20, 0.00, 0.40],
              [0.40, 0.10, 0.00, 0.30, 0.20, 0.45],
              [0.30, 0.20, 0.10, 0.00, 0.40, 0.35]]
TEXT_TO_IMAGE = [0, 0, 1, 1, 1, 2]


def embeddings_with_cosines(similarity: list[list[float]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Unit image and text embeddings whose cosines are exactly ``similarity``: images are the
    first basis vectors; each text is its column plus one extra coordinate that makes it unit."""
    s = torch.tensor(similarity, dtype=torch.float64)
    n_images = s.shape[0]
    images = torch.eye(n_images, n_images + 1)
    texts = torch.cat([s.T, (1 - s.T.square().sum(dim=1, keepdim=True)).sqrt()], dim=1).float()
    return images, texts


def test_recalls_match_the_hand_count_with_several_captions_per_image():
    images, texts = embeddings_with_cosines(SIMILARITY)
    got = retrieval_metrics(images, texts, torch.tensor(TEXT_TO_IMAGE))
    # Image → text: an image's best caption among all 6. Image 0: caption 1 is first (0.50).
    # Image 1: its best caption 3 (0.30) comes after 5 (0.45) and 0 (0.40): rank 3. Image 2:
    # caption 5 (0.35) after 4 (0.40): rank 2.
    assert got["i2t_R@1"] == pytest.approx(1 / 3)
    assert got["i2t_R@5"] == got["i2t_R@10"] == 1.0
    # Text → image: its own image among 3. Captions 1 and 3 rank theirs first; 0 (0.10 < 0.40,
    # 0.30), 2 (0.00 < 0.30, 0.10), 4 (0.20 < 0.40) and 5 (0.35 < 0.40, 0.45) do not.
    assert got["t2i_R@1"] == pytest.approx(2 / 6)
    assert got["t2i_R@5"] == 1.0
    assert got["mean_score"] == pytest.approx((0.10 + 0.50 + 0.00 + 0.30 + 0.20 + 0.35) / 6, abs=1e-6)


def test_recalls_match_a_direct_computation():
    """Against ranks counted directly from the cosine matrix: a text's match is its own image, an
    image's matches are all of its captions (any one among the top K is a hit)."""
    generator = torch.Generator().manual_seed(0)
    per_image = [1, 5, 2, 3, 1, 4, 5, 2, 1, 3, 2, 5]
    text_to_image = torch.tensor([i for i, n in enumerate(per_image) for _ in range(n)])
    images = torch.randn(len(per_image), 8, generator=generator)
    texts = images[text_to_image] + 1.5 * torch.randn(len(text_to_image), 8, generator=generator)
    got = retrieval_metrics(images, texts, text_to_image)
    unit = torch.nn.functional.normalize
    cos = unit(images.double(), dim=1) @ unit(texts.double(), dim=1).T
    for k in (1, 5, 10):
        top_texts = [set(cos[i].argsort(descending=True)[:k].tolist()) for i in range(len(per_image))]
        i2t = [any(int(text_to_image[t]) == i for t in top) for i, top in enumerate(top_texts)]
        t2i = [int(text_to_image[t]) in cos[:, t].argsort(descending=True)[:k].tolist()
               for t in range(len(text_to_image))]
        assert got[f"i2t_R@{k}"] == sum(i2t) / len(i2t)
        assert got[f"t2i_R@{k}"] == sum(t2i) / len(t2i)
    assert 0 < got["t2i_R@1"] < got["t2i_R@5"] < 1  # the case is not trivial


def _png(path, shade: int = 0):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8), (shade, shade, shade)).save(path)


def test_karpathy_split_file(tmp_path):
    data = {"dataset": "coco", "images": [
        {"split": "train", "filepath": "train2014", "filename": "a.jpg", "sentences": [{"raw": "train one"}]},
        {"split": "test", "filepath": "val2014", "filename": "b.png",
         "sentences": [{"raw": " a dog. "}, {"raw": "a brown dog"}, {"raw": "dog on grass"}]},
        {"split": "val", "filepath": "val2014", "filename": "c.png", "sentences": [{"raw": "val one"}]},
        {"split": "test", "filepath": "val2014", "filename": "d.png", "sentences": [{"raw": "a cat"}, {"raw": "cat"}]},
    ]}
    path = tmp_path / "dataset_coco.json"
    path.write_text(json.dumps(data))
    images, captions, text_to_image = karpathy_pairs(path, "test", str(tmp_path / "coco"))
    assert images.entries == [tmp_path / "coco" / "val2014" / "b.png", tmp_path / "coco" / "val2014" / "d.png"]
    assert captions == ["a dog.", "a brown dog", "dog on grass", "a cat", "cat"]
    assert text_to_image == [0, 0, 0, 1, 1]
    # --data recognises the file by its content; Flickr files have no filepath: root/filename.
    flickr = tmp_path / "flickr" / "dataset_flickr30k.json"
    flickr.parent.mkdir()
    flickr.write_text(json.dumps({"images": [{"split": "val", "filename": "1.jpg", "sentences": [{"raw": "x"}]}]}))
    assert retrieval_set(str(flickr), "", "val", "filepath", "title")[0].entries == [flickr.parent / "1.jpg"]
    with pytest.raises(RecipeError, match="no images in that split; its splits are test, train, val"):
        retrieval_set(str(path), "", "restval", "filepath", "title")
    with pytest.raises(RecipeError, match="--split applies to Karpathy split files"):
        retrieval_set("demo:digit_pairs", "", "test", "filepath", "title")


def test_class_count_mismatch_is_an_error(tmp_path):
    for name in ("cat", "dog", "fish"):
        _png(tmp_path / "classes" / name / "0.png")
    names = tmp_path / "names.txt"
    names.write_text("a cat\na dog\n")
    with pytest.raises(RecipeError, match="has 2 names but --zeroshot .* has 3 classes"):
        zeroshot_set(str(tmp_path / "classes"), str(names), None)
    names.write_text("a cat\na dog\na fish\n")
    (_, _, classnames), templates, _ = zeroshot_set(str(tmp_path / "classes"), str(names), None)
    assert classnames == ["a cat", "a dog", "a fish"] and all("{}" in t for t in templates)


def test_imagenet_folder_defaults_to_open_clip_names_and_templates(tmp_path):
    from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES, OPENAI_IMAGENET_TEMPLATES

    for i in range(1000):
        _png(tmp_path / f"n{i:08d}" / "0.png", i % 256)
    (images, labels, classnames), templates, description = zeroshot_set(str(tmp_path), None, None)
    assert classnames == list(IMAGENET_CLASSNAMES) and len(templates) == len(OPENAI_IMAGENET_TEMPLATES) == 80
    assert templates[0] == OPENAI_IMAGENET_TEMPLATES[0]("{}")
    assert labels.tolist() == list(range(1000)) and description["classnames"] == "open_clip IMAGENET_CLASSNAMES"


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    """A two-step stage-2 demo run with its checkpoint."""
    run_dir = tmp_path_factory.mktemp("eval") / "run"
    launch("stage2", "--set", f"run_dir={run_dir}", "--set", "train.steps=2", "--set", "train.micro_batch=4",
           "--set", "train.global_batch=8", "--set", "train.accumulation=0", "--set", "train.warmup_steps=1",
           "--set", "eval.data=", "--set", "eval.zeroshot=", "--set", "student.image.init_from=",
           "--set", "student.text.init_from=")
    return run_dir


def test_same_numbers_on_one_and_two_ranks_and_any_batch_size(demo_run, tmp_path, capsys):
    sets = ["--data", "demo:digit_pairs", "--zeroshot", "demo:digits"]
    reports = {}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the launched ranks (OMP_NUM_THREADS=1): BLAS sums in the same order
    try:
        for batch in (7, 64):
            out = tmp_path / f"one_rank_{batch}.json"
            assert main(["eval", str(demo_run), *sets, "--batch-size", str(batch), "--out", str(out)]) == 0
            reports[1, batch] = json.loads(out.read_text())
    finally:
        torch.set_num_threads(threads)
    table = capsys.readouterr().out
    assert "zeroshot_top5" in table and "t2i_R@10" in table and "teacher" in table
    out = tmp_path / "two_ranks_7.json"
    launch("eval", str(demo_run), *sets, "--batch-size", "7", "--out", str(out), ranks=2)
    reports[2, 7] = json.loads(out.read_text())
    assert reports[2, 7]["world_size"] == 2 and reports[1, 7]["world_size"] == 1

    metrics = {key: report["metrics"] for key, report in reports.items()}
    assert set(metrics[1, 7]) == {"student", "teacher"}
    assert metrics[2, 7] == metrics[1, 7]  # bit-identical across world sizes
    for who in ("student", "teacher"):
        for name, value in metrics[1, 7][who].items():
            # Recalls are counts: identical. Cosine means may move in the last bit of the fp32
            # forward when the batch shape changes (BLAS kernels), nothing more.
            assert metrics[1, 64][who][name] == pytest.approx(value, abs=1e-6), (who, name)
            if "R@" in name or "zeroshot" in name:
                assert metrics[1, 64][who][name] == value, (who, name)


def test_a_model_path_of_no_known_kind_is_a_one_line_error(tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("not a model")
    assert main(["eval", str(tmp_path), "--data", "demo:digit_pairs"]) == 2
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1 and "is none of these; eval accepts a run directory" in error
    assert "open_clip directory" in error and "transformers CLIPModel directory" in error


@pytest.mark.parametrize("library", ["open_clip", "hf"])
def test_exported_directories_evaluate_as_the_student(library, tmp_path):
    """An exported open_clip / transformers directory is recognised and embeds the evaluation sets
    through its own library's preprocessing and tokenizer as the student's towers do through ours."""
    import test_export_hf as helpers
    from tinyclip_ds.data.config import DataConfig
    from tinyclip_ds.eval.config import EvalConfig
    from tinyclip_ds.eval.evaluator import Evaluator
    from tinyclip_ds.evaluate import load_model
    from tinyclip_ds.models.config import TeacherConfig

    root = tmp_path / "teacher"
    root.mkdir()
    if library == "open_clip":
        from safetensors.torch import save_file

        from test_teacher_equivalence import open_clip_library
        from tinyclip_ds.export.open_clip import write_open_clip as write
        state = {k: v.contiguous() for k, v in open_clip_library(helpers.OPEN_CLIP_TEACHER).state_dict().items()}
        save_file(state, root / "w.safetensors")
        (root / "m.json").write_text(json.dumps(helpers.OPEN_CLIP_TEACHER))
        teacher = TeacherConfig(source="open_clip", path=str(root / "w.safetensors"), model=str(root / "m.json"))
    else:
        from transformers import CLIPConfig, CLIPModel

        from test_teacher_equivalence import perturb, write_hf_tokenizer
        from tinyclip_ds.export.hf import write_hf as write
        perturb(CLIPModel(CLIPConfig(**helpers.HF_TEACHER))).save_pretrained(root)
        write_hf_tokenizer(root)
        teacher = TeacherConfig(source="hf", path=str(root))
    student = helpers.exported(teacher, repeat=2)
    write(student, tmp_path / "export")

    loaded = load_model(str(tmp_path / "export"), "auto", torch.device("cpu"), with_teacher=True)
    assert loaded.kind == library and loaded.teacher is None
    evaluator = Evaluator(EvalConfig(data="demo:digit_pairs", zeroshot="", batch_size=16), DataConfig(),
                          student.image_size, student.image_mean, student.image_std, student.tokenizer, torch.device("cpu"))
    ours = (evaluator.image_side(lambda x: student.image(x).embedding).retrieval,
            evaluator.text_side(lambda ids: student.text(student.text.fit_context(ids)).embedding).retrieval)
    evaluator.tokenizer, evaluator.transform = loaded.student.tokenizer, loaded.student.transform
    with torch.no_grad():
        theirs = (evaluator.image_side(loaded.student.encode_image).retrieval,
                  evaluator.text_side(loaded.student.encode_text).retrieval)
    for a, b in zip(ours, theirs):
        assert (a - b).abs().max().item() <= 1e-5
