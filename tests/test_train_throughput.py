"""Training-throughput features: the loader wait per step (`data_wait_s`), activation checkpointing
policies, fused-kernel selection and multimodal sequence packing (issue 14). In-process, CPU, tiny model."""

from __future__ import annotations

import dataclasses
import time

import pytest
import torch

from autograd_helpers import SavedStorages, saved_bytes
from data.collate import Collator
from data.dataset import Sample
from data.sampler import ModalityLengthBatchSampler
from longvu.tiny import tiny_model


class _SlowTextDataset(torch.utils.data.Dataset):
    """Text-only samples that take `delay` seconds each to load."""

    def __init__(self, n: int, delay: float):
        self.n, self.delay = n, delay

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        time.sleep(self.delay)
        ids = torch.randint(0, 1000, (24,), generator=torch.Generator().manual_seed(i))
        return Sample(i, f"t{i}", ids, ids.clone(), [])


def test_trainer_logs_the_time_each_step_waits_for_its_batch(tmp_path):
    from data.bad_samples import BadSampleTracker
    from train.config import RunConfig
    from transformers import TrainingArguments
    from train.trainer import LongVUTrainer

    delay, steps = 0.3, 3
    config = RunConfig()
    config.data.num_workers = 0
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=steps, logging_steps=1, report_to=[],
                             save_strategy="no", use_cpu=True, remove_unused_columns=False)
    model = tiny_model("video").train()
    dataset = _SlowTextDataset(steps, delay)
    sampler = ModalityLengthBatchSampler([24] * steps, ["text"] * steps, max_tokens=24, max_batch_size=1)
    trainer = LongVUTrainer(model=model, args=args, train_dataset=dataset, data_collator=Collator(),
                            run_config=config, batch_sampler=sampler, bad_tracker=BadSampleTracker(0.5, 100))
    trainer.train()
    logged = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logged) == steps
    for h in logged:
        assert delay <= h["data_wait_s"] <= h["step_time_s"], h


# --- activation checkpointing policy ---------------------------------------------------------------


def test_resolver_picks_the_least_recomputation_that_fits():
    from train.activation_checkpointing import Footprint, resolve_plan

    fp = Footprint(fixed=10, kept_layer=4, checkpointed_layer=1, layers=4)  # peak(n) = 26 - 3n
    picks = {cap: resolve_plan("auto", fp, cap) for cap in (30, 26, 25, 21, 17, 14, 10)}
    assert {cap: (p.policy, p.layers) for cap, p in picks.items()} == {
        30: ("none", 0), 26: ("none", 0), 25: ("selective", 1), 21: ("selective", 2), 17: ("selective", 3),
        14: ("full", 4), 10: ("full", 4)}
    assert picks[21].estimated_bytes == 20
    assert (resolve_plan("auto", fp, None).policy, resolve_plan("auto", fp, None).layers) == ("full", 4)  # no GPU
    assert resolve_plan("none", fp, 10).layers == 0 and resolve_plan("full", fp, 100).layers == 4
    assert resolve_plan("selective", fp, 21).layers == 2  # the fewest that fit
    assert resolve_plan("selective", fp, None).layers == 2  # half without a GPU
    assert resolve_plan("selective", fp, 10).layers == 2  # half when none fits
    assert resolve_plan("selective", fp, 14).layers == 3  # only full fits: selective stops one short of it
    assert resolve_plan("selective", fp, 100, selective_layers=3).layers == 3
    assert resolve_plan("selective", fp, 100).layers == 1  # selective recomputes at least one layer
    with pytest.raises(ValueError, match="activation_checkpointing 'some'"):
        resolve_plan("some", fp, 10)


@pytest.mark.parametrize("layers", [0, 4, 9])
def test_selective_rejects_a_layer_count_outside_1_to_n_minus_1(layers):
    from train.activation_checkpointing import Footprint, resolve_plan
    from train.config import ConfigError

    fp = Footprint(fixed=10, kept_layer=4, checkpointed_layer=1, layers=4)
    with pytest.raises(ConfigError, match=rf"^training.checkpointed_layers={layers}: expected 1..3 for this model's "
                                          r"4 decoder layers \(0 is activation_checkpointing none, 4 is full\)$"):
        resolve_plan("selective", fp, 100, selective_layers=layers)
    with pytest.raises(ConfigError, match="selective needs at least 2 decoder layers, this model has 1"):
        resolve_plan("selective", Footprint(10, 4, 1, layers=1), 100, selective_layers=1)


def test_checkpointing_settings_the_policy_ignores_are_named():
    from types import SimpleNamespace

    from train.activation_checkpointing import unused_settings

    def unused(policy, layers=None, cap=None, on_gpu=True, gpu_gib=None):
        t = SimpleNamespace(activation_checkpointing=policy, checkpointed_layers=layers, activation_memory_gib=cap,
                            gpu_memory_gib=gpu_gib)
        return unused_settings(t, on_gpu)

    assert unused("selective", 2, None) == unused("auto", None, 40.0) == unused("selective", None, 40.0) == []
    assert unused("full", 2) == ["training.checkpointed_layers=2 is unused: only activation_checkpointing selective "
                                 "reads it (the policy is full)"]
    assert unused("auto", 2, 40.0) == ["training.checkpointed_layers=2 is unused: only activation_checkpointing "
                                       "selective reads it (the policy is auto)"]
    assert unused("none", cap=40.0) == ["training.activation_memory_gib=40.0 is unused: the policy is none"]
    assert unused("selective", 2, 40.0) == ["training.activation_memory_gib=40.0 is unused: checkpointed_layers is set"]
    assert unused("auto", cap=40.0, on_gpu=False) == ["training.activation_memory_gib=40.0 is unused: there is no GPU"]
    assert unused("none", gpu_gib=24.0) == []
    assert unused("none", gpu_gib=24.0, on_gpu=False) == ["training.gpu_memory_gib=24.0 is unused: there is no GPU"]


