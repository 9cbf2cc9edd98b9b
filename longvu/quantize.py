"""4-bit (NF4) language-model weights, through torchao (an optional dependency): for inference
(`longvu generate --llm-4bit`) and as the frozen base of QLoRA training (`lora.quantize: 4bit`).

Every linear layer of the LLM's decoder layers keeps its weight as a torchao `NF4Tensor` buffer
(4-bit NormalFloat codes in blocks of 64, one 8-bit scale per block, the scales double-quantized, as
QLoRA and torchtune store them); `F.linear` dequantizes it to the activations' dtype on the fly, and
its backward gives the input's gradient (the adapters' path) while the weight takes none. The
embeddings, the LM head, the norms, the vision towers, the connector and the projectors are unchanged.
For the 7B LLM this keeps ~3.4 GB of decoder weights instead of ~13 GB in bf16.
"""

from __future__ import annotations

import math

import torch
from torch import nn

NF4_BLOCK = 64  # weights per 4-bit block (one scale each)
NF4_SCALER_BLOCK = 256  # scales per double-quantization block (fewer where a layer has fewer)


def quantize_llm_nf4(model: nn.Module, device: torch.device | str | None = None) -> int:
    """Replace the decoder layers' linear weights of a LongVUForCausalLM by NF4 tensors, in place, on
    `device` (one layer's full-precision weight there at a time; default: where each one is) -> the
    number of layers converted. RuntimeError if torchao is missing or a weight's size is not a
    multiple of NF4_BLOCK."""
    try:
        from torchao.quantization import to_nf4  # torchao >= 0.18
    except ImportError:
        try:
            from torchao.dtypes import to_nf4  # torchao 0.17
        except ImportError as err:
            raise RuntimeError(f"4-bit LLM weights need torchao >= 0.17 (pip install torchao): {err}") from err
    from longvu.modeling import PARAM_GROUPS

    count = 0
    for group in PARAM_GROUPS:
        if group.lora_layers is None:
            continue
        for name, module in model.get_submodule(group.lora_layers).named_modules():
            if not isinstance(module, nn.Linear):
                continue
            weight = module.weight.detach().to(device or module.weight.device)
            if weight.numel() % NF4_BLOCK:
                raise RuntimeError(f"{group.lora_layers}.{name}: {weight.numel()} weights, not a multiple of "
                                   f"the NF4 block ({NF4_BLOCK})")
            scalers = math.gcd(weight.numel() // NF4_BLOCK, NF4_SCALER_BLOCK)
            # a non-persistent buffer: `.to()` reassigns it (a parameter of a tensor subclass is swapped,
            # which fails once anything holds a weakref to it), and DeepSpeed neither broadcasts nor saves it
            del module.weight
            module.register_buffer("weight", to_nf4(weight, NF4_BLOCK, scalers), persistent=False)
            count += 1
    return count


def nf4_bytes(model: nn.Module) -> int:
    """Bytes of the model's NF4 weights (as `quantize_llm_nf4` leaves them): codes, block scales and
    their double-quantization factors."""
    return sum(t.numel() * t.element_size() for b in model.buffers() if hasattr(b, "quantized_data")
               for t in (b.quantized_data, b.quantized_scalers, b.quantization_factor))
