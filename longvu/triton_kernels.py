"""Triton kernels for the LoRA step's memory-bound passes, each one pass over its tensors where the
PyTorch ops they replace take several (a CUDA GPU; the CPU runs them only under Triton's interpreter,
TRITON_INTERPRET=1, as the tests do). `longvu.kernels.runs_triton` says when they are used.

- `dropped` / `dropped_pair`: dropout with the mask drawn in the kernel from Philox(seed, element
  index), so the backward pass draws the same mask again instead of keeping one; the pair can add its
  second result into a tensor in place (the fused LoRA layer's two input-gradient terms).
- `quantize_rows`: `longvu.fp8.quantize` per row (optionally after a per-column scale), the FP8 base's
  per-token quantization and, on rows of 128 values, the kept layers' FP8 blocks.
- `dequantize_rows`: its inverse.
- `transposed`: an FP8 code matrix copied transposed (the input-gradient matmul's operand layout).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

FP8_MAX = tl.constexpr(448.0)  # torch.finfo(torch.float8_e4m3fn).max
DROPOUT_LANES = 1024  # Philox counters per program: each yields 4 values, so a program covers 4096 elements


@triton.jit
def _drop_quarter(x_ptr, y_ptr, g_ptr, h_ptr, index, n, keep, scale, PAIR: tl.constexpr, ACCUMULATE: tl.constexpr):
    inside = index < n  # the products in fp32 (or the tensors' fp64): `scale` is an fp32 scalar
    x = tl.load(x_ptr + index, mask=inside)
    tl.store(y_ptr + index, tl.where(keep, x * scale, 0.0).to(y_ptr.dtype.element_ty), mask=inside)
    if PAIR:
        g = tl.where(keep, tl.load(g_ptr + index, mask=inside) * scale, 0.0)
        if ACCUMULATE:  # h += g: each element read, then written, by the same program
            g = g + tl.load(h_ptr + index, mask=inside).to(g.dtype)
        tl.store(h_ptr + index, g.to(h_ptr.dtype.element_ty), mask=inside)


@triton.jit
def _dropout_kernel(x_ptr, y_ptr, g_ptr, h_ptr, n, seed, p, scale, PAIR: tl.constexpr, ACCUMULATE: tl.constexpr,
                    LANES: tl.constexpr):
    program = tl.program_id(0).to(tl.int64)
    lanes = tl.arange(0, LANES)
    r0, r1, r2, r3 = tl.rand4x(seed, program * LANES + lanes)
    start = program * 4 * LANES + lanes
    _drop_quarter(x_ptr, y_ptr, g_ptr, h_ptr, start, n, r0 >= p, scale, PAIR, ACCUMULATE)
    _drop_quarter(x_ptr, y_ptr, g_ptr, h_ptr, start + LANES, n, r1 >= p, scale, PAIR, ACCUMULATE)
    _drop_quarter(x_ptr, y_ptr, g_ptr, h_ptr, start + 2 * LANES, n, r2 >= p, scale, PAIR, ACCUMULATE)
    _drop_quarter(x_ptr, y_ptr, g_ptr, h_ptr, start + 3 * LANES, n, r3 >= p, scale, PAIR, ACCUMULATE)


def _dropout_launch(x: torch.Tensor, g: torch.Tensor | None, p: float, seed: int,
                    accumulate: torch.Tensor | None = None):
    x = x.contiguous()
    g = None if g is None else g.contiguous()
    y = torch.empty_like(x)
    h = accumulate if accumulate is not None or g is None else torch.empty_like(g)
    n = x.numel()
    grid = (triton.cdiv(n, 4 * DROPOUT_LANES),)
    _dropout_kernel[grid](x, y, x if g is None else g, y if h is None else h, n, seed, p, 1.0 / (1.0 - p),
                          PAIR=g is not None, ACCUMULATE=accumulate is not None, LANES=DROPOUT_LANES, num_warps=4)
    return y, h


def dropped(x: torch.Tensor, p: float, seed: int) -> torch.Tensor:
    """x [any shape] -> x * keep / (1 - p), keep = Philox(seed, element index) >= p: element i of a
    contiguous x is kept with probability 1 - p, the same for every tensor of as many elements."""
    return _dropout_launch(x, None, p, seed)[0]


def dropped_pair(x: torch.Tensor, g: torch.Tensor, p: float, seed: int,
                 accumulate: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """`(dropped(x, p, seed), dropped(g, p, seed))` for tensors of one shape, in one pass; with
    `accumulate` (contiguous, of that shape) the second is added to it in place (in fp32, rounded once)
    and it is returned in the second's place."""
    for other in (g,) if accumulate is None else (g, accumulate):
        if x.shape != other.shape:
            raise ValueError(f"dropped_pair: shapes {tuple(x.shape)} and {tuple(other.shape)} differ")
    if accumulate is not None and not accumulate.is_contiguous():
        raise ValueError("dropped_pair: the accumulated tensor must be contiguous")
    return _dropout_launch(x, g, p, seed, accumulate)