def test_gpu_memory_cap_is_the_plans_device_size_and_cannot_exceed_the_card():
    from train.activation_checkpointing import usable_bytes
    from train.config import ConfigError
    from train.gpu_memory import GIB, capped_bytes

    card = 139 * GIB
    assert capped_bytes(card, None) == card and capped_bytes(card, 24.0) == 24 * GIB
    # the plan fills the capped card less its headroom, and a smaller activation cap still wins
    assert usable_bytes(capped_bytes(card, 24.0)) < 24 * GIB < usable_bytes(card)
    assert usable_bytes(capped_bytes(card, 24.0), 10.0) == 10 * GIB
    with pytest.raises(ConfigError, match=r"training.gpu_memory_gib=200 is more than this GPU's 139.0 GiB"):
        capped_bytes(card, 200)


def test_plan_for_run_warns_of_an_unused_setting(caplog):
    import dataclasses

    import torch

    from longvu.tiny import tiny_model
    from train.activation_checkpointing import plan_for_run
    from train.config import RunConfig

    config = RunConfig()
    config = dataclasses.replace(config, training=dataclasses.replace(
        config.training, activation_checkpointing="full", checkpointed_layers=1, fp8_mlp_activations=True))
    with caplog.at_level("WARNING", logger="train.activation_checkpointing"):
        plan = plan_for_run(tiny_model("video", vocab_size=4096, pad_token_id=0), config, None, torch.device("cpu"), 1)
    assert plan.policy == "full"
    assert "training.checkpointed_layers=1 is unused" in caplog.text
    assert "training.fp8_mlp_activations=true is unused: every decoder layer is recomputed" in caplog.text


def test_memory_model_counts_states_per_zero_stage_and_activations_per_token_per_layer():
    from train.activation_checkpointing import MemoryModel, rebuilds_norm_outputs
    from train.config import RunConfig

    shapes = dict(params=1000, trained=100, layers=3, hidden=10, intermediate=20, kv_dim=4, vocab=80, tokens=16)
    # a layer: 2 B * (11*10 + 3*4 + 4*20) = 404 B/token, kept without its MLP product: 404 - 2 * 20;
    # loss 10 B * 80 * 16 / 8 = 1600 B
    plain = MemoryModel(**shapes).footprint()
    assert (plain.kept_layer, plain.checkpointed_layer) == (364 * 16, 2 * 10 * 16)
    assert plain.fixed == 2000 + 200 + 1200 + 1600 + 404 * 16
    zero3 = MemoryModel(**shapes, zero_stage=3, world_size=4).footprint()
    assert zero3.fixed == 2 * 900 + 200 // 4 + 200 // 4 + 1200 // 4 + 1600 + 404 * 16
    zero2_off = MemoryModel(**shapes, zero_stage=2, world_size=4, offload_optimizer=True).footprint()
    assert zero2_off.fixed == 2000 + 200 // 4 + 0 + 1600 + 404 * 16
    # Liger: 2 B * (7*10 + 3*4 + 3*20) = 284 B/token (kept: 284 - 40); loss: input gradient 2 B * 10 * 16
    # (+ lm_head's 2 B * 80 * 10)
    fused = MemoryModel(**shapes, fused=True).footprint()
    assert fused.kept_layer == 244 * 16 and fused.fixed == 2000 + 200 + 1200 + 320 + 284 * 16
    # norm outputs rebuilt: 2 x 2 B * 10 less a token, with Liger's RMSNorm only (transformers' keeps no input)
    assert MemoryModel(**shapes, fused=True, norm_outputs=True).footprint().kept_layer == (244 - 40) * 16
    assert MemoryModel(**shapes, norm_outputs=True).footprint().kept_layer == plain.kept_layer
    config = RunConfig()  # rebuilt with Liger, not under ZeRO-3 (it has released the norms' weights by the backward)
    assert [rebuilds_norm_outputs(config, {"zero_optimization": {"stage": stage}}, fused) for stage, fused in
            ((0, True), (2, True), (3, True), (2, False))] == [True, True, False, False]
    # gate and up in FP8: 2 x 20 values at 1 B + a 4-B scale per row (20 values: 128 does not divide) instead of 2 B
    assert MemoryModel(**shapes, fp8_mlp=True).footprint().kept_layer == (364 - 80 + 2 * 20 * 1.2) * 16
    assert MemoryModel(**shapes, fused=True, lm_head_trained=True).footprint().fixed == fused.fixed + 1600
    assert MemoryModel(**shapes, frozen_quantized_bytes=300).footprint().fixed == plain.fixed + 300
    # 8-bit moments: fp32 master 4 B + 2 x (1 B + one fp32 scale per 256 values) instead of 12 B
    assert MemoryModel(**shapes, optimizer_bytes=4 + 2 * (1 + 4 / 256)).footprint().fixed == plain.fixed - 1200 + 603


