"""Build the model a run trains: weights source, the stage's connector/compression settings, which
parameters train (and with which learning rate and weight decay), LoRA."""

from __future__ import annotations

import importlib.util
import logging
import os
from dataclasses import dataclass

import torch
from torch import nn

from longvu.checkpoint import tower_config_dicts
from longvu.config import LongVUConfig
from longvu.fp8 import require_fp8_units
from longvu.modeling import LongVUForCausalLM, lora_target_regex, param_group
from longvu.packed_attention import VARLEN_ATTENTION, varlen_available
from longvu.tiny import tiny_model
from longvu.towers import load_tower_weights, speed_up_towers
from train.config import ConfigError, RunConfig

logger = logging.getLogger(__name__)

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def load_model(config: RunConfig) -> LongVUForCausalLM:
    """The model named by `model.init`, with the stage's config overrides applied (a change of SVA
    query count creates the new position embeddings and is logged)."""
    m = config.model
    attn = resolve_attention(m.attn_implementation, m.dtype)
    if attn == VARLEN_ATTENTION and m.dtype == "fp32":
        raise ConfigError(f"model.attn_implementation {VARLEN_ATTENTION} runs in fp16 or bf16: set model.dtype bf16")
    kind, _, source = m.init.partition(":")
    overrides = dict(m.overrides)
    dtype = DTYPES[m.dtype]
    if kind == "tiny":
        model = tiny_model(source or "video", dtype=dtype, **overrides)
        if m.siglip_path or m.dino_path:  # tiny towers written by `save_tiny_towers`
            load_tower_weights(model.model.towers, m.siglip_path, m.dino_path)
            model.config.siglip_path, model.config.dino_path = str(m.siglip_path), str(m.dino_path)
    elif kind == "qwen2":
        model = _from_qwen2(source, m.siglip_path, m.dino_path, overrides, attn, dtype)
    elif kind == "config":  # random initialisation from a LongVUConfig json (from-scratch runs, benchmarks)
        config_obj = LongVUConfig.from_pretrained(source)
        config_obj.apply_overrides(overrides, where=f"{source}: model.overrides")  # image_token_len switches the queries
        init_device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if torch.cuda.is_available() else "cpu"
        with torch.device(init_device):  # random init of billions of parameters is much faster on a GPU
            model = LongVUForCausalLM._from_config(config_obj, dtype=dtype, attn_implementation=attn)
        model = model.cpu()
        if m.siglip_path or m.dino_path:
            load_tower_weights(model.model.towers, m.siglip_path, m.dino_path)
    elif kind == "longvu":
        model = LongVUForCausalLM.from_pretrained(source, siglip_path=m.siglip_path, dino_path=m.dino_path,
                                                  dtype=dtype, attn_implementation=attn, **overrides)
    else:
        raise ConfigError(f"model.init {m.init!r}: expected tiny:FAMILY, config:CONFIG_JSON, qwen2:PATH or longvu:PATH")
    logger.info(
        "model: %s | attention %s | %d SVA queries (%dx%d cells), highres=%s, lowres %d, drop %.2f, dino %.2f",
        m.init, model.config._attn_implementation, model.config.image_token_len, model.config.cell_side, model.config.cell_side,
        model.config.highres, model.config.lowres_token, model.config.drop_threshold, model.config.dino_threshold,
    )
    return model


def resolve_attention(name: str, dtype: str = "bf16") -> str:
    """"auto": FlashAttention-2 when the package is installed and a GPU is present; else, on a GPU in
    fp16/bf16 where torch has it, `sdpa_varlen` (SDPA, packed rows through PyTorch's variable-length
    flash kernel: on an H200 the 7B image pre-training step ran 4,537 tokens/s with it); else SDPA.
    `sdpa_varlen` asked for by name is refused without a CUDA device and a torch that has the kernel."""
    if name == VARLEN_ATTENTION and not varlen_available():
        raise ConfigError(f"model.attn_implementation {VARLEN_ATTENTION} needs a CUDA GPU and torch.nn.attention.varlen "
                          f"(torch {torch.__version__}, CUDA available: {torch.cuda.is_available()}); use sdpa")
    if name != "auto":
        return name
    if torch.cuda.is_available() and importlib.util.find_spec("flash_attn") is not None:
        return "flash_attention_2"
    if dtype != "fp32" and varlen_available():
        return VARLEN_ATTENTION
    return "sdpa"


