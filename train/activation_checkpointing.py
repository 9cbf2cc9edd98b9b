"""Activation checkpointing as a policy (`training.activation_checkpointing`).

- `none`: every activation is kept for the backward pass (no recomputation);
- `selective`: the first `n` LLM decoder layers are recomputed in the backward pass, the others keep
  their activations (n: `training.checkpointed_layers`, 1..layers-1, else a ConfigError; unset: the
  fewest that fit, as `auto` picks them, kept within 1..layers-1, or half the layers when none fits
  or without a GPU);
- `full`: every LLM decoder layer is recomputed;
- `auto`: the least recomputation whose estimated peak fits the GPU: `none`, else `selective` with
  the fewest layers that fit, else `full`. Without a GPU (CPU runs, tests): `full`.
The SVA layers are recomputed under every policy but `none`. The chunked loss always recomputes its
logits (longvu.loss).

Memory model (bytes per GPU, `MemoryModel.footprint`), at the run's token budget
`tokens = max(data.max_tokens_per_batch, tokenizer_model_max_length)`:

- states: weights 2 B/param (bf16; ZeRO-3 shards the trained ones over the ranks), gradients 2 B per
  trained param (sharded from ZeRO-2), AdamW fp32 master + two moments 12 B per trained param
  (sharded from ZeRO-1; 0 when offloaded to the CPU);
- kept activations per token per decoder layer, bf16, counted from the tensors autograd saves in a
  Qwen2 layer under SDPA: attention 5H + 3K (norm in/out, q, k, v, roped q/k, output), MLP 2H + 4I
  (norm in/out, gate, up, silu(gate), product), the fp32 copies in both RMSNorms 4H: 2 * (11H + 3K + 4I);
  LoRA adds nothing worth counting (its rank-r activations; its dropout keeps no copies,
  longvu.lora_dropout);
  with Liger's kernels (`fused`): no fp32 norm copies, SiLU recomputed: 2 * (7H + 3K + 3I);
  a kept layer holds less (`longvu.kept_activations`): its MLP product rebuilt in the backward pass,
  2I less (`training.recompute_mlp_product`, on by default); with Liger's kernels its two RMSNorm
  outputs rebuilt from their inputs, 4H less (`training.recompute_norm_outputs`, on by default; not
  under ZeRO-3, which releases the norms' weights before the backward pass);
  gate and up in FP8, 2 * 2I -> 2I * (1 + 4 / b), b values a scale (`training.fp8_mlp_activations`);
- a checkpointed layer keeps only its input, 2H per token; while any layer is recomputed (or in the
  backward of a kept one) one layer's full activations are alive besides;
- the SVA connector (`connector_bytes`): per query row (a frame's or image's SVA queries) and SVA
  layer, 2 B * C * (5 * towers * k + 9) (C the connector width, k a query's tokens per tower),
  counted from the tensors autograd saves in an SVALayer; all `connector_depth` layers under `none`,
  one layer (recomputed) otherwise; plus the towers' cell features, 2 B * towers * k * C a row. Rows:
  a frame's or image's queries times the most frames and images one micro-batch of the training
  records can hold (`data.sampler.batch_media_bound` on the probed counts: packed or not, a wide
  image brings all its queries for few tokens); without records, `data.max_frames` times
  `per_device_batch_size` or, if more, the token budget over a frame's queries;
- the loss: one of 8 chunks of fp32 logits, with its gradient and the bf16 projection: 10 B * V * tokens / 8;
  Liger's fused loss: the input gradient 2H per token, and 2 B * V * H for lm_head's gradient when it trains;
- usable: the device less 10% and 4 GiB (CUDA context, the towers' forward, allocator fragmentation), or
  `training.activation_memory_gib` when that is less (a cap on the estimated peak).
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from dataclasses import dataclass

import torch
from torch.utils.checkpoint import checkpoint

from longvu.fp8 import fp8_buffer_bytes
from longvu.kept_activations import block_size, set_kept_layer_saving
from longvu.quantize import nf4_bytes
from train.config import ConfigError
from train.gpu_memory import GIB, device_bytes
from train.optimizers import offloads_optimizer, state_bytes_per_param

logger = logging.getLogger(__name__)

POLICIES = ("auto", "full", "selective", "none")
HEADROOM_FRACTION = 0.10
RESERVE_BYTES = 4 * GIB


@dataclass(frozen=True)
class Footprint:
    """Estimated bytes: `fixed` (states, loss, transient layer) and, per decoder layer, what a kept or a
    checkpointed layer holds for the backward pass."""

    fixed: int
    kept_layer: int
    checkpointed_layer: int
    layers: int
    connector_kept: int = 0  # the SVA layers' activations when nothing is recomputed
    connector_recomputed: int = 0  # ... when they are recomputed (every plan but `none`)

    def peak(self, checkpointed: int) -> int:
        """Estimated peak bytes with `checkpointed` of the decoder layers recomputed (the SVA layers
        too unless that is 0)."""
        connector = self.connector_kept if checkpointed == 0 else self.connector_recomputed
        return (self.fixed + connector + (self.layers - checkpointed) * self.kept_layer
                + checkpointed * self.checkpointed_layer)


@dataclass(frozen=True)
class MemoryModel:
    """What the estimate needs: parameter counts, the LLM's shapes, tokens per micro-batch, ZeRO layout."""

    params: int  # every parameter held on the GPU (towers included)
    trained: int
    layers: int
    hidden: int
    intermediate: int
    kv_dim: int
    vocab: int
    tokens: int
    zero_stage: int = 0
    world_size: int = 1
    offload_optimizer: bool = False
    optimizer_bytes: float = 12  # per trained parameter (train.optimizers.state_bytes_per_param)
    fused: bool = False  # Liger's kernels (longvu.kernels)
    lm_head_trained: bool = False
    frozen_quantized_bytes: int = 0  # NF4 / FP8 frozen weights (buffers, not in `params`)
    connector_kept: int = 0  # what the SVA layers keep when none is recomputed (`connector_bytes`)
    connector_recomputed: int = 0  # ... when they are: their inputs and one layer's activations
    mlp_products: bool = True  # kept layers rebuild their MLP product (longvu.kept_activations)
    norm_outputs: bool = False  # ... their RMSNorm outputs (with Liger's kernels only)
    fp8_mlp: bool = False  # ... hold gate and up in FP8

    def footprint(self) -> Footprint:
        h, i, k, n = self.hidden, self.intermediate, self.kv_dim, self.tokens
        shard = lambda stage: self.world_size if self.zero_stage >= stage else 1  # noqa: E731
        weights = 2 * (self.params - self.trained) + 2 * self.trained // shard(3) + self.frozen_quantized_bytes
        grads = 2 * self.trained // shard(2)
        optimizer = 0 if self.offload_optimizer else int(self.optimizer_bytes * self.trained) // shard(1)
        layer = 2 * (7 * h + 3 * k + 3 * i) if self.fused else 2 * (11 * h + 3 * k + 4 * i)
        if self.fused:
            loss = 2 * h * n + (2 * self.vocab * h if self.lm_head_trained else 0)
        else:
            loss = 10 * self.vocab * n // 8
        fixed = weights + grads + optimizer + loss + layer * n  # + one layer's activations in its backward
        kept = (layer - (2 * i if self.mlp_products else 0) - (4 * h if self.norm_outputs and self.fused else 0)
                - (2 * i - 8 * i // block_size(i) if self.fp8_mlp else 0))
        return Footprint(fixed, kept * n, 2 * h * n, self.layers, self.connector_kept, self.connector_recomputed)


@dataclass(frozen=True)
class CheckpointPlan:
    """The resolved policy: `layers` of the LLM's decoder layers are recomputed (the first ones)."""

    policy: str  # none | selective | full
    layers: int
    estimated_bytes: int | None = None
    capacity_bytes: int | None = None
    # what layers keeping their activations hold (longvu.kept_activations)
    mlp_products: bool = True  # their MLP products rebuilt
    norm_outputs: bool = False  # their RMSNorm outputs rebuilt
    fp8_mlp: bool = False  # their gate and up in FP8

    def describe(self) -> str:
        est = "" if self.estimated_bytes is None else f", estimated peak {self.estimated_bytes / GIB:.1f} GiB"
        cap = "" if self.capacity_bytes is None else f" of {self.capacity_bytes / GIB:.1f} GiB usable"
        held = [] if self.policy == "full" else [
            "MLP products " + ("rebuilt" if self.mlp_products else "kept"),
            "norm outputs " + ("rebuilt" if self.norm_outputs else "kept"),
            "gate and up in " + ("FP8" if self.fp8_mlp else "full precision")]
        kept = "" if not held else " (kept layers: " + ", ".join(held) + ")"
        return f"activation checkpointing {self.policy}: {self.layers} decoder layers recomputed{kept}{est}{cap}"


def usable_bytes(device_bytes: int, budget_gib: float | None = None) -> int:
    """What the plan may fill: the device less the headroom, or `budget_gib` if that is less."""
    usable = int(device_bytes * (1 - HEADROOM_FRACTION)) - RESERVE_BYTES
    return usable if budget_gib is None else min(usable, int(budget_gib * GIB))


def resolve_plan(policy: str, footprint: Footprint, capacity: int | None, selective_layers: int | None = None) -> CheckpointPlan:
    """The plan for `policy` given the estimate and the usable bytes (`capacity`, None without a GPU)."""
    n_layers = footprint.layers
    if policy not in POLICIES:
        raise ValueError(f"training.activation_checkpointing {policy!r}: choose from {', '.join(POLICIES)}")
    fits = [n for n in range(n_layers + 1) if capacity is not None and footprint.peak(n) <= capacity]
    if policy == "none":
        n = 0
    elif policy == "full" or (policy == "auto" and capacity is None):
        n = n_layers
    elif policy == "selective" and selective_layers is not None:
        n = _checked_selective(selective_layers, n_layers)
    elif policy == "selective":
        n = min(max(fits[0] if fits else n_layers // 2, 1), max(n_layers - 1, 1))
    else:  # auto on a GPU
        n = fits[0] if fits else n_layers
        if not fits:
            logger.warning("activation checkpointing auto: even full recomputation is estimated at %.1f GiB, over "
                           "the %.1f GiB usable", footprint.peak(n_layers) / GIB, capacity / GIB)
    name = "none" if n == 0 else "full" if n == n_layers else "selective"
    return CheckpointPlan(name, n, footprint.peak(n), capacity)


def _checked_selective(layers: int, n_layers: int) -> int:
    """`training.checkpointed_layers` for `selective`: some but not all of the `n_layers`."""
    if n_layers < 2:
        raise ConfigError(f"training.checkpointed_layers={layers}: activation_checkpointing selective needs at least "
                          f"2 decoder layers, this model has {n_layers}; use full or none")
    if not 1 <= layers <= n_layers - 1:
        raise ConfigError(f"training.checkpointed_layers={layers}: expected 1..{n_layers - 1} for this model's "
                          f"{n_layers} decoder layers (0 is activation_checkpointing none, {n_layers} is full)")
    return layers


def unused_settings(training, on_gpu: bool) -> list[str]:
    """Why `training.checkpointed_layers` / `activation_memory_gib` / `gpu_memory_gib`, when set, are ignored."""
    policy, layers, cap = training.activation_checkpointing, training.checkpointed_layers, \
        training.activation_memory_gib
    out = []
    if layers is not None and policy != "selective":
        out.append(f"training.checkpointed_layers={layers} is unused: only activation_checkpointing selective "
                   f"reads it (the policy is {policy})")
    if cap is not None:
        why = (f"the policy is {policy}" if policy in ("none", "full") else
               "checkpointed_layers is set" if policy == "selective" and layers is not None else
               None if on_gpu else "there is no GPU")
        if why:
            out.append(f"training.activation_memory_gib={cap} is unused: {why}")
    if training.gpu_memory_gib is not None and not on_gpu:
        out.append(f"training.gpu_memory_gib={training.gpu_memory_gib} is unused: there is no GPU")
    return out


def apply_plan(longvu, plan: CheckpointPlan, fused: bool = False) -> None:
    """Switch recomputation on for the plan's first decoder layers (off for the rest), what the rest hold
    as the plan says (`longvu.kept_activations`), and recomputation for the SVA layers unless the plan
    is `none`. `longvu` is a LongVUForCausalLM (not its peft wrapper); `fused`: Liger's kernels are
    applied (`longvu.kernels`)."""
    from longvu.sva import SVALayer

    run = functools.partial(checkpoint, use_reentrant=False)
    for i, layer in enumerate(longvu.model.layers):
        layer.gradient_checkpointing, layer._gradient_checkpointing_func = i < plan.layers, run
        set_kept_layer_saving(layer, kept=i >= plan.layers, fused=fused, product=plan.mlp_products,
                              norm_outputs=plan.norm_outputs, fp8_mlp=plan.fp8_mlp)
    for module in longvu.model.vision_sampler_0.modules():
        if isinstance(module, SVALayer):
            module.gradient_checkpointing, module._gradient_checkpointing_func = plan.policy != "none", run
    if plan.layers:
        longvu.config.use_cache = False


def connector_bytes(cfg, rows: int) -> tuple[int, int]:
    """(kept, recomputed): bytes the SVA connector holds for the backward pass over `rows` query rows,
    with none of its layers recomputed and with them recomputed (see the module docstring)."""
    towers, k, width = len(cfg.mm_vision_tower_aux_token_len_list), cfg.cell_side ** 2, cfg.vision_hidden_size
    per_layer = 2 * width * (5 * towers * k + 9) * rows
    cells = 2 * towers * k * width * rows
    return cells + cfg.connector_depth * per_layer, cells + per_layer


def connector_rows(run_config, cfg, media_per_batch: int | None = None) -> int | None:
    """Query rows a micro-batch can bring to the connector (module docstring): `media_per_batch`
    frames and images (bounded from the training records, `data.sampler.batch_media_bound`) times a
    frame's queries; without records, the config's caps; None when those give no bound (videos may
    come and `data.max_frames` is unset)."""
    data = run_config.data
    queries = cfg.query_num_list[0]
    if media_per_batch is not None:
        return media_per_batch * queries
    if data.max_frames is None:
        return None
    return max(data.max_frames * data.per_device_batch_size, data.max_tokens_per_batch // queries, 1) * queries


def memory_model(model, run_config, ds_config: dict | None, world_size: int, fused: bool = False,
                 media_per_batch: int | None = None) -> MemoryModel:
    """The MemoryModel of a built model (after LoRA, so the trained parameters are known) and run;
    `fused`: Liger's kernels are applied; `media_per_batch`: the most frames and images a micro-batch
    of the training records can hold (None: records unknown, see `connector_rows`)."""
    longvu = model.get_base_model() if hasattr(model, "get_base_model") else model
    cfg = longvu.config
    params = list(model.parameters()) + list(longvu.model.towers.parameters())
    unique = {id(p): p for p in params}.values()
    zero = (ds_config or {}).get("zero_optimization", {})
    heads = cfg.num_attention_heads
    rows = connector_rows(run_config, cfg, media_per_batch)
    if rows is None:
        logger.warning("activation checkpointing: without the training records and with data.max_frames unset, the "
                       "plan cannot bound the frames a video brings to the connector and does not count them")
    connector_kept, connector_recomputed = connector_bytes(cfg, rows or 0)
    return MemoryModel(
        params=sum(p.numel() for p in unique), trained=sum(p.numel() for p in unique if p.requires_grad),
        layers=cfg.num_hidden_layers, hidden=cfg.hidden_size, intermediate=cfg.intermediate_size,
        kv_dim=cfg.num_key_value_heads * (getattr(cfg, "head_dim", None) or cfg.hidden_size // heads),
        vocab=cfg.vocab_size, tokens=max(run_config.data.max_tokens_per_batch, cfg.tokenizer_model_max_length),
        zero_stage=int(zero.get("stage", 0)) if ds_config else 0, world_size=world_size, offload_optimizer=offloads_optimizer(zero),
        optimizer_bytes=state_bytes_per_param(run_config.training.optimizer),
        fused=fused,
        lm_head_trained=longvu.lm_head.weight.requires_grad,
        frozen_quantized_bytes=nf4_bytes(longvu) + fp8_buffer_bytes(longvu),
        connector_kept=connector_kept, connector_recomputed=connector_recomputed,
        mlp_products=run_config.training.recompute_mlp_product,
        norm_outputs=rebuilds_norm_outputs(run_config, ds_config, fused),
        fp8_mlp=run_config.training.fp8_mlp_activations,
    )


def rebuilds_norm_outputs(run_config, ds_config: dict | None, fused: bool) -> bool:
    """Whether kept layers rebuild their RMSNorm outputs: `training.recompute_norm_outputs`, with Liger's
    kernels (transformers' RMSNorm does not keep its input), and not under ZeRO-3, which has released
    the norms' weights by the time the backward pass would rebuild their outputs."""
    zero = (ds_config or {}).get("zero_optimization", {})
    return run_config.training.recompute_norm_outputs and fused and int(zero.get("stage", 0)) < 3


def plan_for_run(model, run_config, ds_config: dict | None, device: torch.device, world_size: int,
                 fused: bool = False, media_per_batch: int | None = None) -> CheckpointPlan:
    """Resolve `training.activation_checkpointing` for this run and GPU (logged); `media_per_batch`:
    see `memory_model`."""
    t = run_config.training
    for line in unused_settings(t, device.type == "cuda"):
        logger.warning("%s", line)
    capacity = None
    if device.type == "cuda":
        capacity = usable_bytes(device_bytes(device, t.gpu_memory_gib), t.activation_memory_gib)
    model_memory = memory_model(model, run_config, ds_config, world_size, fused, media_per_batch)
    plan = dataclasses.replace(resolve_plan(t.activation_checkpointing, model_memory.footprint(), capacity,
                                            t.checkpointed_layers),
                               mlp_products=model_memory.mlp_products, norm_outputs=model_memory.norm_outputs,
                               fp8_mlp=model_memory.fp8_mlp)
    if t.fp8_mlp_activations and plan.policy == "full":
        logger.warning("training.fp8_mlp_activations=true is unused: every decoder layer is recomputed "
                       "(activation checkpointing %s)", plan.policy)
    if t.recompute_norm_outputs and fused and not plan.norm_outputs:
        logger.info("training.recompute_norm_outputs: kept layers keep their RMSNorm outputs under ZeRO-3, which "
                    "releases the norms' weights before the backward pass would rebuild them")
    logger.info("%s (policy %s)", plan.describe(), t.activation_checkpointing)
    return plan
