"""Small learned modules that some loss terms need (trained with the student, never exported)."""

from __future__ import annotations

import torch
from torch import Tensor, nn


class Projection(nn.Linear):
    """Student→teacher width map (TinyBERT's W_h): a Linear, identity-initialised for equal widths."""

    def __init__(self, d_student: int, d_teacher: int):
        super().__init__(d_student, d_teacher)

    def reset_parameters(self) -> None:
        # Called by nn.Linear.__init__; overriding it (instead of editing weights afterwards)
        # also covers re-initialisation, e.g. of parameters created on the meta device.
        if self.in_features == self.out_features:
            nn.init.eye_(self.weight)
            nn.init.zeros_(self.bias)
        else:
            super().reset_parameters()


class ViTKDGenerator(nn.Module):
    """ViTKD's generation head: project, replace masked patches by a mask token, two 3×3 convs.

    Input: student tokens (B, 1 + grid², d_s) with the class token first, and the token mask
    (B, 1 + grid²) bool (True = masked). Output (B, 1 + grid², d_t). Patch tokens go through
    conv 3×3 → ReLU → conv 3×3 over the patch grid, as in ViTKD. The class token has no grid
    position: it is never replaced and only passes through the projection (`random_token_mask`
    never masks it, so it never enters the generation loss).
    """

    def __init__(self, d_student: int, d_teacher: int, grid: int):
        super().__init__()
        self.grid = grid
        self.align = Projection(d_student, d_teacher)
        self.mask_token = nn.Parameter(torch.zeros(d_teacher))
        self.generation = nn.Sequential(
            nn.Conv2d(d_teacher, d_teacher, kernel_size=3, padding=1),
            nn.ReLU(),
            nn.Conv2d(d_teacher, d_teacher, kernel_size=3, padding=1),
        )

    def forward(self, tokens: Tensor, mask: Tensor) -> Tensor:
        batch, n, _ = tokens.shape
        if n != 1 + self.grid ** 2:
            raise ValueError(f"ViTKDGenerator for a {self.grid}×{self.grid} grid expects "
                             f"{1 + self.grid ** 2} tokens (class token first), got {n}")
        x = self.align(tokens)
        patches = torch.where(mask[:, 1:, None], self.mask_token.to(x.dtype), x[:, 1:])
        patches = patches.transpose(1, 2).reshape(batch, -1, self.grid, self.grid)
        patches = self.generation(patches).flatten(2).transpose(1, 2)
        return torch.cat([x[:, :1], patches], dim=1)


def random_token_mask(batch: int, grid: int, ratio: float, generator: torch.Generator,
                      device: torch.device | str | None = None) -> Tensor:
    """ViTKD's random patch mask: (B, 1 + grid²) bool, True = masked, the class token never.

    Each sample masks exactly grid² − ⌊grid² · (1 − ratio)⌋ patches (ViTKD's count), drawn
    from ``generator`` (on its own device) so runs are reproducible; the result is moved to
    ``device`` (default: the generator's device).
    """
    if not 0.0 <= ratio <= 1.0:
        raise ValueError(f"the ViTKD mask ratio must be in [0, 1], got {ratio}")
    patches = grid ** 2
    masked = patches - int(patches * (1.0 - ratio))
    noise = torch.rand(batch, patches, generator=generator, device=generator.device)
    rank = noise.argsort(dim=1).argsort(dim=1)
    class_token = torch.zeros(batch, 1, dtype=torch.bool, device=noise.device)
    mask = torch.cat([class_token, rank < masked], dim=1)
    return mask.to(device if device is not None else generator.device)
