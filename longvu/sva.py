"""The Spatial Vision Aggregator (SVA) connector.

Each query cell of an s x s grid attends to its own r x r block of tokens from every tower (r = 24 / s),
with a shared learned query and the frame's mean SigLIP feature as global context. Parameter names
match the original `vision_sampler_0.layers.{l}.*` keys one to one.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers.modeling_layers import GradientCheckpointingLayer


class GeluMLP(nn.Module):
    """linear_1 -> GELU -> linear_2, no biases (original `proj_out`)."""

    def __init__(self, d_in: int, d_hidden: int, d_out: int):
        super().__init__()
        self.linear_1 = nn.Linear(d_in, d_hidden, bias=False)
        self.linear_2 = nn.Linear(d_hidden, d_out, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_2(F.gelu(self.linear_1(x)))


def _norm_linear(dim: int) -> nn.Sequential:
    return nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, dim, bias=False))


class MultiTowerCrossAttention(nn.Module):
    """One query per cell attends to the concatenated cell tokens of all towers.

    Keys/values per tower t come from `k_proj_t` / `v_proj_t` (LayerNorm -> Linear)."""

    def __init__(self, dim: int, num_towers: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.num_towers = num_towers
        self.q_proj = _norm_linear(dim)
        for t in range(num_towers):
            setattr(self, f"k_proj_{t}", _norm_linear(dim))
            setattr(self, f"v_proj_{t}", _norm_linear(dim))
        self.o_proj = nn.Linear(dim, dim, bias=False)

    def forward(self, query: torch.Tensor, cells: list[torch.Tensor], key_mask: torch.Tensor) -> torch.Tensor:
        """query [M, C]; cells: per tower [M, k, C]; key_mask [M, towers*k] bool (True = attend) -> [M, C]."""
        m, dim = query.shape
        h, d = self.num_heads, dim // self.num_heads
        keys = torch.cat([getattr(self, f"k_proj_{t}")(c) for t, c in enumerate(cells)], dim=1)
        values = torch.cat([getattr(self, f"v_proj_{t}")(c) for t, c in enumerate(cells)], dim=1)
        q = self.q_proj(query).view(m, h, 1, d)
        k = keys.view(m, -1, h, d).transpose(1, 2)
        v = values.view(m, -1, h, d).transpose(1, 2)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=key_mask[:, None, None, :])
        return self.o_proj(out.reshape(m, dim))


class SVALayer(GradientCheckpointingLayer):
    """x = proj_in([q ; proj_context(ctx)]); q' = q + proj_out(norm(x + attn(x, cells))).

    Recomputed in the backward pass under gradient checkpointing (its activations over every cell of
    every frame are the connector's largest memory cost)."""

    def __init__(self, dim: int, num_towers: int, cell_tokens: int, num_heads: int):
        super().__init__()
        self.num_towers = num_towers
        self.proj_context = nn.Linear(dim, dim, bias=False)
        self.proj_in = nn.Linear(2 * dim, dim, bias=False)
        self.proj_out = GeluMLP(dim, dim, dim)
        self.norm = nn.LayerNorm(dim)
        self.cross_attn = MultiTowerCrossAttention(dim, num_towers, num_heads)
        self.has_pos_embed = cell_tokens > 1
        if self.has_pos_embed:
            for t in range(num_towers):
                self.register_parameter(f"pos_embed_{t}", nn.Parameter(torch.randn(cell_tokens, dim)))

    def forward(self, query, context, cells, key_mask):
        """query, context [M, C]; cells per tower [M, k, C]; key_mask [M, towers*k] -> [M, C]."""
        x = self.proj_in(torch.cat([query, self.proj_context(context)], dim=-1))
        if self.has_pos_embed:
            cells = [c + getattr(self, f"pos_embed_{t}").to(c.dtype) for t, c in enumerate(cells)]
        x = x + self.cross_attn(x, cells, key_mask)
        return query + self.proj_out(self.norm(x))


class VisionSampler(nn.Module):
    """A stack of SVA layers (original `vision_sampler_0`)."""

    def __init__(self, dim: int, num_towers: int, cell_tokens: int, depth: int, num_heads: int):
        super().__init__()
        self.layers = nn.ModuleList(
            [SVALayer(dim, num_towers, cell_tokens, num_heads) for _ in range(depth)]
        )

    def forward(self, query, context, cells, key_mask):
        for layer in self.layers:
            query = layer(query, context, cells, key_mask)
        return query


def split_into_cells(features: torch.Tensor, query_side: int) -> torch.Tensor:
    """[N, G*G, C] tower grid -> [N*s*s, r*r, C]: the r x r block of tokens owned by each query cell."""
    n, tokens, dim = features.shape
    grid = int(round(tokens ** 0.5))
    r = grid // query_side
    cells = features.view(n, query_side, r, query_side, r, dim).permute(0, 1, 3, 2, 4, 5)
    return cells.reshape(n * query_side * query_side, r * r, dim)


def cell_key_mask(content: torch.Tensor, query_side: int) -> torch.Tensor:
    """content [N, G, G] bool (True = image, False = square padding) -> [N*s*s, r*r] cell masks.

    A cell that is all padding attends to all its keys (so no attention row is fully masked)."""
    n, grid, _ = content.shape
    r = grid // query_side
    mask = content.view(n, query_side, r, query_side, r).permute(0, 1, 3, 2, 4).reshape(-1, r * r)
    return mask | ~mask.any(dim=-1, keepdim=True)
