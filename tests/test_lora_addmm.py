"""LoRA's scaled sum with the base output in lora_B's GEMM (longvu.lora_addmm): peft's layer, its
names, outputs and gradients, one GEMM fewer passes; peft's own forward wherever it does more."""

import copy

import torch
from peft import LoraConfig, get_peft_model
from peft.tuners.lora.layer import Linear as PeftLoraLinear
from torch import nn

import longvu.lora_addmm as lora_addmm
from longvu.lora_addmm import AddmmLoraB, AddmmLoraLinear, fuse_lora_sums


def _peft_mlp(**lora):
    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8))
    model = get_peft_model(mlp, LoraConfig(r=4, lora_alpha=12, target_modules=["0", "2"], **lora))
    for name, p in model.named_parameters():
        if "lora_B" in name:  # adapters that move the output
            p.data.normal_()
    return model


def _output_and_grads(model, x):
    model.zero_grad()
    out = model(x)
    out.square().sum().backward()
    return out.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_the_fused_sum_is_peft_s_output_and_gradients_in_one_addmm_per_layer(monkeypatch):
    plain = _peft_mlp()
    fused = copy.deepcopy(plain)
    assert fuse_lora_sums(fused) == 2 and fuse_lora_sums(fused) == 0  # already fused
    layer = fused.base_model.model[0]
    assert type(layer) is AddmmLoraLinear and type(layer.lora_B["default"]) is AddmmLoraB
    assert list(fused.state_dict()) == list(plain.state_dict())
    calls = []
    real = torch.addmm
    monkeypatch.setattr(lora_addmm.torch, "addmm", lambda *a, **k: calls.append(k["alpha"]) or real(*a, **k))
    x = torch.randn(3, 5, 16)
    ours, ref = _output_and_grads(fused, x), _output_and_grads(plain, x)
    assert calls == [3.0, 3.0]  # alpha 12 / r 4, once per adapted layer
    torch.testing.assert_close(ours[0], ref[0], rtol=1e-5, atol=1e-6)
    assert ours[1].keys() == ref[1].keys() and len(ref[1]) == 4
    for name, grad in ref[1].items():
        torch.testing.assert_close(ours[1][name], grad, rtol=1e-5, atol=1e-5 * grad.abs().max().item())


def test_disabled_merged_and_several_adapters_run_peft_s_forward(monkeypatch):
    plain = _peft_mlp()
    fused = copy.deepcopy(plain)
    fuse_lora_sums(fused)
    calls = []
    real = torch.addmm
    monkeypatch.setattr(lora_addmm.torch, "addmm", lambda *a, **k: calls.append(1) or real(*a, **k))
    x = torch.randn(4, 16)
    with plain.disable_adapter():
        base_out = plain(x)
    with fused.disable_adapter():
        torch.testing.assert_close(fused(x), base_out)
    assert not torch.allclose(base_out, plain(x))
    fused.add_adapter("second", LoraConfig(r=2, target_modules=["0", "2"], init_lora_weights=False))
    fused.base_model.set_adapter(["default", "second"])
    two = fused(x)
    assert not torch.allclose(two, plain(x))  # both adapters count, through peft's own sum
    assert calls == []
    merged = copy.deepcopy(plain)
    fuse_lora_sums(merged)
    expected = plain(x)
    merged.merge_adapter()
    torch.testing.assert_close(merged(x), expected, rtol=1e-5, atol=1e-5)
    assert calls == []
    torch.testing.assert_close(merged.merge_and_unload()(x), expected, rtol=1e-5, atol=1e-5)
    assert not any(isinstance(m, PeftLoraLinear) for m in merged.modules())
