"""Quantized language-model weights. 4-bit (NF4), through torchao (an optional dependency): for
inference (`longvu generate --llm-4bit`) and as the frozen base of QLoRA training (`lora.quantize:
4bit`). FP8 (e4m3, `longvu.fp8`): the frozen base of LoRA training (`lora.quantize: fp8`), for speed.

Every linear layer of the LLM's decoder layers keeps its weight as a torchao `NF4Tensor` buffer
(4-bit NormalFloat codes in blocks of 64, one 8-bit scale per block, the scales double-quantized, as
QLoRA and torchtune store them); `F.linear` dequantizes it to the activations' dtype on the fly, and
its backward gives the input's gradient (the adapters' path) while the weight takes none. The
embeddings, the LM head, the norms, the vision towers, the connector and the projectors are unchanged.
For the 7B LLM this keeps ~3.4 GB of decoder weights instead of ~13 GB in bf16.

With FP8 every frozen linear layer of the decoder layers becomes a `longvu.fp8.Fp8FrozenLinear`: its
matmuls (the forward and the input's gradient) run on FP8 matrix units, at about 1.5x bf16's speed
on Hopper, and the weights take ~6.5 GB for the 7B LLM.
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


SHARED_INPUTS = (("self_attn", ("q_proj", "k_proj", "v_proj")), ("mlp", ("gate_proj", "up_proj")))  # read one input


def quantize_llm_fp8(model: nn.Module, device: torch.device | str | None = None) -> int:
    """Replace the frozen linear layers of a LongVUForCausalLM's decoder layers (the LoRA base; under
    peft, the layers it wraps) by FP8 ones, in place, on `device` (default: where each one is) -> the
    number converted; the projections that read one input quantize it once (SHARED_INPUTS). ValueError
    if a layer's sides are not multiples of 16."""
    from longvu.fp8 import frozen_fp8_linears
    from longvu.modeling import PARAM_GROUPS

    layers = [layer for group in PARAM_GROUPS if group.lora_layers is not None
              for layer in model.get_submodule(group.lora_layers)]
    count = sum(frozen_fp8_linears(layer, device) for layer in layers)  # one layer on the device at a time
    for layer in layers:
        _share_inputs(layer)
    return count


def _share_inputs(layer: nn.Module) -> None:
    """Give the FP8 projections of a decoder layer that read one input a common SharedInput."""
    from longvu.fp8 import Fp8FrozenLinear, SharedInput

    for block, names in SHARED_INPUTS:
        readers = [getattr(getattr(layer, block, None), name, None) for name in names]
        readers = [getattr(r, "base_layer", r) for r in readers]  # under peft, the layer it wraps
        if all(isinstance(r, Fp8FrozenLinear) for r in readers):
            shared = SharedInput(len(readers))
            for reader in readers:
                reader.shared_input = shared


def nf4_bytes(model: nn.Module) -> int:
    """Bytes of the model's NF4 weights (as `quantize_llm_nf4` leaves them): codes, block scales and
    their double-quantization factors."""
    return sum(t.numel() * t.element_size() for b in model.buffers() if hasattr(b, "quantized_data")
               for t in (b.quantized_data, b.quantized_scalers, b.quantization_factor))
