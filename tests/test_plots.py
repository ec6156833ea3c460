"""Pictures and progress bars: the retrieval grid (layout, order, frame colours), the evaluator's
grid inputs, the grids in a real stage-2 run's TensorBoard, and when progress bars are drawn."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import launch
from test_layers import imports_of, module_files
from tinyclip_ds import distributed
from tinyclip_ds.config import PROJECT_ROOT
from tinyclip_ds.eval.evaluator import Evaluator, ImageSide, TextSide
from tinyclip_ds.eval.plots import (CORRECT, FRAME, LABEL_HEIGHT, PAD, TEXT_WIDTH, THUMB, TITLE_HEIGHT, WRONG,
                                    chosen_rows, retrieval_grid, row_height, thumbnail_box)
from tinyclip_ds.progress import progress

# Image j is a solid colour, so a thumbnail's centre pixel tells which image was placed there.
COLOURS = [(10 * j, 200 - 10 * j, 40 + 20 * j) for j in range(8)]


def solid_images(sizes=None) -> list[Image.Image]:
    sizes = sizes or [(32, 32)] * len(COLOURS)
    return [Image.new("RGB", size, colour) for size, colour in zip(sizes, COLOURS)]


def pixel(grid: Image.Image, x: int, y: int) -> tuple[int, int, int]:
    return grid.getpixel((x, y))


def centre(box) -> tuple[int, int]:
    left, top, right, bottom = box
    return (left + right) // 2, (top + bottom) // 2


def test_grid_size_follows_rows_k_and_title():
    images = solid_images()
    similarity = torch.randn(6, 8, generator=torch.Generator().manual_seed(0))
    captions = [f"caption {i}" for i in range(6)]
    correct = list(range(6))
    cell = THUMB + 2 * FRAME + PAD
    grid = retrieval_grid(similarity, captions, images, correct, rows=4, k=5, title="t")
    assert grid.size == (PAD + TEXT_WIDTH + PAD + 5 * cell, TITLE_HEIGHT + PAD + 4 * row_height())
    assert row_height() == LABEL_HEIGHT + THUMB + 2 * FRAME + PAD
    narrower = retrieval_grid(similarity, captions, images, correct, rows=2, k=3)
    assert narrower.size == (grid.width - 2 * cell, grid.height - TITLE_HEIGHT - 2 * row_height())
    # more rows than captions: every caption once; k beyond the images: every image once
    everything = retrieval_grid(similarity[:3, :4], captions[:3], images[:4], [0, 1, 2], rows=10, k=9)
    assert everything.size == (PAD + TEXT_WIDTH + PAD + 4 * cell, PAD + 3 * row_height())


def test_rows_are_evenly_spaced_and_deterministic():
    assert chosen_rows(8, 4) == [0, 2, 4, 6]
    assert chosen_rows(10, 4) == [0, 2, 5, 7]
    assert chosen_rows(3, 4) == [0, 1, 2]


def test_images_are_ranked_by_similarity_and_framed_by_correctness():
    """Caption 0 ranks the images 7, 6, …, 0 and image 5 is correct (rank 3); caption 2 ranks
    them 0, 1, … with images {0, 1} correct; caption 4's correct image 7 is not in its top 3."""
    ascending = torch.arange(8, dtype=torch.float32) / 10
    similarity = torch.stack([ascending, -ascending, -ascending, ascending, -ascending, ascending])
    correct = [5, 0, {0, 1}, 3, 7, 2]
    captions = [f"caption {i}" for i in range(6)]
    grid = retrieval_grid(similarity, captions, solid_images(), correct, rows=3, k=3, title="grid")
    expected = {0: [7, 6, 5], 1: [0, 1, 2], 2: [0, 1, 2]}  # rows show captions 0, 2, 4
    right = {0: {5}, 1: {0, 1}, 2: {7}}
    for row, order in expected.items():
        for column, image in enumerate(order):
            box = thumbnail_box(row, column, "grid")
            assert pixel(grid, *centre(box)) == COLOURS[image], (row, column)
            frame = CORRECT if image in right[row] else WRONG
            # every side of the frame, away from the corners
            left, top, right_edge, bottom = box
            middle_x, middle_y = centre(box)
            for x, y in [(left + 1, middle_y), (right_edge - 2, middle_y), (middle_x, top + 1),
                         (middle_x, bottom - 2)]:
                assert pixel(grid, x, y) == frame, (row, column, x, y)
    # the caption column and the space between cells stay background
    assert pixel(grid, PAD + TEXT_WIDTH - 1, thumbnail_box(0, 0, "grid")[3] - 1) == (255, 255, 255)


