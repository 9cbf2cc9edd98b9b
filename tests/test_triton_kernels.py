"""longvu/triton_kernels.py under Triton's interpreter (TRITON_INTERPRET=1, the kernels' own code run
on the CPU): each kernel against the PyTorch ops it replaces, and the modules that call it on a GPU
(LoRA dropout, the FP8 LoRA base, kept layers' FP8 blocks) against their PyTorch paths.

The interpreter must be on before triton is first imported (triton.language's own helpers, Philox
among them, are bound then), so each case runs in a fresh interpreter process."""

import importlib
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from longvu.fp8 import Fp8FrozenLinear, quantize
from longvu.kept_activations import Fp8Held
from longvu.kernels import runs_triton, set_triton_passes
from longvu.lora_dropout import _DroppedInputLinear


def _kernels():
    """longvu.triton_kernels, its kernels interpreted (checked: this process imported triton under the interpreter)."""
    from triton.runtime.interpreter import InterpretedFunction

    assert os.environ.get("TRITON_INTERPRET") == "1"
    module = importlib.import_module("longvu.triton_kernels")
    assert isinstance(module._dropout_kernel, InterpretedFunction)
    return module


def _e4m3_range() -> torch.Tensor:
    """fp32 values over e4m3's whole range: every decade, the subnormals, ties and the limits."""
    values = torch.cat([torch.linspace(-448, 448, 20001), torch.logspace(-11, 2.65, 20000),
                        -torch.logspace(-11, 2.65, 20000),
                        torch.tensor([0.0, -0.0, 2.0**-6, 2.0**-7, 2.0**-9, 2.0**-10, 1.5 * 2.0**-9, 2.5 * 2.0**-9,
                                      168.0, 176.0, 184.0, 232.0, 240.0, 13.0, 15.0, 16.0 + 2.0 ** -20])])
    values = values[values.abs() <= 448]
    rows = values[: values.numel() // 128 * 128].reshape(-1, 128).clone()
    rows[:, 0] = 448.0  # every row's amax: scale 448 / 448 = 1, the values are their own codes' inputs
    return rows


def case_row_quantization_is_longvu_fp8_quantize_bit_for_bit():
    tk = _kernels()
    torch.manual_seed(0)
    for width in (128, 300, 2500):  # one chunk, a masked chunk, two chunks of 2048
        x = (torch.randn(7, width) * torch.logspace(-3, 2, 7)[:, None]).to(torch.bfloat16)
        column = torch.rand(1, width) + 0.5
        for ours, ref in ((tk.quantize_rows(x), quantize(x)), (tk.quantize_rows(x, column), quantize(x.float() * column))):
            assert torch.equal(ours[0].view(torch.uint8), ref[0].view(torch.uint8))
            assert torch.equal(ours[1], ref[1]) and ours[1].shape == (7, 1)
    rows = _e4m3_range()  # the e4m3 rounding itself, done in integer ops, against torch's cast
    codes, scales = tk.quantize_rows(rows)
    assert torch.equal(scales, torch.ones(rows.shape[0], 1))
    assert torch.equal(codes.view(torch.uint8), rows.to(torch.float8_e4m3fn).view(torch.uint8))
    with pytest.raises(ValueError, match=r"must be \[M, K\]"):
        tk.quantize_rows(rows.reshape(-1))


def case_dequantization_is_codes_times_scales():
    tk = _kernels()
    rows = _e4m3_range()
    codes = rows.to(torch.float8_e4m3fn)
    scales = torch.logspace(-4, 4, rows.shape[0])[:, None]
    torch.testing.assert_close(tk.dequantize_rows(codes, scales, torch.float32), codes.float() * scales, rtol=0, atol=0)
    # bf16: the interpreter rounds its casts toward zero where the GPU rounds to nearest, one bf16 step apart at most
    torch.testing.assert_close(tk.dequantize_rows(codes, scales, torch.bfloat16).float(),
                               (codes.float() * scales).bfloat16().float(), rtol=2**-7, atol=0)


def case_transposed_codes_are_the_transpose():
    tk = _kernels()
    codes = torch.randn(70, 130).to(torch.float8_e4m3fn)  # not multiples of the 64-value tiles
    out = tk.transposed(codes)
    assert out.dtype == torch.float8_e4m3fn and out.is_contiguous()
    assert torch.equal(out.view(torch.uint8), codes.t().contiguous().view(torch.uint8))
    with pytest.raises(ValueError, match="contiguous matrix"):
        tk.transposed(codes.t())


def case_dropout_draws_a_mask_from_its_seed_keeps_1_minus_p_and_scales_by_1_over_1_minus_p():
    tk = _kernels()
    torch.manual_seed(0)
    x = torch.randn(50, 2049)  # 102,450 values: not a multiple of a program's 4,096
    out = tk.dropped(x, 0.3, seed=2**40 + 5)  # a seed beyond 32 bits, as lora_dropout draws them
    kept = out != 0
    assert abs(kept.float().mean().item() - 0.7) < 0.01  # 7 standard deviations
    assert torch.equal(out[kept], x[kept] * (1 / 0.7)) and torch.equal(out[~kept], torch.zeros_like(out[~kept]))
    flat = kept.reshape(-1).float()
    for lag in (1, 1024, 4096):  # independent draws: neighbours, the program's four quarters, programs
        agree = (flat[lag:] == flat[:-lag]).float().mean().item()
        assert abs(agree - (0.3**2 + 0.7**2)) < 0.015, (lag, agree)
    assert torch.equal(tk.dropped(x, 0.3, seed=2**40 + 5), out)  # a pure function of the seed
    assert (tk.dropped(x, 0.3, seed=6) != 0).ne(kept).float().mean() > 0.3  # another seed, another mask
    g = torch.randn_like(x).double()  # the pair: the same mask on a second tensor, whatever its dtype
    pair = tk.dropped_pair(x, g, 0.3, seed=2**40 + 5)
    assert torch.equal(pair[0], out) and torch.equal(pair[1] != 0, kept) and pair[1].dtype == torch.float64
    with pytest.raises(ValueError, match="shapes"):
        tk.dropped_pair(x, g[:, :5], 0.3, seed=1)


def case_the_dropout_pair_accumulates_its_second_result_in_place():
    tk = _kernels()
    torch.manual_seed(0)
    x, g, total = torch.randn(30, 300), torch.randn(30, 300), torch.randn(30, 300)
    before = total.clone()
    dropped_x, summed = tk.dropped_pair(x, g, 0.25, 99, accumulate=total)
    assert summed is total  # in place: no third buffer
    plain = tk.dropped_pair(x, g, 0.25, 99)
    assert torch.equal(dropped_x, plain[0])
    torch.testing.assert_close(summed, before + plain[1], rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="contiguous"):
        tk.dropped_pair(x, g, 0.25, 99, accumulate=torch.randn(300, 30).t())
    with pytest.raises(ValueError, match="shapes"):
        tk.dropped_pair(x, g, 0.25, 99, accumulate=torch.randn(30, 299))


def case_fused_lora_with_the_kernels_has_peft_s_values_and_gradients():
    _kernels()
    import copy

    import test_fused_lora as fl

    for base in ("full", "fp8"):
        plain = fl._peft_lm(0.2)
        if base == "fp8":
            for layer in plain.base_model.model.model.layers:
                fl.frozen_fp8_linears(layer)
        fused = copy.deepcopy(plain)
        fl.fuse_lora_layers(fused)
        input_ids = torch.randint(64, (2, 16))
        assert runs_triton(input_ids)
        ref, (out, grads) = fl._loss_and_grads(plain, input_ids), fl._loss_and_grads(fused, input_ids)
        torch.testing.assert_close(out, ref[0], rtol=1e-5, atol=1e-6)
        for name, grad in grads.items():
            torch.testing.assert_close(grad, ref[1][name], rtol=1e-5, atol=1e-7, msg=name)


def case_lora_dropout_with_the_kernels_has_the_gradient_of_its_forward():
    tk = _kernels()
    x = torch.randn(3, 5, 6, dtype=torch.float64, requires_grad=True)
    w = torch.randn(4, 6, dtype=torch.float64, requires_grad=True)
    assert runs_triton(x)
    assert torch.autograd.gradcheck(lambda x, w: _DroppedInputLinear.apply(x, w, 0.3, 1234), (x, w))
    out = _DroppedInputLinear.apply(x, w, 0.3, 1234)  # and its forward is the kernel's dropout
    torch.testing.assert_close(out, torch.nn.functional.linear(tk.dropped(x, 0.3, 1234), w), rtol=0, atol=0)


def case_fp8_base_and_fp8_blocks_with_the_kernels_equal_their_pytorch_paths():
    tk = _kernels()
    torch.manual_seed(0)
    layer = Fp8FrozenLinear(torch.nn.Linear(96, 80, bias=True).to(torch.bfloat16))
    x = torch.randn(2, 9, 96, dtype=torch.bfloat16)
    gate = torch.randn(2, 9, 256)  # fp32: the interpreter's bf16 casts round toward zero, the GPU's to nearest
    results = []
    for triton_passes in (True, False):
        set_triton_passes(triton_passes)
        assert runs_triton(x) is triton_passes
        xi = x.clone().requires_grad_(True)
        out = layer(xi)
        out.backward(torch.linspace(-2, 3, out.numel()).reshape(out.shape).to(out.dtype))
        held = Fp8Held(gate)
        results.append((out, xi.grad, held.codes.view(torch.uint8), held.scales, held.value()))
    for ours, ref in zip(*results):
        assert torch.equal(ours, ref)


CASES = sorted(name for name in globals() if name.startswith("case_"))


@pytest.mark.parametrize("case", CASES)
def test_under_the_interpreter(case):
    """Run `case` in a fresh process with TRITON_INTERPRET=1; its assertion, if any, is the failure shown."""
    tests = Path(__file__).parent
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    code = f"import sys; sys.path[:0] = [{str(tests)!r}, {str(tests.parent)!r}]; import test_triton_kernels as t; t.{case}()"
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