def test_memory_model_counts_the_nf4_weights_of_a_qlora_model():
    from longvu.quantize import quantize_llm_nf4
    from longvu.tiny import tiny_model
    from train.activation_checkpointing import memory_model
    from train.config import RunConfig
    from train.model_setup import apply_lora, set_trainable

    config = RunConfig()
    config.lora.enabled, config.lora.quantize = True, "4bit"
    model = tiny_model("video")
    set_trainable(model, config)
    dense = sum(m.weight.numel() for m in model.model.layers.modules() if isinstance(m, torch.nn.Linear))
    before = memory_model(apply_lora(tiny_model("video"), config), config, None, world_size=1)
    quantize_llm_nf4(model)
    after = memory_model(apply_lora(model, config), config, None, world_size=1)
    assert after.params == before.params - dense  # the decoder weights left the parameters...
    # ...for about half a byte each (4-bit codes; one 8-bit scale per 64 weights, one fp32 factor per 256 scales)
    assert dense // 2 < after.frozen_quantized_bytes < 0.6 * dense


def test_memory_model_counts_the_fp8_weights_of_a_lora_model():
    from longvu.quantize import quantize_llm_fp8
    from longvu.tiny import tiny_model
    from train.activation_checkpointing import memory_model
    from train.config import RunConfig
    from train.model_setup import apply_lora, set_trainable

    config = RunConfig()
    config.lora.enabled, config.lora.quantize = True, "fp8"
    model = tiny_model("video")
    set_trainable(model, config)
    model = apply_lora(model, config)
    before = memory_model(model, config, None, world_size=1)
    bases = [m.base_layer for m in model.modules() if hasattr(m, "base_layer") and isinstance(m.base_layer, torch.nn.Linear)]
    dense = sum(m.weight.numel() + (m.bias.numel() if m.bias is not None else 0) for m in bases)
    # one byte a weight, an fp32 scale per output row, the bias as it was (fp32 in the tiny model)
    expected = sum(m.weight.numel() + 4 * m.out_features + (4 * m.bias.numel() if m.bias is not None else 0) for m in bases)
    assert quantize_llm_fp8(model.get_base_model()) == len(bases) == 2 * 7
    after = memory_model(model, config, None, world_size=1)
    assert after.params == before.params - dense and after.trained == before.trained
    assert after.frozen_quantized_bytes == expected


def test_a_memory_cap_bounds_the_estimated_peak():
    from train.activation_checkpointing import GIB, RESERVE_BYTES, usable_bytes

    assert usable_bytes(100 * GIB) == 90 * GIB - RESERVE_BYTES
    assert usable_bytes(100 * GIB, budget_gib=30) == 30 * GIB
    assert usable_bytes(100 * GIB, budget_gib=95) == 90 * GIB - RESERVE_BYTES


def test_memory_model_of_the_7b_lora_run_matches_the_measured_peak():
    """Issue 14: LoRA at 8K, every layer recomputed, measured 26.2 GiB on an H200; auto keeps every
    activation on a 141 GiB card and recomputes some layers on an 80 GiB one or under a 32 GiB cap."""
    from scripts.bench.vision_pipeline import released_shape_config
    from longvu.modeling import LongVUForCausalLM
    from train.activation_checkpointing import GIB, memory_model, resolve_plan, usable_bytes
    from train.config import RunConfig
    from train.model_setup import apply_lora, set_trainable

    config = RunConfig()
    config.lora.enabled, config.data.max_tokens_per_batch = True, 8192
    config.data.max_frames = 1  # the measurement's data was text-only: the connector's rows are the images' bound
    with torch.device("meta"):
        model = LongVUForCausalLM(released_shape_config(llm_layers=28))
    set_trainable(model, config)
    model = apply_lora(model, config)
    footprint = memory_model(model, config, {"zero_optimization": {"stage": 2}}, world_size=1).footprint()
    assert abs(footprint.peak(28) / GIB - 26.2) < 0.1 * 26.2
    assert resolve_plan("auto", footprint, usable_bytes(141 * 10**9)).policy == "none"
    assert resolve_plan("auto", footprint, usable_bytes(80 * 10**9)).policy == "selective"
    capped = resolve_plan("auto", footprint, usable_bytes(141 * 10**9, budget_gib=32))
    assert capped.policy == "selective" and capped.estimated_bytes <= 32 * GIB
    fused = memory_model(model, config, {"zero_optimization": {"stage": 2}}, world_size=1, fused=True).footprint()
    assert fused.peak(0) < footprint.peak(0) and fused.fixed < footprint.fixed


def _layer_calls(model) -> dict:
    """Calls of a submodule inside each LLM decoder layer and each SVA layer (a recomputed layer calls
    its submodules twice per forward+backward; counted on entry, as recomputation stops early once
    every saved tensor is back)."""
    from longvu.sva import SVALayer

    calls = {}
    def count(name):
        def hook(*_):
            calls[name] = calls.get(name, 0) + 1
        return hook
    for i, layer in enumerate(model.model.layers):
        layer.mlp.register_forward_pre_hook(count(f"llm{i}"))
    svas = [m for m in model.model.vision_sampler_0.modules() if isinstance(m, SVALayer)]
    for i, layer in enumerate(svas):
        next(layer.children()).register_forward_pre_hook(count(f"sva{i}"))
    return calls


@pytest.mark.parametrize("policy,layers,llm_calls,sva_calls", [
    ("none", 0, [1, 1], 1), ("selective", 1, [2, 1], 2), ("full", 2, [2, 2], 2)])
