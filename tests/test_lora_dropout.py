"""LoRA's input dropout folded into lora_A (longvu.lora_dropout): the same dropout, no kept copies."""

import copy

import torch
from torch.utils.checkpoint import checkpoint

from autograd_helpers import saved_bytes
from longvu.lora_dropout import DropoutLoraA, _DroppedInputLinear, fold_lora_dropout


def _lora_a(in_features: int, out_features: int, p: float) -> DropoutLoraA:
    layer = torch.nn.Linear(in_features, out_features, bias=False)
    layer.__class__, layer.p = DropoutLoraA, p
    return layer


def test_the_backward_draws_the_forwards_mask_again():
    x = torch.randn(3, 5, 6, dtype=torch.float64, requires_grad=True)
    w = torch.randn(4, 6, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, w: _DroppedInputLinear.apply(x, w, 0.3, 1234), (x, w))


def test_it_drops_a_fraction_p_and_scales_the_rest_like_nn_dropout():
    torch.manual_seed(0)
    layer = _lora_a(256, 256, p=0.3)
    layer.weight.data = torch.eye(256)  # the output is the dropped input itself
    x = torch.randn(400, 256)
    out = layer(x)
    dropped = out == 0
    assert abs(dropped.float().mean().item() - 0.3) < 0.01  # 102,400 draws: 7 standard deviations
    torch.testing.assert_close(out[~dropped], x[~dropped] / 0.7)
    assert not torch.equal(layer(x) == 0, dropped)  # a new mask each call
    layer.eval()
    torch.testing.assert_close(layer(x), x)  # no dropout outside training


def test_recomputation_under_activation_checkpointing_draws_the_same_mask():
    layer = _lora_a(32, 8, p=0.5)
    x = torch.randn(16, 32, requires_grad=True)
    grads = []
    for recompute in (False, True):
        torch.manual_seed(7)
        layer.zero_grad()
        x.grad = None
        out = checkpoint(layer, x, use_reentrant=False) if recompute else layer(x)
        out.pow(2).sum().backward()
        grads.append((out.detach(), x.grad.clone(), layer.weight.grad.clone()))
    for plain, recomputed in zip(*grads):
        torch.testing.assert_close(recomputed, plain, rtol=0, atol=0)


def _tiny_lm():
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    return Qwen2ForCausalLM(Qwen2Config(vocab_size=64, hidden_size=48, intermediate_size=112, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64))


def _lora(model, p: float):
    from peft import LoraConfig, get_peft_model

    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    return get_peft_model(model, LoraConfig(r=4, lora_alpha=8, lora_dropout=p, target_modules=targets, init_lora_weights=False))


def _saved_bytes(model, input_ids) -> int:
    """Bytes of the distinct non-parameter storages autograd keeps for the backward of one forward."""
    return saved_bytes(lambda: model(input_ids=input_ids).logits.sum(), model.parameters())


def test_folded_dropout_keeps_what_lora_without_dropout_keeps():
    tokens, h, i = 32, 48, 112
    input_ids = torch.randint(64, (1, tokens))
    plain = _lora(_tiny_lm(), 0.1)
    folded = _lora(_tiny_lm(), 0.1)
    assert fold_lora_dropout(folded) == 2 * 7
    no_dropout = _lora(_tiny_lm(), 0.0)
    kept = {name: _saved_bytes(m, input_ids) for name, m in
            (("plain", plain), ("folded", folded), ("no_dropout", no_dropout))}
    assert kept["folded"] == kept["no_dropout"]
    # what peft's dropout adds, per layer: at least each adapted input's dropped copy (fp32; the masks besides)
    assert kept["plain"] - kept["no_dropout"] >= 2 * 4 * (6 * h + i) * tokens


def test_folding_keeps_parameter_names_and_the_eval_output_and_trains():
    input_ids = torch.randint(64, (2, 16))
    plain = _lora(_tiny_lm(), 0.2)
    folded = copy.deepcopy(plain)
    fold_lora_dropout(folded)
    assert list(folded.state_dict()) == list(plain.state_dict())
    layer = folded.base_model.model.model.layers[0].self_attn.q_proj
    assert isinstance(layer.lora_A["default"], DropoutLoraA) and isinstance(layer.lora_dropout["default"], torch.nn.Identity)
    assert fold_lora_dropout(folded) == 0  # already folded
    plain.eval(), folded.eval()
    torch.testing.assert_close(folded(input_ids=input_ids).logits, plain(input_ids=input_ids).logits)
    folded.train()
    out = folded(input_ids=input_ids).logits
    assert not torch.allclose(out, plain(input_ids=input_ids).logits)  # dropout is on in training
    out.sum().backward()
    assert layer.lora_A["default"].weight.grad.abs().sum() > 0


def test_apply_lora_folds_the_dropout_and_leaves_p_zero_alone():
    from longvu.tiny import tiny_model
    from train.config import RunConfig
    from train.model_setup import apply_lora, set_trainable

    for p, expected in ((0.05, DropoutLoraA), (0.0, torch.nn.Linear)):
        config = RunConfig()
        config.lora.enabled, config.lora.dropout = True, p
        model = tiny_model("video")
        set_trainable(model, config)
        model = apply_lora(model, config)
        kinds = {type(m.lora_A["default"]) for m in model.modules() if hasattr(m, "lora_A") and "default" in m.lora_A}
        assert kinds == {expected}
