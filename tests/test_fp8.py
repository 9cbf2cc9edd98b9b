"""FP8 matmuls of the frozen towers and of LoRA's frozen base (`longvu.fp8`), on the CPU's `torch._scaled_mm`."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from longvu.fp8 import FP8_MAX, Fp8Linear, fp8_linears
from longvu.tiny import TINY_DINO, tiny_model


def _rounded(t: torch.Tensor, dims) -> torch.Tensor:
    """t rounded to e4m3 after scaling its max |value| over `dims` to 448, scaled back (fp32)."""
    scale = t.abs().amax(dim=dims, keepdim=True) / 448.0
    return (t / scale).to(torch.float8_e4m3fn).float() * scale


@pytest.mark.parametrize("per_row", [True, False])
def test_fp8_linear_is_the_matmul_of_its_rounded_operands(per_row):
    torch.manual_seed(0)
    linear = nn.Linear(64, 48)
    x = torch.randn(3, 5, 64) * torch.logspace(-2, 1, 5).view(1, 5, 1)  # rows of very different sizes
    dims = (-1,) if per_row else (0, 1)
    expected = _rounded(x.reshape(15, 64), dims) @ _rounded(linear.weight.detach(), dims).t() + linear.bias.detach()
    out = Fp8Linear(linear, per_row=per_row)(x)
    assert out.shape == (3, 5, 48) and out.dtype == torch.float32
    torch.testing.assert_close(out.reshape(15, 48), expected, rtol=1e-5, atol=1e-5)
    exact = linear(x).detach()
    error = (out - exact).abs().max() / exact.abs().max()
    assert 0 < error < 0.05  # really rounded to 3 mantissa bits, and no further
    assert FP8_MAX == 448


def test_fp8_linear_keeps_its_dtypes_when_the_model_is_cast():
    torch.manual_seed(0)
    layer = nn.Sequential(Fp8Linear(nn.Linear(32, 16)))
    x = torch.randn(4, 32)
    before = layer(x)
    layer.to(torch.bfloat16)
    fp8 = layer[0]
    assert (fp8.weight_fp8.dtype, fp8.weight_scale.dtype) == (torch.float8_e4m3fn, torch.float32)
    out = layer(x.bfloat16())
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), before, rtol=2e-2, atol=2e-2)  # bf16 input and output rounding


def test_per_row_scales_keep_small_rows_that_one_scale_loses():
    torch.manual_seed(0)
    linear = nn.Linear(32, 16, bias=False)
    x = torch.randn(2, 32)
    x[1] *= 1e-4  # a row far below the other: one tensor-wide scale flushes much of it to zero
    exact = linear(x).detach()
    row_error = ((Fp8Linear(linear)(x) - exact)[1].abs().max() / exact[1].abs().max()).item()
    tensor_error = ((Fp8Linear(linear, per_row=False)(x) - exact)[1].abs().max() / exact[1].abs().max()).item()
    assert row_error < 0.05 < tensor_error


def test_fp8_linears_converts_the_aligned_layers_and_refuses_a_module_with_none():
    block = nn.Sequential(nn.Linear(48, 64), nn.GELU(), nn.Linear(64, 40), nn.Linear(40, 48))
    assert fp8_linears(block) == 1
    assert isinstance(block[0], Fp8Linear) and type(block[2]) is nn.Linear and type(block[3]) is nn.Linear
    assert not any(isinstance(p, torch.Tensor) and p.dtype == torch.float8_e4m3fn for p in block[0].parameters())
    assert block[0].weight_fp8.dtype == torch.float8_e4m3fn
    with pytest.raises(ValueError, match="^Sequential: no linear layer with both sides a multiple of 16$"):
        fp8_linears(nn.Sequential(nn.Linear(40, 24)))


def test_fp8_towers_keep_their_features_and_their_unused_head():
    config = dict(dino_config=dict(TINY_DINO, hidden_size=48))  # the tiny DINO's 40 is not FP8-aligned
    reference = tiny_model("video", **config).model.towers
    towers = tiny_model("video", **config).model.towers
    siglip, dino = towers
    linears = [sum(isinstance(m, nn.Linear) for m in t.vision_tower.encoder.modules()) for t in towers]
    assert [siglip.quantize_fp8(), dino.quantize_fp8()] == linears == [12, 14]  # 6 per SigLIP layer, 7 per DINO
    assert not any(isinstance(m, nn.Linear) and not isinstance(m, Fp8Linear) for t in towers
                   for m in t.vision_tower.encoder.modules())
    head = siglip.vision_tower.head  # SigLIP's pooling head, which LongVU skips, keeps its layers
    assert any(isinstance(m, nn.Linear) for m in head.modules())
    assert not any(isinstance(m, Fp8Linear) for m in head.modules())
    torch.manual_seed(1)
    for tower, ref, size in zip(towers, reference, (55, 54)):
        pixels = torch.randn(3, 3, size, size)
        out, expected = tower(pixels), ref(pixels)
        assert out.shape == expected.shape
        assert F.cosine_similarity(out, expected, dim=-1).min() > 0.99
        assert not torch.equal(out, expected)


def test_fp8_frozen_linear_backward_is_the_fp8_matmul_of_the_scaled_gradient():
    """lora.quantize fp8: the input's gradient grad @ W through FP8, the weight's row scales folded
    into the gradient's columns before its per-token rounding; no parameter, nothing saved."""
    from longvu.fp8 import Fp8FrozenLinear

    torch.manual_seed(0)
    linear = nn.Linear(64, 48).requires_grad_(False)
    layer = Fp8FrozenLinear(linear)
    x = (torch.randn(3, 5, 64) * torch.logspace(-2, 1, 5).view(1, 5, 1)).requires_grad_(True)
    out = layer(x)
    expected = _rounded(x.detach().reshape(15, 64), (-1,)) @ _rounded(linear.weight, (-1,)).t() + linear.bias
    torch.testing.assert_close(out.detach().reshape(15, 48), expected, rtol=1e-5, atol=1e-5)
    grad = torch.randn(3, 5, 48) * torch.logspace(1, -2, 5).view(1, 5, 1)
    out.backward(grad)
    codes, scale = layer.weight_fp8.float(), layer.weight_scale  # [48, 64], [1, 48]
    expected_grad = _rounded(grad.reshape(15, 48) * scale, (-1,)) @ codes
    torch.testing.assert_close(x.grad.reshape(15, 64), expected_grad, rtol=1e-5, atol=1e-6)
    exact = grad.reshape(15, 48) @ linear.weight
    error = (x.grad.reshape(15, 64) - exact).abs().amax(-1) / exact.abs().amax(-1)
    assert 0 < error.max() < 0.06  # every row (of very different sizes) within FP8's rounding
    assert list(layer.parameters()) == [] and layer.state_dict() == {}