def test_thumbnails_keep_their_aspect_ratio_centred():
    wide = solid_images([(64, 16)] * 8)
    grid = retrieval_grid(torch.eye(8), [str(i) for i in range(8)], wide, list(range(8)), rows=1, k=1)
    left, top, right, bottom = thumbnail_box(0, 0)
    inner_top = top + FRAME
    assert pixel(grid, centre((left, top, right, bottom))[0], inner_top + 2) == (255, 255, 255)  # letterbox
    assert pixel(grid, *centre((left, top, right, bottom))) == COLOURS[0]


def test_text_is_drawn_in_characters_the_bundled_font_has():
    """Pillow's bundled font draws ASCII only: an arrow in a title would be an empty box."""
    from tinyclip_ds.eval.plots import _drawable

    assert _drawable("student: caption → top-5 … café naïve — 日本") == "student: caption -> top-5 ... cafe naive - ??"
    plain = retrieval_grid(torch.eye(2), ["a", "b"], solid_images()[:2], [0, 1], k=2, title="caption -> top-5")
    fancy = retrieval_grid(torch.eye(2), ["a", "b"], solid_images()[:2], [0, 1], k=2, title="caption → top-5")
    assert np.array_equal(np.asarray(plain), np.asarray(fancy))


def test_mismatched_inputs_are_refused():
    with pytest.raises(ValueError, match="must be"):
        retrieval_grid(torch.zeros(3, 4), ["a", "b", "c"], solid_images()[:5], [0, 1, 2])


class ListSource:
    """An `ImageSource` stand-in: ``load(i)`` gives image i and counts the loads."""

    def __init__(self, images):
        self.images, self.loaded = images, []

    def __len__(self):
        return len(self.images)

    def load(self, index):
        self.loaded.append(index)
        return self.images[index]