def _from_qwen2(path: str, siglip_path, dino_path, overrides: dict, attn: str, dtype: torch.dtype) -> LongVUForCausalLM:
    """A Qwen2 LLM folder + the two towers -> LongVU with a freshly initialised connector."""
    if siglip_path is None or dino_path is None:
        raise ConfigError("model.init qwen2:PATH needs model.siglip_path and model.dino_path")
    qwen = LongVUConfig.get_config_dict(path)[0]
    qwen.pop("model_type", None)
    siglip_cfg, dino_cfg = tower_config_dicts(siglip_path, dino_path)
    config = LongVUConfig(**{**qwen, **overrides, "siglip_config": siglip_cfg, "dino_config": dino_cfg,
                             "siglip_path": str(siglip_path), "dino_path": str(dino_path)})
    model, info = LongVUForCausalLM.from_pretrained(path, config=config, output_loading_info=True, dtype=dtype,
                                                    attn_implementation=attn, siglip_path=siglip_path,
                                                    dino_path=dino_path)
    llm_missing = [k for k in info["missing_keys"] if param_group(k).name == "llm"]
    if llm_missing or info["unexpected_keys"]:
        raise ConfigError(f"{path}: not a Qwen2 checkpoint: missing {llm_missing[:5]}, "
                          f"unexpected {sorted(info['unexpected_keys'])[:5]}")
    logger.info("connector and projector start fresh (%d tensors)", len(info["missing_keys"]))
    return model


def param_group_name(name: str) -> str:
    """Which learning-rate group a parameter belongs to (`longvu.modeling.PARAM_GROUPS`)."""
    return param_group(name).name


def decays(name: str, param: nn.Parameter) -> bool:
    """Weight decay applies to matrices only: never to biases, norm gains or other vectors."""
    return param.ndim >= 2 and "norm" not in name.lower()


@dataclass
class ParamGroupSpec:
    name: str
    lr: float
    weight_decay: float
    params: list[nn.Parameter]


def param_groups(model: nn.Module, config: RunConfig) -> list[ParamGroupSpec]:
    """Trainable parameters split by module group and by decay rule, each with its learning rate; LoRA
    adapters form the `lora` group, at the LLM's rate."""
    t = config.training
    rates = {"projector": t.lr.projector, "connector": t.lr.connector, "llm": t.lr.llm, "lora": t.lr.llm,
             "towers": t.lr.towers}
    groups: dict[tuple[str, bool], list[nn.Parameter]] = {}
    for name, param in model.named_parameters():
        if param.requires_grad:
            group = "lora" if "lora_" in name else param_group_name(name)
            groups.setdefault((group, decays(name, param)), []).append(param)
    return [
        ParamGroupSpec(f"{group}{'' if decay else '_no_decay'}", rates[group] or t.learning_rate,
                       t.weight_decay if decay else 0.0, params)
        for (group, decay), params in sorted(groups.items())
    ]


def set_trainable(model: LongVUForCausalLM, config: RunConfig) -> None:
    """Full fine-tune: LLM + connector + projector; LoRA: adapters + connector + projector.
    The towers stay frozen (and, when frozen, out of the module tree; see LongVUModel.detach_towers)."""
    model.requires_grad_(not config.lora.enabled)
    for name, param in model.named_parameters():
        if param_group(name).trains_beside_lora:
            param.requires_grad_(True)
    if config.training.unfreeze_towers:
        model.model.towers.requires_grad_(True)
    else:
        model.model.towers.requires_grad_(False)
        model.model.detach_towers()


def apply_lora(model: LongVUForCausalLM, config: RunConfig):
    """Wrap the LLM's linear layers (`lora.target_modules`, language-model layers only) with LoRA; its
    input dropout is folded into lora_A (`longvu.lora_dropout`: no dropped copies kept for backward) and,
    with `lora.fused`, each layer runs as one autograd op (`longvu.fused_lora`)."""
    from peft import LoraConfig, get_peft_model

    from longvu.fused_lora import fuse_lora_layers
    from longvu.lora_dropout import fold_lora_dropout

    lora = LoraConfig(
        r=config.lora.r, lora_alpha=config.lora.alpha, lora_dropout=config.lora.dropout, bias="none",
        target_modules=lora_target_regex(config.lora.target_modules), task_type="CAUSAL_LM",
    )
    peft_model = get_peft_model(model, lora)
    fold_lora_dropout(peft_model)
    if config.lora.fused:
        logger.info("lora.fused: %d adapted layers as one autograd op each", fuse_lora_layers(peft_model))
    for name, param in peft_model.named_parameters():  # the connector trains fully alongside
        if param_group(name).trains_beside_lora:
            param.requires_grad_(True)
    return peft_model