def test_policies_change_what_is_recomputed_not_the_loss_or_gradients(policy, layers, llm_calls, sva_calls):
    from train.activation_checkpointing import CheckpointPlan, apply_plan

    ids = torch.randint(0, 1000, (2, 12), generator=torch.Generator().manual_seed(0))
    reference = tiny_model("video").train()
    reference.zero_grad()
    ref_loss = reference(input_ids=ids, labels=ids).loss
    ref_loss.backward()

    model = tiny_model("video").train()
    apply_plan(model, CheckpointPlan(policy, layers))
    calls = _layer_calls(model)
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    assert [calls[f"llm{i}"] for i in range(2)] == llm_calls
    assert {v for k, v in calls.items() if k.startswith("sva")} == {sva_calls}
    assert torch.equal(loss, ref_loss)
    for (name, p), q in zip(model.named_parameters(), reference.parameters()):
        if q.grad is not None:
            torch.testing.assert_close(p.grad, q.grad, rtol=0, atol=1e-6, msg=name)


def _saved_bytes(model, ids, monkeypatch) -> tuple[int, dict]:
    """Bytes of the distinct non-parameter storages autograd keeps from one forward of `model`, also
    what kept layers' own saved-tensor hooks keep (tensors as they are, recipes by what they hold),
    and the gradients of its backward."""
    from longvu import kept_activations

    record = SavedStorages(model.parameters())

    def recording_hooks(pack, unpack):
        def recorded(t):
            packed = pack(t)
            for held in packed[0].tensors if isinstance(packed, tuple) else (packed,):
                record(held)
            return packed
        return torch.autograd.graph.saved_tensors_hooks(recorded, unpack)

    monkeypatch.setattr(kept_activations, "saved_tensors_hooks", recording_hooks)
    model.zero_grad()
    torch.manual_seed(0)  # LoRA's dropout masks
    with torch.autograd.graph.saved_tensors_hooks(record, lambda t: t):
        loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    return record.bytes, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("checkpointed,lora", [(0, False), (1, False), (0, True)])
def test_kept_layers_rebuild_their_mlp_product_and_norm_outputs_with_the_same_gradients(checkpointed, lora, monkeypatch):
    from longvu.kept_activations import set_kept_layer_saving
    from train.activation_checkpointing import CheckpointPlan, apply_plan
    from train.config import RunConfig
    from train.model_setup import apply_lora, set_trainable

    ids = torch.randint(0, 1000, (2, 12), generator=torch.Generator().manual_seed(0))
    model = longvu = tiny_model("video").train()
    if lora:  # down_proj's input is kept by lora_A (its dropout folded in), the frozen base keeps none
        config = RunConfig()
        config.lora.enabled, config.lora.dropout = True, 0.1
        set_trainable(model, config)
        model = apply_lora(model, config)
    plan = CheckpointPlan("selective" if checkpointed else "none", checkpointed)
    apply_plan(longvu, plan)  # the CPU's default: products rebuilt, norm outputs kept (no Liger)
    kept = longvu.model.layers[checkpointed:]
    assert [layer.mlp.holds_product for layer in longvu.model.layers] == [False] * checkpointed + [True] * len(kept)
    saved, grads = _saved_bytes(model, ids, monkeypatch)
    for layer in kept:  # everything held as autograd saves it
        set_kept_layer_saving(layer, kept=True, fused=False, product=False)
    saved_all, grads_all = _saved_bytes(model, ids, monkeypatch)
    for layer in kept:  # in fp32 transformers' RMSNorm keeps its input itself, so rebuilding its output pays
        set_kept_layer_saving(layer, kept=True, fused=False, norm_outputs=True)
    saved_less, grads_less = _saved_bytes(model, ids, monkeypatch)
    cfg, tokens = longvu.config, ids.numel()
    # each kept layer's product, [2, 12, intermediate] fp32, is the only tensor no longer saved...
    assert saved_all - saved == len(kept) * tokens * cfg.intermediate_size * 4
    # ...and then its two norm outputs, [2, 12, hidden] fp32 each
    assert saved - saved_less == len(kept) * 2 * tokens * cfg.hidden_size * 4
    assert "MLP products rebuilt, norm outputs kept" in plan.describe()
    assert "MLP products kept, norm outputs rebuilt" in dataclasses.replace(
        plan, mlp_products=False, norm_outputs=True).describe()
    assert grads.keys() == grads_all.keys() == grads_less.keys()
    for name, grad in grads.items():  # (the embedding's gradient sums in a thread-dependent order)
        torch.testing.assert_close(grad, grads_all[name], rtol=0, atol=1e-6, msg=name)
        torch.testing.assert_close(grads_less[name], grads_all[name], rtol=0, atol=1e-6, msg=name)


@pytest.mark.parametrize("fp8_mlp", [False, True])
def test_what_a_kept_layer_rebuilds_is_freed_after_its_forward(fp8_mlp):
    """The product, norm outputs and (FP8) gate and up are held only as their recipes until the backward."""
    import gc
    import weakref

    from longvu.kept_activations import set_kept_layer_saving

    model = tiny_model("video").train()
    layer = model.model.layers[1]
    set_kept_layer_saving(layer, kept=True, fused=False, norm_outputs=True, fp8_mlp=fp8_mlp)
    made = {}

    def remember(name, pick):
        def hook(*args):
            made[name] = weakref.ref(pick(*args))  # returns None: the module's inputs and output are unchanged
        return hook

    layer.post_attention_layernorm.register_forward_hook(remember("norm", lambda m, a, out: out))
    layer.mlp.gate_proj.register_forward_hook(remember("gate", lambda m, a, out: out))
    layer.mlp.down_proj.register_forward_pre_hook(remember("product", lambda m, a: a[0]))
    ids = torch.randint(0, 1000, (2, 12), generator=torch.Generator().manual_seed(0))
    loss = model(input_ids=ids, labels=ids).loss
    gc.collect()
    freed = {name: ref() is None for name, ref in made.items()}
    assert freed == {"norm": True, "product": True, "gate": fp8_mlp}  # bf16 gate: the SwiGLU's backward keeps it
    loss.backward()
    assert all(p.grad is not None for p in layer.mlp.parameters())