def test_evaluator_examples_show_the_whole_sets_top_k():
    """Two captions per image over 8 images: the grid's inputs hold only the images among the
    picked captions' top 3 or correct, and those are the top 3 of the whole set."""
    generator = torch.Generator().manual_seed(1)
    image_embeddings = torch.nn.functional.normalize(torch.randn(8, 16, generator=generator), dim=-1)
    text_embeddings = torch.nn.functional.normalize(torch.randn(16, 16, generator=generator), dim=-1)
    owners = [i // 2 for i in range(16)]
    evaluator = Evaluator.__new__(Evaluator)
    source = ListSource(solid_images([(200, 100)] * 8))
    evaluator.retrieval = (source, [f"caption {i}" for i in range(16)], owners)
    similarity, captions, thumbs, correct = evaluator.retrieval_examples(
        ImageSide(image_embeddings, None), TextSide(text_embeddings, None), rows=4, k=3, thumbnail=50)
    picked = chosen_rows(16, 4)
    assert captions == [f"caption {i}" for i in picked]
    full = text_embeddings[picked] @ image_embeddings.T
    shown = sorted(source.loaded)
    assert len(set(shown)) == len(shown) == similarity.shape[1] == len(thumbs) < 8  # only what is shown
    for row, caption in enumerate(picked):
        top_full = full[row].topk(3).indices.tolist()
        assert [shown[j] for j in similarity[row].topk(3).indices.tolist()] == top_full
        assert shown[correct[row]] == owners[caption]
    assert all(thumb.size == (50, 25) for thumb in thumbs)
    assert retrieval_grid(similarity, captions, thumbs, correct, rows=4, k=3).size[1] == PAD + 4 * row_height()

    evaluator.retrieval = None
    assert evaluator.retrieval_examples(ImageSide(None, None), TextSide(None, None)) is None


def test_stage2_run_logs_retrieval_grids_for_student_and_teacher(tmp_path):
    """A one-step stage-2 demo run evaluated at its end: TensorBoard holds both grids."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_dir = tmp_path / "run"
    launch("stage2", "--set", f"run_dir={run_dir}", "--set", "train.steps=1", "--set", "train.micro_batch=8",
           "--set", "train.accumulation=1", "--set", "eval.every=0", "--set", "eval.zeroshot=",
           "--set", "checkpoint.every=0", "--set", "student.image.init_from=", "--set", "student.text.init_from=")
    events = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"images": 0})
    events.Reload()
    assert {"eval/retrieval_student", "eval/retrieval_teacher",
            "eval/similarity_student_vs_teacher"} <= set(events.Tags()["images"])
    for tag in ("eval/retrieval_student", "eval/retrieval_teacher"):
        [event] = events.Images(tag)
        grid = Image.open(io.BytesIO(event.encoded_image_string)).convert("RGB")
        assert event.step == 1 and grid.size == (thumbnail_box(0, 5)[0], TITLE_HEIGHT + PAD + 4 * row_height())
        for row in range(4):
            assert pixel(grid, thumbnail_box(row, 0, "t")[0] + 1, centre(thumbnail_box(row, 0, "t"))[1]) in \
                (CORRECT, WRONG)
    # the shipped teacher finds every shown caption's pair first (its R@1 on these pairs is 0.96)
    teacher = Image.open(io.BytesIO(events.Images("eval/retrieval_teacher")[0].encoded_image_string)).convert("RGB")
    assert [pixel(teacher, thumbnail_box(row, 0, "t")[0] + 1, centre(thumbnail_box(row, 0, "t"))[1])
            for row in range(4)] == [CORRECT] * 4


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_bars_only_on_a_terminal_and_rank_0(monkeypatch):
    assert progress(range(3)).disable  # pytest captures stderr: not a terminal
    terminal = Terminal()
    monkeypatch.setattr("sys.stderr", terminal)
    bar = progress(range(3), desc="embedding", mininterval=0)
    assert not bar.disable
    assert list(bar) == [0, 1, 2]
    drawn = terminal.getvalue()
    assert "embedding" in drawn and "3/3 [00:00<00:00" in drawn  # elapsed<remaining: the ETA
    monkeypatch.setattr(distributed, "rank", lambda: 1)
    assert progress(range(3)).disable
    assert progress(total=5).disable


def test_progress_module_imports_only_the_distributed_helpers():
    """Every layer but models may use it, so it may depend on nothing of the package but
    tinyclip_ds.distributed (which imports nothing of it)."""
    modules = module_files(PROJECT_ROOT / "tinyclip_ds")
    imported = {name for _, name in imports_of("tinyclip_ds.progress", modules["tinyclip_ds.progress"], modules)}
    assert imported == {"tinyclip_ds", "tinyclip_ds.distributed"}


def test_setup_requires_tqdm():
    requirements = (PROJECT_ROOT / "setup.cfg").read_text().split("install_requires =")[1].split("\n\n")[0]
    assert "tqdm" in [line.strip() for line in requirements.splitlines()]


def test_monitor_writes_a_pil_image_to_tensorboard_on_rank_0_only(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from tinyclip_ds.train.monitor import Monitor

    grid = retrieval_grid(torch.eye(2), ["a", "b"], solid_images()[:2], [0, 1], k=2)
    Monitor(tmp_path / "other", enabled=False).image("eval/grid", 3, grid)
    assert not (tmp_path / "other").exists()
    monitor = Monitor(tmp_path / "rank0", enabled=True)
    monitor.image("eval/grid", 3, grid)
    monitor.close()
    events = EventAccumulator(str(tmp_path / "rank0" / "tensorboard"), size_guidance={"images": 0})
    events.Reload()
    [event] = events.Images("eval/grid")
    written = Image.open(io.BytesIO(event.encoded_image_string)).convert("RGB")
    assert event.step == 3 and np.array_equal(np.asarray(written), np.asarray(grid))
