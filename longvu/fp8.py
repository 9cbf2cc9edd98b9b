"""FP8 (e4m3) matmuls for frozen weights, on PyTorch's own `torch._scaled_mm` (no extra dependency;
FP8 matrix units need a GPU of compute capability 8.9+, Ada or Hopper; the CPU runs the same op
slowly, which the tests use).

`Fp8Linear` (the vision towers) holds a frozen linear layer's weight quantized once, one scale per
output row; each call quantizes its input with one scale per token (row), multiplies in FP8 with fp32
accumulation and returns the input's dtype. Inference only: nothing there has a gradient (the towers
are frozen and their input, pixels, needs none). Plain tensor ops, so `torch.compile` fuses the
input's quantization into the kernels around each matmul.

`Fp8FrozenLinear` (the LLM's frozen base under LoRA, `lora.quantize: fp8`) is the same layer with a
backward: the input's gradient is an FP8 matmul too, the weight takes none.
"""

from __future__ import annotations

import weakref

import torch
from torch import nn

from longvu.kernels import runs_triton

FP8 = torch.float8_e4m3fn
FP8_MAX = torch.finfo(FP8).max  # 448
FP8_ALIGN = 16  # _scaled_mm on the GPU needs both matrix sides to be multiples of 16
FP8_CAPABILITY = (8, 9)  # the first CUDA compute capability with FP8 matrix units (Ada; Hopper is 9.0)


def require_fp8_units(device: torch.device | str) -> None:
    """RuntimeError if `device` is a CUDA GPU without FP8 matrix units (the CPU runs FP8 matmuls, slowly)."""
    device = torch.device(device)
    if device.type == "cuda" and torch.cuda.get_device_capability(device) < FP8_CAPABILITY:
        major, minor = torch.cuda.get_device_capability(device)
        raise RuntimeError(f"FP8 matmuls need a GPU of compute capability {FP8_CAPABILITY[0]}.{FP8_CAPABILITY[1]}+ "
                           f"(Ada, Hopper); {device} is {major}.{minor}")


def quantize(x: torch.Tensor, per_row: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """[M, K] -> (codes [M, K] e4m3, scales fp32) with x ~= codes * scales: one scale per row ([M, 1])
    or, `per_row=False`, one for the whole tensor ([])."""
    x = x.float()
    amax = x.abs().amax(dim=-1, keepdim=True) if per_row else x.abs().amax()
    scale = amax.clamp(min=1e-12) / FP8_MAX
    return (x / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8), scale


def fp8_matmul(rows: torch.Tensor, row_scale: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor,
               bias: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    """x @ W.T + bias [M, out] in `dtype` (the bias in the matmul's epilogue), from x quantized (rows
    [M, in] e4m3, row_scale [M, 1] or []) and W = codes [out, in] * scale ([1, out] or [])."""
    return torch._scaled_mm(rows, codes.t(), scale_a=row_scale, scale_b=scale,
                            bias=None if bias is None else bias.to(dtype), out_dtype=dtype)


class Fp8Linear(nn.Module):
    """A frozen `nn.Linear` [.., in] -> [.., out] with its matmul in FP8: per-row weight and per-token
    input scales (`per_row=False`: one scale for the weight and one per call for the input, coarser
    but cuBLAS's fastest FP8 kernel); the bias is added in the matmul's epilogue."""

    def __init__(self, linear: nn.Linear, per_row: bool = True, persistent: bool = True):
        super().__init__()
        self.in_features, self.out_features, self.per_row = linear.in_features, linear.out_features, per_row
        codes, scale = quantize(linear.weight.detach(), per_row)
        # buffers, not parameters: frozen, and `.to(device)` moves them like any other tensor
        self.register_buffer("weight_fp8", codes, persistent)  # [out, in]
        self.register_buffer("weight_scale", scale.reshape(1, -1) if per_row else scale, persistent)  # [1, out] or []
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach().clone(), persistent)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows, row_scale = quantize(x.reshape(-1, self.in_features), self.per_row)
        out = fp8_matmul(rows, row_scale, self.weight_fp8, self.weight_scale, self.bias, x.dtype)
        return out.reshape(*x.shape[:-1], self.out_features)

    def _apply(self, fn, recurse=True):
        """Moves between devices like any module but keeps its dtypes: a model-wide `.to(bf16)` must
        not turn the FP8 codes or their fp32 scales into operands `_scaled_mm` refuses."""
        for name, buf in self._buffers.items():
            if buf is not None:
                self._buffers[name] = buf.to(fn(buf.new_empty(0)).device)
        return self

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"per_row={self.per_row}")