def test_a_kept_layers_graph_dropped_without_its_backward_is_freed():
    """A forward whose loss is discarded (no backward) leaves nothing of a kept layer alive."""
    import gc

    from longvu.kept_activations import set_kept_layer_saving

    model = tiny_model("video").train()
    ids = torch.randint(0, 1000, (2, 12), generator=torch.Generator().manual_seed(0))

    def live_tensors() -> int:
        gc.collect()
        return sum(isinstance(o, torch.Tensor) for o in gc.get_objects())

    for layer in model.model.layers:
        set_kept_layer_saving(layer, kept=True, fused=False, norm_outputs=True)
    model(input_ids=ids, labels=ids).loss.sum()  # warm-up: lazily built buffers
    before = live_tensors()
    for _ in range(3):
        model(input_ids=ids, labels=ids).loss.sum()
    assert live_tensors() == before
    loss = model(input_ids=ids, labels=ids).loss  # and the backward still has what it needs
    loss.backward()
    assert all(p.grad is not None for p in model.model.layers[1].mlp.parameters())


def test_fp8_blocks_round_each_value_to_e4m3_against_its_blocks_scale():
    from longvu.kept_activations import block_size, dequantize_blocks, quantize_blocks

    x = torch.randn(5, 384, generator=torch.Generator().manual_seed(0)) * torch.logspace(-3, 3, 384)
    assert block_size(384) == 128 and block_size(200) == 200
    codes, scales = quantize_blocks(x, 128)
    assert codes.dtype == torch.float8_e4m3fn and codes.shape == (5, 3, 128) and scales.shape == (5, 3, 1)
    back = dequantize_blocks(codes, scales, torch.float32).reshape(5, 384)
    blocks_amax = x.abs().reshape(5, 3, 128).amax(-1, keepdim=True).expand(5, 3, 128).reshape(5, 384)
    # each block's largest value maps to e4m3's largest code, 448, exactly (up to the scale's fp32 rounding)
    torch.testing.assert_close(back.abs().reshape(5, 3, 128).amax(-1), x.abs().reshape(5, 3, 128).amax(-1),
                               rtol=1e-6, atol=0)
    # e4m3: 3 mantissa bits (relative step 2^-3, so rounding within 2^-4), subnormal step 2^-9 of the scale
    bound = x.abs() * 2**-4 + blocks_amax / 448 * 2**-10
    assert (back - x).abs().le(bound * 1.0001).all()
    assert not torch.equal(back, x)


@pytest.mark.parametrize("lora", [False, True])
def test_fp8_mlp_activations_halve_gate_and_up_and_keep_the_gradients_close(lora, monkeypatch):
    from longvu.kept_activations import set_kept_layer_saving
    from train.config import RunConfig
    from train.model_setup import apply_lora, set_trainable

    ids = torch.randint(0, 1000, (2, 12), generator=torch.Generator().manual_seed(0))
    model = longvu = tiny_model("video").train()
    if lora:
        config = RunConfig()
        config.lora.enabled, config.lora.dropout = True, 0.1
        set_trainable(model, config)
        model = apply_lora(model, config)
    for layer in longvu.model.layers:
        set_kept_layer_saving(layer, kept=True, fused=False)
    saved, grads = _saved_bytes(model, ids, monkeypatch)
    for layer in longvu.model.layers:
        set_kept_layer_saving(layer, kept=True, fused=False, fp8_mlp=True)
    saved_fp8, grads_fp8 = _saved_bytes(model, ids, monkeypatch)
    cfg, tokens = longvu.config, ids.numel()
    # gate and up, fp32 [2, 12, intermediate], become one byte a value and an fp32 scale a row (128 values)
    per_layer = 2 * tokens * cfg.intermediate_size * (4 - 1 - 4 / 128)
    assert saved - saved_fp8 == cfg.num_hidden_layers * per_layer
    assert grads.keys() == grads_fp8.keys()
    mlp = [n for n in grads if ".mlp." in n]
    assert mlp and any(not torch.equal(grads[n], grads_fp8[n]) for n in mlp)  # rounded: not the same backward
    for name, grad in grads.items():  # gate and up within 2^-4 of themselves: gradients within a few %
        assert float((grads_fp8[name] - grad).norm() / grad.norm().clamp_min(1e-12)) < 0.05, name


def test_run_config_names_an_unknown_checkpointing_policy(tmp_path):
    from train.config import ConfigError, load_run_config

    manifest = tmp_path / "m.jsonl"
    manifest.write_text("")
    with pytest.raises(ConfigError, match=r"training.activation_checkpointing='sometimes': expected one of auto"):
        load_run_config(None, [f"data.train_manifest={manifest}", "training.activation_checkpointing=sometimes"])
    old = load_run_config(None, [f"data.train_manifest={manifest}"])
    assert old.training.activation_checkpointing == "auto"


# --- fused kernels -----------------------------------------------------------------------------------


def _count_calls(module) -> list:
    calls = []
    module.register_forward_pre_hook(lambda *_: calls.append(1))
    return calls


