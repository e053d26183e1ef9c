"""MoE-SAM's feature-enhancing block (FEB): expert-choice MoE over every encoder block's tokens.

Details: docs/moesam.md.
"""

from __future__ import annotations

import math
from typing import List

import torch
import torch.nn.functional as F
from segment_anything.modeling.common import LayerNorm2d
from torch import nn

FORMS = ("sparse", "dense")


class Expert(nn.Module):
    """Linear D -> r*D, ReLU, Linear r*D -> D, Dropout (training only)."""

    def __init__(self, dim: int, hidden: int, dropout: float) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.fc2(F.relu(self.fc1(x))))


class ExpertChoiceMoE(nn.Module):
    """Expert-choice routing per image with a fixed capacity k, and the weighted residual combine.

    Arguments (keyword-only):
      dim: token width D.
      hidden: expert hidden width.
      num_experts: E.
      k: tokens each expert picks per image (a constant of the graph).
      dropout: expert output dropout (training only).
    """

    def __init__(self, *, dim: int, hidden: int, num_experts: int, k: int, dropout: float) -> None:
        super().__init__()
        self.gate = nn.Linear(dim, num_experts)  # router logits H = X W_g + b_g
        self.noise = nn.Linear(dim, num_experts)  # noise scale softplus(X W_n + b_n), training only
        self.experts = nn.ModuleList(Expert(dim, hidden, dropout) for _ in range(num_experts))
        self.k = k
        self.form = "sparse"  # or "dense"; the same function (see the module docstring)

    def route(self, x: torch.Tensor) -> tuple:
        """Tokens (B, N, D) -> (weights (B, E, k) float32, token indices (B, E, k) int64)."""
        logits = self.gate(x)  # (B, N, E)
        if self.training:  # noisy routing explores in training; inference is deterministic
            logits = logits + torch.randn_like(logits) * F.softplus(self.noise(x))
        values, index = logits.transpose(1, 2).topk(self.k, dim=-1)  # (B, E, k) each: expert picks tokens
        return values.softmax(dim=-1), index  # weights sum to 1 per expert

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weights, index = self.route(x)  # (B, E, k), (B, E, k)
        if self.form == "dense":
            return self._dense(x, weights, index)
        if self.form != "sparse":
            raise ValueError(f"unknown MoE form {self.form!r}; choose from {', '.join(FORMS)}")
        b, n, d = x.shape
        y = x  # residual: unpicked tokens pass through
        for e, expert in enumerate(self.experts):
            idx = index[:, e].unsqueeze(-1).expand(b, self.k, d)  # (B, k, D)
            out = expert(x.gather(1, idx)) * weights[:, e].unsqueeze(-1)  # (B, k, D)
            y = y + torch.zeros_like(x).scatter(1, idx, out)  # (B, N, D): unique indices, no reduction
        return y

    def _dense(self, x: torch.Tensor, weights: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        gate = x.new_zeros(b, len(self.experts), n).scatter(2, index, weights)  # (B, E, N), 0 where unpicked
        y = x
        for e, expert in enumerate(self.experts):
            y = y + gate[:, e].unsqueeze(-1) * expert(x)  # (B, N, D)
        return y


class TokenAttention(nn.Module):
    """SAM-style multi-head attention (separate q/k/v/out projections) over all N tokens of an image.

    Eager runs PyTorch's fused `scaled_dot_product_attention` (the (heads, N, N) scores never
    exist at once). For export, `query_chunk` > 0 computes the scores in query chunks of that
    size, so the graph never holds the full score tensor: at ViT-B 256 that tensor is 8 x 3072 x
    3072 float32 = 302 MB per image, and a MatMul -> Softmax pair would hold it twice.
    """

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        self.q_proj = nn.Linear(dim, dim)
        self.k_proj = nn.Linear(dim, dim)
        self.v_proj = nn.Linear(dim, dim)
        self.out_proj = nn.Linear(dim, dim)
        self.num_heads = num_heads
        self.query_chunk = 0

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        return x.reshape(b, n, self.num_heads, d // self.num_heads).transpose(1, 2)  # (B, nh, N, hd)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        q, k, v = self._heads(self.q_proj(x)), self._heads(self.k_proj(x)), self._heads(self.v_proj(x))
        if self.query_chunk > 0:
            y = chunked_attention(q, k, v, self.query_chunk)  # (B, nh, N, hd)
        else:
            y = F.scaled_dot_product_attention(q, k, v)  # (B, nh, N, hd)
        return self.out_proj(y.transpose(1, 2).reshape(b, n, d))  # (B, N, D)


def chunked_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, chunk: int) -> torch.Tensor:
    """softmax(q k^T / sqrt(hd)) v, computed for `chunk` queries at a time.

    Arguments:
      q, k, v: (B, nh, N, hd).
      chunk: queries per chunk.

    Returns:
      (B, nh, N, hd).
    """
    scale = 1.0 / math.sqrt(q.shape[-1])
    kt = k.transpose(-2, -1) * scale  # (B, nh, hd, N): scaled once, not per chunk
    parts: List[torch.Tensor] = []
    for start in range(0, q.shape[2], chunk):
        scores = q[:, :, start:start + chunk] @ kt  # (B, nh, chunk, N)
        parts.append(scores.softmax(dim=-1) @ v)  # (B, nh, chunk, hd)
    return torch.cat(parts, dim=2)


class FeatureEnhancer(nn.Module):
    """The FEB: block outputs (B, L, h, w, D) -> enhancement (B, C_out, h, w) added to SAM's neck output.

    Arguments (keyword-only):
      dim: D; out_chans: C_out (256); num_experts, k, expert_hidden, dropout: the MoE;
      num_heads: attention heads over the N tokens.
    """

    def __init__(self, *, dim: int, out_chans: int, num_experts: int, k: int, expert_hidden: int,
                 dropout: float, num_heads: int) -> None:
        super().__init__()
        self.moe = ExpertChoiceMoE(dim=dim, hidden=expert_hidden, num_experts=num_experts, k=k, dropout=dropout)
        self.attn = TokenAttention(dim, num_heads)
        self.neck = nn.Sequential(  # "neck5": new, trainable, SAM's neck shape
            nn.Conv2d(dim, out_chans, kernel_size=1, bias=False),
            LayerNorm2d(out_chans),
            nn.Conv2d(out_chans, out_chans, kernel_size=3, padding=1, bias=False),
            LayerNorm2d(out_chans),
        )

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        b, layers, h, w, d = feats.shape
        x = feats.reshape(b, layers * h * w, d)  # (B, N, D): one token per layer and position
        x = self.attn(self.moe(x))  # (B, N, D)
        x = x.reshape(b, layers, h, w, d).mean(dim=1)  # (B, h, w, D): mean over the layers
        return self.neck(x.permute(0, 3, 1, 2))  # (B, C_out, h, w)