@triton.jit
def _e4m3_bits(v):
    """fp32 values in [-448, 448] -> their e4m3fn codes as uint8, rounded to nearest even (as
    `Tensor.to(torch.float8_e4m3fn)`), in integer ops: the same on the GPU and in the interpreter."""
    bits = v.to(tl.uint32, bitcast=True)
    sign = ((bits >> 24) & 0x80).to(tl.uint8)
    magnitude = tl.abs(v)
    mag_bits = magnitude.to(tl.uint32, bitcast=True)
    # normal codes (|v| >= 2^-6): keep 3 of the 23 mantissa bits, round half to even, re-bias 127 -> 7
    normal = ((mag_bits + 0x7FFFF + ((mag_bits >> 20) & 1)) >> 20) - (120 << 3)
    # subnormal codes (|v| < 2^-6): the count of 2^-9 steps, rounded half to even by fp32 addition
    subnormal = ((magnitude * 512.0 + 8388608.0) - 8388608.0).to(tl.uint32)
    code = tl.where(magnitude < 0.015625, subnormal, normal)
    return sign | code.to(tl.uint8)


@triton.jit
def _scaled_tile(x_ptr, column_scale_ptr, row, row_inside, col, width, HAS_COLUMN_SCALE: tl.constexpr):
    """The [rows, cols] tile of x at (row, col) in fp32, times the column scales if given, and its mask."""
    inside = row_inside[:, None] & (col < width)[None, :]
    v = tl.load(x_ptr + row[:, None] * width + col[None, :], mask=inside, other=0.0).to(tl.float32)
    if HAS_COLUMN_SCALE:
        v = v * tl.load(column_scale_ptr + col, mask=col < width, other=0.0)[None, :]
    return v, inside


@triton.jit
def _quantize_rows_kernel(x_ptr, column_scale_ptr, codes_ptr, scale_ptr, rows, width,
                          HAS_COLUMN_SCALE: tl.constexpr, ROWS: tl.constexpr, COLS: tl.constexpr):
    row = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    row_inside = row < rows
    amax = tl.zeros([ROWS, COLS], tl.float32)
    for start in range(0, width, COLS):
        v, _ = _scaled_tile(x_ptr, column_scale_ptr, row, row_inside, start + tl.arange(0, COLS), width,
                            HAS_COLUMN_SCALE)
        amax = tl.maximum(amax, tl.abs(v))
    scale = tl.maximum(tl.max(amax, axis=1), 1e-12) / FP8_MAX
    for start in range(0, width, COLS):  # the second read of each row: from L2 where it fits
        col = start + tl.arange(0, COLS)
        v, inside = _scaled_tile(x_ptr, column_scale_ptr, row, row_inside, col, width, HAS_COLUMN_SCALE)
        codes = _e4m3_bits(tl.clamp(v / scale[:, None], -FP8_MAX, FP8_MAX))
        tl.store(codes_ptr + row[:, None] * width + col[None, :], codes, mask=inside)
    tl.store(scale_ptr + row, scale, mask=row_inside)