def test_fused_kernels_auto_is_unfused_without_liger_and_liger_without_it_is_one_clear_error(monkeypatch, tmp_path):
    import longvu.kernels as kernels
    from train.config import ConfigError, load_run_config

    monkeypatch.setattr(kernels, "liger_installed", lambda: False)
    assert kernels.resolve_fused_kernels("auto", torch.device("cpu")) == "none"
    assert kernels.resolve_fused_kernels("auto", torch.device("cuda")) == "none"
    with pytest.raises(ValueError, match=r"^training.fused_kernels 'liger': the liger-kernel package is not installed"):
        kernels.resolve_fused_kernels("liger", torch.device("cuda"))
    manifest = tmp_path / "m.jsonl"
    manifest.write_text("")
    with pytest.raises(ConfigError, match="liger-kernel package is not installed"):
        load_run_config(None, [f"data.train_manifest={manifest}", "training.fused_kernels=liger"])
    with pytest.raises(ConfigError, match="fused_kernels 'triton': choose from auto, liger, none"):
        load_run_config(None, [f"data.train_manifest={manifest}", "training.fused_kernels=triton"])

    monkeypatch.setattr(kernels, "liger_installed", lambda: True)
    assert kernels.resolve_fused_kernels("auto", torch.device("cpu")) == "none"
    assert kernels.resolve_fused_kernels("auto", torch.device("cuda")) == "liger"
    assert kernels.resolve_fused_kernels("none", torch.device("cuda")) == "none"
    with pytest.raises(ValueError, match="need a CUDA GPU"):
        kernels.resolve_fused_kernels("liger", torch.device("cpu"))


def test_unfused_path_keeps_the_qwen2_modules_and_the_chunked_loss():
    from transformers.models.qwen2.modeling_qwen2 import Qwen2MLP, Qwen2RMSNorm

    from longvu.kernels import apply_fused_kernels

    model = tiny_model("video").train()
    apply_fused_kernels(model, "none")
    assert type(model.lm_head) is torch.nn.Linear
    layer = model.model.layers[0]
    assert type(layer.mlp) is Qwen2MLP and "forward" not in vars(layer.mlp)
    assert type(layer.input_layernorm) is Qwen2RMSNorm and "forward" not in vars(layer.input_layernorm)
    calls = _count_calls(model.lm_head)
    ids = torch.randint(0, 1000, (1, 20), generator=torch.Generator().manual_seed(0))
    model(input_ids=ids, labels=ids).loss.backward()
    assert len(calls) == 8 * 2  # 8 chunks, each recomputed in the backward pass


def _stub_liger(monkeypatch) -> dict:
    """liger_kernel.transformers with its two entry points we use, in plain torch on CPU (same signatures)."""
    import sys
    import types

    import torch.nn.functional as F

    calls = {}

    class LigerFusedLinearCrossEntropyLoss:
        def __init__(self, reduction="mean"):
            self.reduction = reduction

        def __call__(self, lin_weight, _input, target, bias=None):
            calls["flce"] = calls.get("flce", 0) + 1
            return F.cross_entropy(F.linear(_input, lin_weight, bias).float(), target, reduction=self.reduction)

    package, transformers_module = types.ModuleType("liger_kernel"), types.ModuleType("liger_kernel.transformers")
    transformers_module.apply_liger_kernel_to_qwen2 = lambda **kw: calls.setdefault("patch", kw)
    transformers_module.LigerFusedLinearCrossEntropyLoss = LigerFusedLinearCrossEntropyLoss
    package.transformers = transformers_module
    monkeypatch.setitem(sys.modules, "liger_kernel", package)
    monkeypatch.setitem(sys.modules, "liger_kernel.transformers", transformers_module)
    return calls


def test_liger_path_patches_the_llm_and_takes_the_loss_in_one_fused_call(monkeypatch):
    """Liger's kernels need a GPU; here its API is stubbed in torch, so what is tested is our wiring:
    the patch call, one fused lm_head call per loss, the same loss, gradients and logits."""
    from longvu.kernels import FusedCrossEntropyHead, apply_fused_kernels

    calls = _stub_liger(monkeypatch)
    ids = torch.randint(0, 1000, (2, 16), generator=torch.Generator().manual_seed(0))
    labels = ids.clone()
    labels[0, :5] = -100
    reference = tiny_model("video").train()
    ref_loss = reference(input_ids=ids, labels=labels).loss
    ref_loss.backward()

    model = tiny_model("video").train()
    apply_fused_kernels(model, "liger")
    assert calls["patch"] == dict(rope=True, rms_norm=True, swiglu=True, cross_entropy=False,
                                  fused_linear_cross_entropy=False, model=model)
    assert isinstance(model.lm_head, FusedCrossEntropyHead) and "lm_head.weight" in model.state_dict()
    head_calls = _count_calls(model.lm_head)
    loss = model(input_ids=ids, labels=labels).loss
    loss.backward()
    assert calls["flce"] == 1 and len(head_calls) == 1
    # fp32 summation-order noise only (one cross-entropy over all tokens vs our chunked one): ~1e-6 on
    # gradients of ~0.3; a wiring fault moves them by their own size
    torch.testing.assert_close(loss, ref_loss, rtol=0, atol=5e-6)
    for (name, p), q in zip(model.named_parameters(), reference.parameters()):
        if q.grad is not None:
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=5e-6, msg=name)
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, reference(input_ids=ids).logits)