def test_an_fp8_lora_base_trains_only_the_adapters_and_stays_close_to_the_full_base():
    from longvu.quantize import quantize_llm_fp8
    from test_train import _fixed_batch
    from train.config import RunConfig
    from train.model_setup import apply_lora, set_trainable

    config = RunConfig()
    config.lora.enabled, config.lora.quantize, config.lora.dropout = True, "fp8", 0.0
    models = []
    for _ in range(2):
        model = tiny_model("video")
        set_trainable(model, config)
        models.append(apply_lora(model, config))
    full, fp8 = models
    for model in models:  # adapters that already changed the output, the same in both
        torch.manual_seed(3)
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.data.normal_(0, 0.05)
    trained_before = {n: p.dtype for n, p in fp8.named_parameters() if p.requires_grad}
    keys_before = set(fp8.state_dict())
    frozen = copy.deepcopy(fp8).requires_grad_(False)  # as peft loads an adapter for inference
    assert quantize_llm_fp8(frozen.get_base_model()) == 2 * 7  # the base layers, never the adapters
    assert quantize_llm_fp8(fp8.get_base_model()) == 2 * 7
    assert {n: p.dtype for n, p in fp8.named_parameters() if p.requires_grad} == trained_before
    assert set(fp8.state_dict()) == keys_before - {k for k in keys_before if "base_layer.weight" in k
                                                   or "base_layer.bias" in k}
    losses = []
    for model in models:
        loss = model(**_fixed_batch()).loss
        loss.backward()
        losses.append(loss.item())
    assert abs(losses[1] - losses[0]) < 0.02 * abs(losses[0])
    grads = {n: (p.grad, dict(fp8.named_parameters())[n].grad) for n, p in full.named_parameters() if "lora_A" in n}
    assert len(grads) == 14 and all(b is not None and b.abs().max() > 0 for _, b in grads.values())
    cosine = min(F.cosine_similarity(a.flatten(), b.flatten(), dim=0).item() for a, b in grads.values())
    assert cosine > 0.99, cosine  # the adapters learn what they would over the full-precision base


def test_projections_that_read_one_input_quantize_it_once(monkeypatch):
    """q/k/v and gate/up of an FP8 LoRA base share one per-token quantization of their input; the
    outputs and gradients are those of quantizing it in each projection."""
    import longvu.fp8 as fp8
    from longvu.quantize import quantize_llm_fp8
    from test_train import _fixed_batch
    from train.config import RunConfig
    from train.model_setup import apply_lora, set_trainable

    config = RunConfig()
    config.lora.enabled, config.lora.quantize, config.lora.dropout = True, "fp8", 0.0
    model = tiny_model("video")
    set_trainable(model, config)
    shared = apply_lora(model, config)
    torch.manual_seed(3)
    for name, p in shared.named_parameters():
        if "lora_B" in name:
            p.data.normal_(0, 0.05)
    quantize_llm_fp8(shared.get_base_model())
    apart = copy.deepcopy(shared)
    for module in apart.modules():
        if isinstance(module, fp8.Fp8FrozenLinear):
            module.shared_input = None
    quantized = []
    real = fp8._token_rows
    monkeypatch.setattr(fp8, "_token_rows", lambda x, *scale: quantized.append(x.shape) or real(x, *scale))
    results = []
    for model, per_layer in ((shared, 4), (apart, 7)):  # q/k/v, o, gate/up, down: 4 inputs for 7 projections
        quantized.clear()
        loss = model(**_fixed_batch()).loss
        assert len(quantized) == 2 * per_layer
        loss.backward()
        results.append((loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}))
    (loss_a, grads_a), (loss_b, grads_b) = results
    assert torch.equal(loss_a, loss_b) and grads_a.keys() == grads_b.keys()
    assert all(torch.equal(grads_a[n], grads_b[n]) for n in grads_a)
    layer = shared.get_base_model().model.layers[0].self_attn
    assert layer.q_proj.base_layer.shared_input._rows is None  # nothing held after the last reader
    x = torch.randn(5, layer.q_proj.base_layer.in_features)  # an input changed in place is quantized again
    quantized.clear()
    layer.q_proj.base_layer(x)
    x.mul_(2)
    layer.k_proj.base_layer(x)
    assert len(quantized) == 2