def fp8_lora_base(longvu: LongVUForCausalLM, device: torch.device) -> None:
    """`lora.quantize: fp8`: the frozen linear layers of the LLM's decoder layers (LoRA's base, once peft
    has wrapped them) in FP8 (`longvu.quantize.quantize_llm_fp8`), converted on `device`. A CUDA GPU
    without FP8 units is a ConfigError; the CPU runs it, slowly (the tests)."""
    from longvu.quantize import quantize_llm_fp8

    try:
        require_fp8_units(device)
        count = quantize_llm_fp8(longvu, device)
    except (RuntimeError, ValueError) as err:
        raise ConfigError(f"lora.quantize=fp8: {err}") from err
    logger.info("lora.quantize fp8: %d decoder linear layers in FP8", count)


def apply_speed_options(longvu: LongVUForCausalLM, model: nn.Module, config: RunConfig, args,
                        media_per_batch: int | None = None) -> None:
    """`training.fused_kernels` and `training.activation_checkpointing` for this run's device, applied to
    `longvu` (`model`: the model that trains, its peft wrapper under LoRA; `args`: TrainingArguments;
    `media_per_batch`: the most frames and images a micro-batch can hold, which bounds the connector's
    memory; None: unknown)."""
    from longvu.kernels import apply_fused_kernels, resolve_fused_kernels, set_triton_passes
    from train.activation_checkpointing import apply_plan, plan_for_run

    t = config.training
    try:
        kernels = resolve_fused_kernels(t.fused_kernels, args.device)
    except ValueError as err:
        raise ConfigError(str(err)) from err
    apply_fused_kernels(longvu, kernels)
    if t.triton_kernels and args.device.type == "cuda" and importlib.util.find_spec("triton") is None:
        raise ConfigError("training.triton_kernels: the triton package is not installed (CUDA builds of torch "
                          "ship it; install it, or set training.triton_kernels false)")
    set_triton_passes(t.triton_kernels)
    logger.info("fused kernels: %s (training.fused_kernels %s); LoRA dropout and FP8 quantization: %s", kernels,
                t.fused_kernels, "Triton kernels" if t.triton_kernels and args.device.type == "cuda" else "PyTorch ops")
    fused = kernels == "liger"
    apply_plan(longvu, plan_for_run(model, config, args.deepspeed, args.device, args.world_size, fused, media_per_batch),
               fused)
    apply_tower_speed(longvu, config, args.device)


def apply_tower_speed(longvu: LongVUForCausalLM, config: RunConfig, device: torch.device) -> None:
    """`training.fp8_towers` then `training.compile_towers` on the frozen towers; FP8 towers are always
    compiled (uncompiled, their per-token quantization makes them slower than bf16). FP8 runs anywhere
    `torch._scaled_mm` does (the CPU too, slowly); a CUDA GPU without FP8 units is a ConfigError."""
    t = config.training
    if t.fp8_towers:
        try:
            require_fp8_units(device)
        except RuntimeError as err:
            raise ConfigError(f"training.fp8_towers=true: {err}") from err
    speed_up_towers(longvu.model.towers, fp8=t.fp8_towers, compile=t.compile_towers)
    if t.compile_towers or t.fp8_towers:
        logger.info("frozen towers: %scompiled", "FP8 + " if t.fp8_towers else "")


def count_parameters(model: nn.Module) -> dict[str, int]:
    """Trainable parameters per group and in total, for the start-of-run log."""
    counts: dict[str, int] = {}
    for name, param in model.named_parameters():
        if param.requires_grad:
            group = "lora" if "lora_" in name else param_group_name(name)
            counts[group] = counts.get(group, 0) + param.numel()
    counts["total_trainable"] = sum(counts.values())
    return counts