def test_a_config_error_found_in_a_rank_is_one_line_and_exit_2(tmp_path):
    """training.checkpointed_layers can only be checked against the built model (in the rank): the
    rank still reports it as one `longvu train:` line with exit status 2, not a traceback."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    from data.synthetic import write_synthetic_dataset
    from test_train import _free_port

    manifest = write_synthetic_dataset(tmp_path / "data", 1, 0)
    env = {**os.environ, "RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "LOCAL_WORLD_SIZE": "1",
           "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port())}
    config = tmp_path / "run.json"  # JSON is YAML
    config.write_text(json.dumps({
        "model": {"init": "tiny:video", "dtype": "fp32"}, "data": {"train_manifest": str(manifest), "num_workers": 0},
        "training": {"output_dir": str(tmp_path / "out"), "max_steps": 1, "report_to": [],
                     "activation_checkpointing": "selective", "checkpointed_layers": 5}}))
    proc = subprocess.run(
        [sys.executable, "-m", "train", "train", str(config)],
        cwd=Path(__file__).resolve().parents[1], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "longvu train: training.checkpointed_layers=5: expected 1..1 for this model's 2 decoder layers" in proc.stderr
    assert "Traceback" not in proc.stderr


def _run_config(tmp_path, *overrides):
    from train.config import load_run_config

    manifest = tmp_path / "m.jsonl"
    manifest.write_text("")
    return load_run_config(None, [f"data.train_manifest={manifest}", *overrides])


def test_compiled_towers_in_training_give_the_eager_loss_and_gradients(tmp_path):
    import copy

    from test_model import media
    from train.model_setup import apply_tower_speed

    torch.manual_seed(0)
    eager = tiny_model("video").train()
    compiled = copy.deepcopy(eager)
    apply_tower_speed(compiled, _run_config(tmp_path, "training.compile_towers=true"), torch.device("cpu"))
    assert all(tower._compiled is not None for tower in compiled.model.towers)
    assert all(tower._compiled is None for tower in eager.model.towers)
    ids = torch.tensor([[5, 6, -200, 7, 8, 9, 10]])
    inputs = media([(10, 3, (36, 64), "video")])
    results = []
    for model in (eager, compiled):
        loss = model(input_ids=ids, labels=ids.clamp_min(0), **inputs).loss
        loss.backward()
        grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
        results.append((loss.detach(), grads))
    (ref_loss, ref_grads), (loss, grads) = results
    assert any("vision_sampler" in n for n in ref_grads)  # the connector behind the towers trains
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-6)
    assert grads.keys() == ref_grads.keys()
    for name, grad in ref_grads.items():
        torch.testing.assert_close(grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)


def test_fp8_towers_in_training_keep_the_loss_and_train_the_connector(tmp_path):
    import copy

    from longvu.fp8 import Fp8Linear
    from longvu.tiny import TINY_DINO
    from test_model import media
    from train.model_setup import apply_tower_speed

    torch.manual_seed(0)
    bf16_towers = tiny_model("video", dino_config=dict(TINY_DINO, hidden_size=48)).train()  # 40 is not FP8-aligned
    fp8_towers = copy.deepcopy(bf16_towers)
    apply_tower_speed(fp8_towers, _run_config(tmp_path, "training.fp8_towers=true"), torch.device("cpu"))
    assert all(any(isinstance(m, Fp8Linear) for m in t.modules()) for t in fp8_towers.model.towers)
    assert all(t._compiled is not None for t in fp8_towers.model.towers)  # FP8 towers always run compiled
    ids = torch.tensor([[5, 6, -200, 7, 8, 9, 10]])
    inputs = media([(10, 3, (36, 64), "video")])
    losses, grads = [], []
    for model in (bf16_towers, fp8_towers):
        loss = model(input_ids=ids, labels=ids.clamp_min(0), **inputs).loss
        loss.backward()
        losses.append(loss.item())
        grads.append({n for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0] == grads[1] and any("vision_sampler" in n for n in grads[1])
    assert losses[1] != losses[0] and abs(losses[1] - losses[0]) < 1e-2 * abs(losses[0])


def test_tower_speed_options_refuse_trained_towers_and_a_gpu_without_fp8_units(tmp_path, monkeypatch):
    from train.config import ConfigError
    from train.model_setup import apply_tower_speed
    from train.preflight import path_problems

    config = _run_config(tmp_path, "training.compile_towers=true", "training.unfreeze_towers=true")
    assert any(p.startswith("training.compile_towers=true: applies to frozen towers only") for p in path_problems(config))
    assert not any("towers" in p for p in path_problems(_run_config(tmp_path, "training.compile_towers=true")))
    assert not any("towers" in p for p in path_problems(_run_config(tmp_path, "training.fp8_towers=true")))
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))  # an A100
    model = tiny_model("video")
    with pytest.raises(ConfigError, match=r"^training.fp8_towers=true: FP8 matmuls need a GPU of compute capability "
                                          r"8.9\+ \(Ada, Hopper\); cuda:0 is 8.0$"):
        apply_tower_speed(model, _run_config(tmp_path, "training.fp8_towers=true"), torch.device("cuda:0"))
    assert all(tower._compiled is None for tower in model.model.towers)


def test_batches_reach_the_device_with_floating_tensors_cast_there_and_integers_kept():
    from train.trainer import to_device

    pixels, ids = torch.randn(2, 3, 4, 4), torch.arange(6).view(2, 3)
    on_meta = to_device(pixels, torch.device("meta"), torch.bfloat16)
    assert (on_meta.device.type, on_meta.dtype, on_meta.shape) == ("meta", torch.bfloat16, pixels.shape)
    assert to_device(ids, torch.device("meta"), torch.bfloat16).dtype == torch.long
    assert torch.equal(to_device(pixels, torch.device("cpu"), torch.bfloat16), pixels.to(torch.bfloat16))
    assert to_device(pixels, torch.device("cpu"), None).dtype == torch.float32


def _sva_saved_bytes(layer, rows: int, k: int, width: int) -> int:
    """Bytes of the distinct storages one SVALayer forward keeps for its backward, its inputs excluded."""
    query, context = torch.randn(rows, width, dtype=torch.bfloat16), torch.randn(rows, width, dtype=torch.bfloat16)
    cells = [torch.randn(rows, k, width, dtype=torch.bfloat16) for _ in range(2)]
    mask = torch.ones(rows, 2 * k, dtype=torch.bool)
    return saved_bytes(lambda: layer(query.requires_grad_(), context, cells, mask),
                       [query, context, *cells, mask, *layer.parameters()])


@pytest.mark.parametrize("cell_side", [1, 2])  # the image stage's 576 queries, the video stage's 144
def test_the_connector_term_matches_what_an_sva_layer_keeps(cell_side):
    from types import SimpleNamespace

    from longvu.sva import SVALayer
    from train.activation_checkpointing import connector_bytes

    width, rows, k = 128, 200, cell_side ** 2
    measured = _sva_saved_bytes(SVALayer(width, 2, k, 4).to(torch.bfloat16), rows, k, width)
    cfg = SimpleNamespace(mm_vision_tower_aux_token_len_list=[576, 576], cell_side=cell_side, vision_hidden_size=width,
                          connector_depth=3)
    kept, recomputed = connector_bytes(cfg, rows)
    cells = 2 * 2 * k * width * rows
    assert abs((recomputed - cells) - measured) < 0.1 * measured  # one layer
    assert kept - cells == 3 * (recomputed - cells)  # every layer when none is recomputed


def test_the_plan_counts_the_connector_for_the_frames_a_video_can_bring(caplog):
    from longvu.tiny import tiny_model
    from train.activation_checkpointing import connector_bytes, memory_model
    from train.config import RunConfig

    model = tiny_model("video")
    config = RunConfig()
    queries = model.config.query_num_list[0]
    config.data.max_frames, config.data.per_device_batch_size = 50, 2
    config.data.max_tokens_per_batch = 60 * queries  # images: at most 60 a batch, fewer than the frames
    mm = memory_model(model, config, None, world_size=1)
    assert (mm.connector_kept, mm.connector_recomputed) == connector_bytes(model.config, 100 * queries)
    config.data.max_tokens_per_batch = 150 * queries
    assert memory_model(model, config, None, world_size=1).connector_kept == connector_bytes(model.config, 150 * queries)[0]
    footprint = mm.footprint()
    assert footprint.peak(0) - footprint.peak(1) == (mm.connector_kept - mm.connector_recomputed
                                                      + footprint.kept_layer - footprint.checkpointed_layer)
    config.data.max_frames = None
    with caplog.at_level("WARNING", logger="train.activation_checkpointing"):
        assert memory_model(model, config, None, world_size=1).connector_kept == 0
    assert "data.max_frames unset" in caplog.text


def test_memory_model_of_the_7b_video_finetune_matches_the_measured_peak():
    """Issue 14: full 7B fine-tune, ZeRO-3 on one H200, 240-frame videos at 8K tokens, 8-bit Adam, Liger,
    nothing recomputed: 121.8 GiB allocated at most (scripts/bench/train_7b.py --mode video-finetune)."""
    from scripts.bench.vision_pipeline import released_shape_config
    from longvu.modeling import LongVUForCausalLM
    from train.activation_checkpointing import GIB, memory_model
    from train.config import RunConfig
    from train.model_setup import set_trainable

    config = RunConfig()
    config.training.optimizer, config.data.max_frames, config.data.max_tokens_per_batch = "adamw_8bit", 240, 8192
    # as measured (before longvu.kept_activations): kept layers held their MLP products and norm outputs
    config.training.recompute_mlp_product = config.training.recompute_norm_outputs = False
    with torch.device("meta"):
        model = LongVUForCausalLM(released_shape_config(llm_layers=28))
    set_trainable(model, config)
    footprint = memory_model(model, config, {"zero_optimization": {"stage": 3}}, world_size=1, fused=True).footprint()
    assert abs(footprint.peak(0) / GIB - 121.8) < 0.05 * 121.8
    config.data.max_frames = 1  # without the connector's 240 frames the estimate falls short of the measurement
    assert memory_model(model, config, {"zero_optimization": {"stage": 3}}, world_size=1,
                        fused=True).footprint().peak(0) / GIB < 0.95 * 121.8


def test_the_connector_rows_are_the_records_media_bound_else_the_configs_caps():
    from longvu.tiny import tiny_model
    from train.activation_checkpointing import connector_rows
    from train.config import RunConfig

    cfg = tiny_model("video").config
    queries = cfg.query_num_list[0]
    config = RunConfig()
    config.data.max_frames, config.data.per_device_batch_size, config.data.max_tokens_per_batch = 40, 1, 20 * queries
    assert connector_rows(config, cfg, 0) == 0  # text-only records
    assert connector_rows(config, cfg, 57) == 57 * queries  # the records' bound, above the frame cap: it holds
    assert connector_rows(config, cfg) == 40 * queries  # records unknown: videos of up to max_frames may come
    config.data.max_frames = None
    assert connector_rows(config, cfg, 57) == 57 * queries
    assert connector_rows(config, cfg) is None
