"""MoE-SAM's lightweight prompt embedding generator (LPEG): one sparse prompt token per image.

SAM needs prompts; MoE-SAM generates one from the image embedding instead of points or
boxes: LayerNorm2d -> GELU -> global average pool -> Linear C -> h -> ReLU -> Linear h -> C,
one (1, C) token per image (the public code's layers; the paper's text says Linear-GELU-Linear).
It is trained (the public code leaves it frozen at random init).
"""

from __future__ import annotations

import torch
from segment_anything.modeling.common import LayerNorm2d
from torch import nn


class PromptGenerator(nn.Module):
    """Image embedding (B, C, h, w) -> sparse prompt embedding (B, 1, C)."""

    def __init__(self, *, channels: int, hidden: int) -> None:
        super().__init__()
        self.norm = LayerNorm2d(channels)
        self.act = nn.GELU()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc1 = nn.Linear(channels, hidden)
        self.fc2 = nn.Linear(hidden, channels)

    def forward(self, embedding: torch.Tensor) -> torch.Tensor:
        x = self.pool(self.act(self.norm(embedding))).flatten(1)  # (B, C)
        return self.fc2(torch.relu(self.fc1(x))).unsqueeze(1)  # (B, 1, C)
