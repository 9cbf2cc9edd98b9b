"""4-bit NF4 LLM weights for generate (torchao, optional): only the decoder layers' linear weights
change, each stays within NF4's rounding of the original and takes ~4 bits a weight; the model still
generates, with logits close to the unquantized model's."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("torchao")

from longvu.quantize import NF4_BLOCK, quantize_llm_nf4  # noqa: E402
from longvu.tiny import tiny_model  # noqa: E402

IDS = torch.tensor([[1, 5, 7, 8, 9, 10, 11]])


def _nf4_bytes(w) -> int:
    return sum(t.numel() * t.element_size() for t in (w.quantized_data, w.quantized_scalers, w.quantization_factor))


def test_decoder_linear_weights_become_4bit_within_rounding():
    model = tiny_model("video", dtype=torch.bfloat16, vocab_size=4096, pad_token_id=0)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    assert quantize_llm_nf4(model) == 2 * 7  # 2 layers x (q, k, v, o, gate, up, down)
    assert not any(type(p).__name__ == "NF4Tensor" for p in model.parameters())  # frozen buffers: never trained
    for name, p in [*model.named_parameters(), *model.named_buffers()]:
        nf4 = type(p).__name__ == "NF4Tensor"
        assert nf4 == (name.startswith("model.layers.") and name.endswith("proj.weight")), name
        if not nf4:
            assert name not in before or torch.equal(p, before[name]), name
            continue
        original = before[name].float().reshape(-1, NF4_BLOCK)
        restored = p.get_original_weight().float().reshape(-1, NF4_BLOCK)
        # the widest gap of the NF4 code book is -1 .. -0.6962 of a block's absmax: half of it (0.152) bounds
        # the rounding; the 8-bit double-quantized block scales and bf16 add well under 1% of the largest weight
        bound = 0.16 * original.abs().amax(dim=1, keepdim=True) + 1e-2 * original.abs().max()
        assert ((restored - original).abs() <= bound).all(), name
        assert _nf4_bytes(p) <= 0.6 * original.numel()  # about half a byte a weight, against 2 in bf16


def test_quantized_model_generates_close_to_the_original():
    ref = tiny_model("video", dtype=torch.bfloat16, vocab_size=4096, pad_token_id=0)
    model = tiny_model("video", dtype=torch.bfloat16, vocab_size=4096, pad_token_id=0)
    quantize_llm_nf4(model)
    with torch.no_grad():
        a, b = ref(IDS).logits.float(), model(IDS).logits.float()
    assert not torch.equal(a, b)
    assert torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), dim=0) > 0.98
    out = model.generate(IDS, max_new_tokens=3, do_sample=False)
    assert out.shape == (1, IDS.shape[1] + 3)


def test_the_flop_model_counts_4bit_and_fp8_weights_as_the_weights_they_replace():
    from longvu.tiny import TINY_DINO
    from train.metrics import FlopModel

    model = tiny_model("video", dino_config=dict(TINY_DINO, hidden_size=48))  # FP8 needs 16-aligned sides
    before = FlopModel.from_model(model, lora=True)
    quantize_llm_nf4(model)
    for tower in model.model.towers:
        tower.quantize_fp8()
    after = FlopModel.from_model(model, lora=True)
    assert after == before and before.dino_params > 0 and before.llm_params > 0  # MFU is not cut by quantizing