def _row_tiling(width: int) -> tuple[int, int]:
    """(rows, columns) a program of the row kernels takes at a time: whole narrow rows, chunks of wide ones."""
    cols = min(triton.next_power_of_2(width), 2048)
    return max(1, 4096 // cols), cols


def quantize_rows(x: torch.Tensor, column_scale: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] (times column_scale [1, K] fp32 first, if given) -> (codes [M, K] e4m3, scales [M, 1]
    fp32) with x ~= codes * scales: `longvu.fp8.quantize`'s per-row scales in one kernel."""
    if x.dim() != 2:
        raise ValueError(f"quantize_rows: x must be [M, K], got {tuple(x.shape)}")
    x = x.contiguous()
    rows, width = x.shape
    codes = torch.empty_like(x, dtype=torch.uint8)  # e4m3 bit patterns, viewed as float8 on return
    scales = torch.empty(rows, 1, dtype=torch.float32, device=x.device)
    block_rows, cols = _row_tiling(width)
    column = x if column_scale is None else column_scale.reshape(-1).float().contiguous()
    _quantize_rows_kernel[(triton.cdiv(rows, block_rows),)](
        x, column, codes, scales, rows, width, HAS_COLUMN_SCALE=column_scale is not None, ROWS=block_rows,
        COLS=cols, num_warps=8 if cols >= 1024 else 4)
    return codes.view(torch.float8_e4m3fn), scales


@triton.jit
def _e4m3_value(code):
    """uint8 e4m3fn codes (finite) -> their fp32 values, in integer ops like `_e4m3_bits`."""
    code = code.to(tl.uint32)
    exponent, mantissa = (code >> 3) & 0xF, code & 0x7
    normal = (((exponent + 120) << 23) | (mantissa << 20)).to(tl.float32, bitcast=True)
    magnitude = tl.where(exponent == 0, mantissa.to(tl.float32) * 0.001953125, normal)  # subnormals: 2^-9 steps
    return tl.where((code & 0x80) != 0, -magnitude, magnitude)


@triton.jit
def _dequantize_rows_kernel(codes_ptr, scale_ptr, out_ptr, rows, width, ROWS: tl.constexpr, COLS: tl.constexpr):
    row = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    row_inside = row < rows
    scale = tl.load(scale_ptr + row, mask=row_inside, other=0.0)
    for start in range(0, width, COLS):
        col = start + tl.arange(0, COLS)
        inside = row_inside[:, None] & (col < width)[None, :]
        codes = tl.load(codes_ptr + row[:, None] * width + col[None, :], mask=inside, other=0)
        tl.store(out_ptr + row[:, None] * width + col[None, :],
                 (_e4m3_value(codes) * scale[:, None]).to(out_ptr.dtype.element_ty), mask=inside)


def dequantize_rows(codes: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """quantize_rows' (codes [M, K], scales [M, 1]) -> codes * scales [M, K] in `dtype`."""
    rows, width = codes.shape
    out = torch.empty(rows, width, dtype=dtype, device=codes.device)
    block_rows, cols = _row_tiling(width)
    _dequantize_rows_kernel[(triton.cdiv(rows, block_rows),)](codes.contiguous().view(torch.uint8), scales.contiguous(), out, rows,
                                                            width, ROWS=block_rows, COLS=cols, num_warps=4)
    return out


@triton.jit
def _transpose_kernel(src_ptr, dst_ptr, rows, cols, TILE: tl.constexpr):
    row = tl.program_id(0).to(tl.int64) * TILE + tl.arange(0, TILE)
    col = tl.program_id(1).to(tl.int64) * TILE + tl.arange(0, TILE)
    inside = (row < rows)[:, None] & (col < cols)[None, :]
    tile = tl.load(src_ptr + row[:, None] * cols + col[None, :], mask=inside)
    tl.store(dst_ptr + col[:, None] * rows + row[None, :], tl.trans(tile), mask=tl.trans(inside))


def transposed(codes: torch.Tensor) -> torch.Tensor:
    """An FP8 matrix [R, C] (contiguous) -> the same values laid out as [C, R], contiguous."""
    if codes.dim() != 2 or not codes.is_contiguous():
        raise ValueError(f"transposed: needs a contiguous matrix, got {tuple(codes.shape)}")
    rows, cols = codes.shape
    src = codes.view(torch.uint8)
    dst = torch.empty(cols, rows, dtype=torch.uint8, device=codes.device)
    tile = 64
    _transpose_kernel[(triton.cdiv(rows, tile), triton.cdiv(cols, tile))](src, dst, rows, cols, TILE=tile, num_warps=4)
    return dst.view(codes.dtype)
