"""Evaluation during training: the student's encoders against the frozen teacher's."""

from __future__ import annotations

import torch

from tinyclip_ds.eval.evaluator import Evaluator
from tinyclip_ds.eval.plots import retrieval_grid
from tinyclip_ds.models.transformer import Clip
from tinyclip_ds.train.monitor import Monitor
from tinyclip_ds.train.task import Encoder


class StudentEvaluation:
    """``evaluate(step)``: the student's encoders where given (stage 1 gives one, stage 2 both),
    the teacher's for the other tower, on the recipe's validation sets. Logs to metrics.jsonl,
    TensorBoard (with the student-vs-teacher similarity heatmap and caption → image retrieval
    grids) and the console.

    The teacher is frozen, so its side of the validation sets, its metrics, its heatmap half and
    its retrieval grid are computed once, at the first evaluation."""

    def __init__(self, evaluator: Evaluator, teacher: Clip, monitor: Monitor, rank: int, model: torch.nn.Module,
                 image: Encoder | None, text: Encoder | None):
        self.evaluator = evaluator
        self.teacher = teacher
        self.monitor = monitor
        self.rank = rank
        self.model = model
        self.image = image
        self.text = text
        self.teacher_sides = None
        self.teacher_metrics: dict[str, float] = {}
        self.teacher_similarity = None

    def __call__(self, step: int) -> None:
        """Collective: evaluate and log at ``step``."""
        evaluator, monitor = self.evaluator, self.monitor
        if not evaluator.enabled:
            return
        if self.teacher_sides is None:
            clip = self.teacher
            self.teacher_sides = (evaluator.image_side(lambda x: clip.visual(x).embedding),
                                  evaluator.text_side(lambda ids: clip.text(ids).embedding))
            self.teacher_metrics = evaluator.metrics(*self.teacher_sides)
            self.teacher_similarity = evaluator.similarity_sample(*self.teacher_sides)
            self.log_retrieval_grid("teacher", step, self.teacher_sides)
        teacher = self.teacher_metrics
        self.model.eval()
        sides = (evaluator.image_side(self.image) if self.image else self.teacher_sides[0],
                 evaluator.text_side(self.text) if self.text else self.teacher_sides[1])
        self.model.train()
        student = evaluator.metrics(*sides)
        monitor.metrics(step, {**{f"student/{k}": v for k, v in student.items()},
                                   **{f"teacher/{k}": v for k, v in teacher.items()}})
        student_similarity = evaluator.similarity_sample(*sides)
        if student_similarity is not None:
            gap = torch.full((student_similarity.shape[0], 1), float("nan"))
            both = torch.cat([student_similarity.cpu(), gap, self.teacher_similarity.cpu()], dim=1)
            monitor.heatmap("eval/similarity_student_vs_teacher", step, both.nan_to_num(both.nanmean().item()))
        self.log_retrieval_grid("student", step, sides)
        shown = [k for k in ("zeroshot_top1", "i2t_R@1", "t2i_R@1", "mean_score") if k in student]
        monitor.print(f"eval step {step}: " + "  ".join(
            f"{k} student {student[k]:.4f} / teacher {teacher[k]:.4f}" for k in shown))

    def log_retrieval_grid(self, who: str, step: int, sides) -> None:
        """TensorBoard ``eval/retrieval_<who>``: a few validation captions, each with its top-5
        images of the whole set, the correct one framed green (rank 0, with a retrieval set)."""
        if self.rank != 0:
            return
        examples = self.evaluator.retrieval_examples(*sides)
        if examples is not None:
            title = f"{who}, step {step}: top-5 images per caption (green = correct)"
            self.monitor.image(f"eval/retrieval_{who}", step, retrieval_grid(*examples, title=title))