def fp8_linears(module: nn.Module, per_row: bool = True) -> int:
    """Replace every `nn.Linear` under `module` whose sides are multiples of FP8_ALIGN by an Fp8Linear,
    in place -> the number replaced. ValueError if no layer qualifies (nothing would run in FP8)."""
    targets = [(name, child) for name, child in module.named_modules()
               if isinstance(child, nn.Linear) and not (child.in_features % FP8_ALIGN or child.out_features % FP8_ALIGN)]
    if not targets:
        raise ValueError(f"{type(module).__name__}: no linear layer with both sides a multiple of {FP8_ALIGN}")
    for name, child in targets:
        parent, _, leaf = name.rpartition(".")
        setattr(module.get_submodule(parent), leaf, Fp8Linear(child, per_row))
    return len(targets)


def _scaled_rows(x: torch.Tensor, column_scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`quantize(x * column_scale)` per row: x [M, K], column_scale [1, K] fp32."""
    return quantize(x.float() * column_scale)


_compiled: dict[str, object] = {}


def compiled_on_gpu(name: str, fn, *args):
    """`fn(*args)`, compiled on a CUDA GPU (one fused kernel instead of ~6 passes over the activations;
    dynamic shapes, as the token count changes from step to step; `name` keys the compiled function),
    eager elsewhere."""
    if not args[0].is_cuda:
        return fn(*args)
    if name not in _compiled:
        _compiled[name] = torch.compile(fn, dynamic=True)
    return _compiled[name](*args)


def _token_rows(x: torch.Tensor, column_scale: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] (times column_scale [1, K] fp32 first, if given) -> `quantize` of it, per-token scales;
    one Triton kernel on a GPU."""
    with torch.no_grad():
        if runs_triton(x):
            from longvu.triton_kernels import quantize_rows

            return quantize_rows(x, column_scale)
        if column_scale is None:
            return compiled_on_gpu("rows", quantize, x)
        return compiled_on_gpu("scaled_rows", _scaled_rows, x.contiguous(), column_scale)


class SharedInput:
    """One input read by several FP8 layers in turn (a decoder layer's q/k/v projections, its gate and
    up): the first quantizes it, the others reuse its rows, and they are dropped after the last reader
    (or as soon as another input comes). Holds a weak reference to the input, checked with its version."""

    def __init__(self, readers: int):
        self.readers = readers
        self._input = self._rows = None
        self._version, self._left = -1, 0

    def rows(self, x: torch.Tensor, x2d: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The per-token rows of `x` (x2d: it as [M, K])."""
        if x.is_inference():  # no version counter to tell an in-place change: quantized by each reader
            return _token_rows(x2d)
        if self._left and self._input() is x and x._version == self._version:
            rows, self._left = self._rows, self._left - 1
        else:
            rows, self._left = _token_rows(x2d), self.readers - 1
            self._input, self._version = weakref.ref(x), x._version
        self._rows = rows if self._left else None
        return rows


class _Fp8InputGradMatmul(torch.autograd.Function):
    """x [M, in] -> x @ W.T + bias with W = codes [out, in] * scale [1, out] (per output row), given x's
    per-token FP8 rows; the backward's input gradient grad [M, out] @ W is an FP8 matmul too: W's row
    scales are folded into the gradient's columns, which is then quantized per row against the codes."""

    @staticmethod
    def forward(ctx, x, codes, scale, bias, rows, row_scale):
        ctx.save_for_backward(codes, scale)
        return fp8_matmul(rows, row_scale, codes, scale, bias, x.dtype)

    @staticmethod
    def backward(ctx, grad):
        codes, scale = ctx.saved_tensors
        return fp8_input_grad(grad, codes, scale), None, None, None, None, None


def fp8_input_grad(grad: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """grad [M, out] @ W -> [M, in] for W = codes [out, in] * scale [1, out], as an FP8 matmul: W's row
    scales are folded into the gradient's columns, which is then quantized per row against the codes."""
    rows, row_scale = _token_rows(grad, scale)
    # _scaled_mm takes its second operand column-major: [out, in] as the transpose of a contiguous [in, out]
    if runs_triton(codes):
        from longvu.triton_kernels import transposed

        codes_t = transposed(codes).t()
    else:
        codes_t = codes.t().contiguous().t()
    ones = scale.new_ones(1, codes.shape[1])
    return torch._scaled_mm(rows, codes_t, scale_a=row_scale, scale_b=ones, out_dtype=grad.dtype)


class Fp8FrozenLinear(Fp8Linear):
    """A frozen linear layer of a model that trains around it (LoRA's base): `Fp8Linear`'s forward
    (per-row weight, per-token input scales) with a backward that gives the input's gradient, also in
    FP8 (the gradient quantized per token). Its buffers are not saved with the model (they are the
    base weights, rebuilt from the run's `model.init`). `shared_input`: the SharedInput of the layers
    that read the same input, if any."""

    def __init__(self, linear: nn.Linear):
        super().__init__(linear, per_row=True, persistent=False)
        self.shared_input: SharedInput | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x2d = x.reshape(-1, self.in_features)
        out = _Fp8InputGradMatmul.apply(x2d, self.weight_fp8, self.weight_scale, self.bias, *self.input_rows(x, x2d))
        return out.reshape(*x.shape[:-1], self.out_features)

    def input_rows(self, x: torch.Tensor, x2d: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The per-token FP8 rows of this layer's input `x` (x2d: it as [M, in]), shared with the layers
        that read it too."""
        return _token_rows(x2d) if self.shared_input is None else self.shared_input.rows(x, x2d)


def frozen_fp8_linears(module: nn.Module, device: torch.device | str | None = None) -> int:
    """Replace every frozen `nn.Linear` under `module` (weight and bias without gradients) by an
    Fp8FrozenLinear, quantized and left on `device` (default: where it is), in place -> the number
    replaced. LoRA adapters (peft's `lora_*` modules) are never converted, even when frozen (a peft
    model loaded for inference). ValueError naming the first layer whose sides are not multiples of
    FP8_ALIGN (it would have to stay in full precision); nothing is replaced then."""
    targets = [(name, child) for name, child in module.named_modules() if type(child) is nn.Linear
               and not any(p.requires_grad for p in child.parameters())
               and not any(part.startswith("lora_") for part in name.split("."))]
    for name, child in targets:
        if child.in_features % FP8_ALIGN or child.out_features % FP8_ALIGN:
            raise ValueError(f"{name}: {child.in_features} -> {child.out_features} features, not multiples of "
                             f"{FP8_ALIGN} as FP8 matmuls need")
    for name, child in targets:
        parent, _, leaf = name.rpartition(".")
        setattr(module.get_submodule(parent), leaf, Fp8FrozenLinear(child if device is None else child.to(device)))
    return len(targets)


def fp8_buffer_bytes(module: nn.Module) -> int:
    """Bytes of the Fp8Linear weights under `module`: codes, scales and biases."""
    return sum(t.numel() * t.element_size() for m in module.modules() if isinstance(m, Fp8Linear)
               for t in m._buffers.values() if t is not None)
