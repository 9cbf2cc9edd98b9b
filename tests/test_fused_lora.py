"""Each LoRA layer as one autograd op (longvu.fused_lora): peft's values and gradients, peft's names,
and peft's own forward wherever the fused one does not apply."""

import copy

import pytest
import torch
from peft import LoraConfig, get_peft_model
from peft.tuners import lora
from torch.utils.checkpoint import checkpoint

from longvu.fp8 import frozen_fp8_linears
from longvu.fused_lora import FusedLoraLinear, fuse_lora_layers
from longvu.lora_dropout import fold_lora_dropout

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _peft_lm(p: float, **lora_options):
    """A 2-layer Qwen2 (sides multiples of 16, as FP8 needs) under peft LoRA, its dropout folded, fp32."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    lm = Qwen2ForCausalLM(Qwen2Config(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=1, max_position_embeddings=64))
    model = get_peft_model(lm, LoraConfig(r=4, lora_alpha=8, lora_dropout=p, target_modules=TARGETS,
                                          init_lora_weights=False, **lora_options))
    fold_lora_dropout(model)
    return model


def _fused_calls(run) -> int:
    """How many times a LoRA layer ran the fused op during `run()`."""
    from unittest import mock

    from longvu import fused_lora

    with mock.patch.object(fused_lora._LoraOverFrozen, "apply", wraps=fused_lora._LoraOverFrozen.apply) as spy:
        run()
    return spy.call_count


def _loss_and_grads(model, input_ids, seed: int = 5):
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)  # the dropout seeds each layer draws
    logits = model(input_ids=input_ids).logits
    logits.pow(2).mean().backward()
    return logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("p", [0.0, 0.2])
@pytest.mark.parametrize("base", ["full", "fp8"])
def test_fused_layers_give_peft_outputs_and_gradients(p, base):
    plain = _peft_lm(p)
    if base == "fp8":
        for layer in plain.base_model.model.model.layers:
            frozen_fp8_linears(layer)
    fused = copy.deepcopy(plain)
    assert fuse_lora_layers(fused) == 2 * len(TARGETS)
    input_ids = torch.randint(64, (2, 16))
    ref = _loss_and_grads(plain, input_ids)
    result = {}
    assert _fused_calls(lambda: result.setdefault("r", _loss_and_grads(fused, input_ids))) == 2 * len(TARGETS)
    out, grads = result["r"]
    torch.testing.assert_close(out, ref[0], rtol=1e-5, atol=1e-6)
    assert grads.keys() == ref[1].keys() and any("lora_A" in n for n in grads) and any("lora_B" in n for n in grads)
    for name, grad in grads.items():
        torch.testing.assert_close(grad, ref[1][name], rtol=1e-5, atol=1e-7, msg=name)
    assert list(fused.state_dict()) == list(plain.state_dict())


def test_dropout_is_on_in_training_and_off_in_eval():
    fused = _peft_lm(0.5)
    fuse_lora_layers(fused)
    input_ids = torch.randint(64, (1, 12))
    torch.manual_seed(1)
    a = fused(input_ids=input_ids).logits
    torch.manual_seed(2)
    b = fused(input_ids=input_ids).logits
    assert not torch.allclose(a, b)  # a new mask per call
    fused.eval()
    with torch.no_grad():
        torch.testing.assert_close(fused(input_ids=input_ids).logits, fused(input_ids=input_ids).logits, rtol=0, atol=0)
        assert _fused_calls(lambda: fused(input_ids=input_ids)) == 2 * len(TARGETS)


def test_recomputation_under_activation_checkpointing_gives_the_same_gradients():
    model = _peft_lm(0.3)
    fuse_lora_layers(model)
    layer = model.base_model.model.model.layers[0].mlp
    x = torch.randn(2, 8, 64, requires_grad=True)
    results = []
    for recompute in (False, True):
        torch.manual_seed(7)
        model.zero_grad(set_to_none=True)
        x.grad = None
        out = checkpoint(layer, x, use_reentrant=False) if recompute else layer(x)
        out.pow(2).sum().backward()
        results.append([out.detach(), x.grad.clone()] + [p.grad.clone() for p in layer.parameters() if p.grad is not None])
    assert len(results[0]) == 2 + 6  # gate, up and down: lora_A and lora_B each
    for plain, recomputed in zip(*results):
        torch.testing.assert_close(recomputed, plain, rtol=0, atol=0)


def _peft_forward(layer, x):
    return lora.Linear.forward(layer, x)


def test_what_the_fused_op_does_not_cover_takes_peft_forward():
    input_ids = torch.randint(64, (1, 10))
    x = torch.randn(1, 10, 64)

    def q_proj(model):
        return model.base_model.model.model.layers[0].self_attn.q_proj

    cases = {}
    merged = _peft_lm(0.0)
    fuse_lora_layers(merged)
    q_proj(merged).merge()
    cases["merged"] = merged
    disabled = _peft_lm(0.0)
    fuse_lora_layers(disabled)
    cases["disabled"] = disabled
    dora = _peft_lm(0.0, use_dora=True)
    cases["dora"] = dora
    biased = _peft_lm(0.0, lora_bias=True)
    cases["lora bias"] = biased
    partitioned = _peft_lm(0.0)
    q_proj(partitioned).lora_A["default"].weight.ds_id = 3  # as DeepSpeed ZeRO-3 marks its parameters
    cases["zero-3"] = partitioned
    for name, model in cases.items():
        assert fuse_lora_layers(model) == (0 if name in ("merged", "disabled") else 2 * len(TARGETS)), name
        layer = q_proj(model)
        assert type(layer) is FusedLoraLinear
        if name == "disabled":
            with model.disable_adapter():
                assert _fused_calls(lambda: layer(x)) == 0
                torch.testing.assert_close(layer(x), layer.base_layer(x), rtol=0, atol=0)
            continue
        assert _fused_calls(lambda: layer(x)) == 0, name
        torch.testing.assert_close(layer(x), _peft_forward(layer, x), rtol=0, atol=0, msg=name)
    with torch.no_grad():  # several active adapters: peft's sum over them
        two = _peft_lm(0.0)
        two.add_adapter("second", LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, init_lora_weights=False))
        fuse_lora_layers(two)
        two.base_model.set_adapter(["default", "second"])
        layer = q_proj(two)
        assert _fused_calls(lambda: layer(x)) == 0
        torch.testing.assert_close(layer(x), _peft_forward(layer, x), rtol=0, atol=0)
        assert two(input_ids=input_ids).logits.isfinite().all()


def test_apply_lora_fuses_unless_lora_fused_is_false():
    from longvu.tiny import tiny_model
    from train.config import RunConfig
    from train.model_setup import apply_lora, set_trainable

    names = {}
    for fused in (True, False):
        config = RunConfig()
        config.lora.enabled, config.lora.fused = True, fused
        model = tiny_model("video")
        set_trainable(model, config)
        model = apply_lora(model, config)
        kinds = {type(m) for m in model.modules() if isinstance(m, lora.Linear)}
        assert kinds == {FusedLoraLinear if fused else lora.Linear}
        names[fused] = list(model.state_dict())
    assert names[True] == names[False]


def test_a_fused_model_merges_into_the_same_model_as_peft_s():
    plain = _peft_lm(0.1)
    fused = copy.deepcopy(plain)
    fuse_lora_layers(fused)
    input_ids = torch.randint(64, (2, 12))
    with torch.no_grad():
        adapted = fused.eval()(input_ids=input_ids).logits
        merged = fused.merge_and_unload()
        assert not any(isinstance(m, lora.Linear) for m in merged.modules())
        torch.testing.assert_close(merged(input_ids=input_ids).logits, adapted, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(merged.state_dict(), plain.merge_and_unload().state_dict(), rtol=0, atol=0)
