#!/usr/bin/env python
"""Training speed and memory at the released 7B shapes (random weights) on one GPU: ours with the
throughput levers, beside its baselines, from one call.

    python scripts/bench/train_7b.py --mode lora-text --variants ours,baseline,stock,stock-liger --check-kernels
    python scripts/bench/train_7b.py --mode lora-video --variants ours,baseline
    python scripts/bench/train_7b.py --mode video-finetune --variants ours,baseline
    python scripts/bench/train_7b.py --mode image-pretrain --variants ours,ours-nopack,baseline --packing on
    python scripts/bench/train_7b.py --mode image-pretrain --variants ours,ours-adamw --optimizer adamw_8bit

Modes: `lora-text` (lora_video stage, ZeRO-2, text-only 8K-token samples), `lora-video` (lora_video,
ZeRO-2, 240-frame 1-fps videos filling the 8K budget), `video-finetune` (full 7B, ZeRO-3, the same
videos), `image-pretrain` (full 7B, ZeRO-3, a OneVision-like mix of single- and multi-image samples
of 300-3,000 tokens).

Variants: `ours` (the levers as given: --activation-checkpointing, --fused-kernels, --packing,
--compile-towers, --fp8-towers), `ours-nopack` (the same without packing), `ours-eager-towers` (the
same with the towers neither compiled nor in FP8), `ours-fp8-towers` (the same with the towers' linear
layers in FP8 as well), `ours-qlora` (the same with lora.quantize 4bit), `ours-fp8-base` (the
same with lora.quantize fp8: the LLM's frozen base weights in e4m3, its matmuls in FP8),
`ours-adamw` (the same with fp32 Adam moments whatever --optimizer says), `ours-varlen` (the same
with `model.attn_implementation: sdpa_varlen`: packed rows through PyTorch's variable-length flash
kernel instead of SDPA with a [T, T] block mask), `ours-persist` (the same with ZeRO-3's
`stage3_param_persistence_threshold` above every tensor, so no parameter is released and fetched
again: on one GPU ZeRO-3 partitions nothing), `ours-capped` (the same
with the activation-checkpointing plan's estimated peak capped at --capped-gib, by default stock
LoRA's measured 31.7 GiB; any variant takes the `-capped` suffix, e.g. `ours-fp8-base-capped`, or
`-capped<GiB>` for another cap, e.g. `ours-capped30.9`), `baseline` (our trainer as before the
levers: every layer recomputed, unfused, no packing, eager towers), `stock` (HF Qwen2-7B + PEFT LoRA r=64 on all linear layers, gradient
checkpointing, SDPA, AdamW, on 8K tokens), `stock-liger` (the same with Liger's Qwen2 kernels).
Modifiers, after a variant's name in this order and before `-capped` (`longvu/kept_activations.py`):
`-keep-product` (kept layers keep their MLP products: training.recompute_mlp_product false),
`-keep-norms` (... their RMSNorm outputs: training.recompute_norm_outputs false), `-fp8-mlp` (... hold
gate and up in FP8: training.fp8_mlp_activations true), `-adam8` (training.optimizer adamw_8bit),
`-no-triton` (LoRA dropout and the FP8 quantizations as PyTorch ops: training.triton_kernels false),
`-peft-lora` (each LoRA layer through peft's own forward: lora.fused false), e.g.
`ours-fp8-base-fp8-mlp-adam8-capped`; each modified variant is compared with the same one unmodified.
Our variants run `longvu train` (no checkpoint saved) and read its log: s/step, tokens/s, MFU (vision
towers, connector and LLM FLOPs), tokens a step, data wait per step: medians over the steps after the
first; peak memory: the most over them. `--profile`: where our variants' last step spends its time (train/profiling.py).
`--check-kernels` compares Liger's path with the unfused one on a 2-layer 7B-width LLM in bf16;
`--check-packed-attention` compares `sdpa_varlen` with SDPA's block mask on a packed row the same way;
`--check-fp8-base` LoRA over an FP8 base with LoRA over the bf16 one (loss, adapter gradients, time);
`--check-lora-dropout` LoRA's dropout folded into lora_A with peft's own dropout (peak memory, time).
`--check-kept-activations` what kept layers hold (product and norm outputs rebuilt, gate and up in
FP8) against everything kept, with Liger (loss and gradients against the all-kept path's, and that
path's against a repeat of itself; peak memory, time).
`--check-fused-lora` each LoRA layer as one autograd op against peft's forward, over the bf16 and the
FP8 base (loss and gradients, peak memory, the forward's host and GPU time, forward + backward time).
`--check-host-time` a LoRA step's host and GPU time, forward and backward, and where the host's goes
(cProfile).
`--check-triton-kernels` each of longvu/triton_kernels.py against the PyTorch ops it replaces (as the
trainer runs them, compiled where it compiles them) at the 7B shapes: agreement and GPU time.
Each check frees the GPU memory it used before the variants start.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from scripts.bench.vision_pipeline import released_shape_config  # noqa: E402

MODES = {  # stage, DeepSpeed config, data
    "lora-text": ("lora_video", "configs/deepspeed/zero2.json", "text"),
    "lora-video": ("lora_video", "configs/deepspeed/zero2.json", "video"),
    "video-finetune": ("video_finetune", "configs/deepspeed/zero3.json", "video"),
    "image-pretrain": ("image_pretrain", "configs/deepspeed/zero3.json", "images"),
}
BASELINE_LEVERS = {"activation_checkpointing": "full", "fused_kernels": "none", "packing": False,
                   "compile_towers": False, "fp8_towers": False, "optimizer": "adamw", "recompute_mlp_product": False,
                   "recompute_norm_outputs": False, "fp8_mlp_activations": False, "triton_kernels": False,
                   "fused_lora": False}
STOCK_SEQ = 8192


# ---- data ------------------------------------------------------------------------------------


def _answer(words: int, seed: int) -> str:
    import numpy as np

    vocab = "camera scene colour surface light shadow frame moves holds still smooth bright dark left right".split()
    return " ".join(np.random.default_rng(seed).choice(vocab, words))


def write_dataset(out: Path, kind: str, n: int, seconds: int) -> Path:
    """A manifest of `n` records: `text` one ~8K-token conversation each; `video` 1-fps 360x640 clips
    whose every frame is a new scene (JPEG frame folders, no codec needed); `images` 1-4 images of
    assorted shapes with text, 300-3,000 tokens a sample."""
    import numpy as np
    from PIL import Image

    from data.synthetic import scene_frames

    rng = np.random.default_rng(0)
    records = []
    for i in range(n):
        if kind == "text":
            long_answer = " ".join(f"Sentence {k}: the camera holds still on a smooth coloured surface." for k in range(640))
            records.append({"id": f"t{i}", "conversations": [{"from": "human", "value": "Describe the film."},
                                                           {"from": "gpt", "value": long_answer}]})
        elif kind == "video":
            folder = out / "media" / f"v{i}"
            folder.mkdir(parents=True, exist_ok=True)
            for t, frame in enumerate(scene_frames(seconds, 360, 640, seconds, seed=i)):
                Image.fromarray(frame).save(folder / f"{t:05d}.jpg", quality=90)
            records.append({"id": f"v{i}", "video": f"media/v{i}", "conversations": [
                {"from": "human", "value": "<video>\nDescribe every scene of this video in order."},
                {"from": "gpt", "value": _answer(100, i)}]})
        else:
            k = int(rng.integers(1, 5))
            paths = []
            for j in range(k):
                h, w = [(384, 384), (360, 640), (640, 360), (200, 640)][int(rng.integers(0, 4))]
                path = out / "media" / f"i{i}_{j}.jpg"
                path.parent.mkdir(parents=True, exist_ok=True)
                Image.fromarray(scene_frames(1, h, w, 1, seed=i * 8 + j)[0]).save(path, quality=90)
                paths.append(str(path.relative_to(out)))
            question = "<image>\n" * k + "What do these pictures show?"
            records.append({"id": f"i{i}", "image": paths, "conversations": [
                {"from": "human", "value": question}, {"from": "gpt", "value": _answer(int(rng.integers(20, 500)), i)}]})
    manifest = out / "manifest.jsonl"
    out.mkdir(parents=True, exist_ok=True)
    manifest.write_text("".join(json.dumps(r) + "\n" for r in records))
    return manifest


# ---- our trainer ------------------------------------------------------------------------------


VARIANT = re.compile(r"^(?P<base>.+?)(?P<keep_product>-keep-product)?(?P<keep_norms>-keep-norms)?"
                     r"(?P<fp8_mlp>-fp8-mlp)?(?P<adam8>-adam8)?(?P<no_triton>-no-triton)?(?P<peft_lora>-peft-lora)?"
                     r"(?P<capped>-capped(?P<cap>[0-9]+(?:\.[0-9]+)?)?)?$")


@dataclasses.dataclass(frozen=True)
class Variant:
    """A variant's name, parsed: its base variant and its modifiers (module docstring)."""

    base: str
    keep_product: bool
    keep_norms: bool
    fp8_mlp: bool
    adam8: bool
    no_triton: bool
    peft_lora: bool
    capped: bool
    cap_gib: float | None = None  # `-capped<GiB>`: this cap instead of --capped-gib

    @property
    def unmodified(self) -> str:
        """The same variant without its modifiers (`-capped<GiB>` as `-capped`, at --capped-gib)."""
        return self.base + ("-capped" if self.capped else "")


def split_variant(name: str) -> Variant:
    m = VARIANT.match(name)
    return Variant(m["base"], *(bool(m[key]) for key in ("keep_product", "keep_norms", "fp8_mlp", "adam8", "no_triton",
                                                         "peft_lora", "capped")),
                   float(m["cap"]) if m["cap"] else None)


def _levers(args, name: str) -> dict:
    v = split_variant(name)
    if v.base == "baseline":
        return dict(BASELINE_LEVERS)
    fast_towers = v.base != "ours-eager-towers"
    levers = {"activation_checkpointing": args.activation_checkpointing, "fused_kernels": args.fused_kernels,
              "packing": args.packing == "on" and v.base != "ours-nopack",
              "compile_towers": args.compile_towers == "on" and fast_towers,
              "fp8_towers": (args.fp8_towers or v.base == "ours-fp8-towers") and fast_towers}
    if v.capped:
        levers["activation_memory_gib"] = v.cap_gib or args.capped_gib
    levers["optimizer"] = "adamw_8bit" if v.adam8 else "adamw" if v.base == "ours-adamw" else args.optimizer
    levers["recompute_mlp_product"] = not v.keep_product
    levers["recompute_norm_outputs"] = not v.keep_norms
    levers["fp8_mlp_activations"] = v.fp8_mlp
    levers["triton_kernels"] = not v.no_triton
    levers["fused_lora"] = not v.peft_lora
    return levers


def _interesting(line: str) -> bool:
    return any(key in line for key in ("activation checkpointing", "fused kernels", "frozen towers", "lora.quantize",
                                       "| attention ",
                                       "optimizer adamw_8bit",
                                       "Error", "error:", "Traceback"))


def _deepspeed_config(path: str, variant: str, out: Path) -> str:
    """The DeepSpeed config of a variant: `path`, or for `ours-persist` a copy keeping every parameter."""
    if variant != "ours-persist":
        return path
    config = json.loads((ROOT / path).read_text())
    config["zero_optimization"]["stage3_param_persistence_threshold"] = 10**12
    out.mkdir(parents=True, exist_ok=True)
    (out / "deepspeed.json").write_text(json.dumps(config))
    return str(out / "deepspeed.json")


def run_ours(args, name: str, manifest: Path, init: str, deadline: float) -> dict:
    """One of our variants (`name`; a `-capped` suffix caps its plan at --capped-gib) -> its row."""
    stage, zero, _ = MODES[args.mode]
    levers = _levers(args, name)
    variant = split_variant(name).base
    out = args.work / name
    overrides = [
        f"model.init={init}", "model.dtype=bf16",
        f"model.attn_implementation={'sdpa_varlen' if variant == 'ours-varlen' else args.attn}", f"model.overrides.dino_threshold={args.dino_threshold}",
        f"model.overrides.drop_threshold={args.drop_threshold}",
        f"data.train_manifest={manifest}", f"data.max_tokens_per_batch={args.max_tokens}",
        *([f"data.max_frames={args.video_seconds}"] if MODES[args.mode][2] == "video" else []),  # 1 fps: all of them
        f"data.num_workers={args.num_workers}", f"data.packing={str(levers['packing']).lower()}",
        f"training.activation_checkpointing={levers['activation_checkpointing']}",
        f"training.fused_kernels={levers['fused_kernels']}",
        f"training.compile_towers={str(levers['compile_towers']).lower()}",
        f"training.fp8_towers={str(levers['fp8_towers']).lower()}",
        *(f"training.{key}={str(levers[key]).lower()}"
          for key in ("recompute_mlp_product", "recompute_norm_outputs", "fp8_mlp_activations", "triton_kernels")),
        f"lora.fused={str(levers['fused_lora']).lower()}",
        f"training.output_dir={out / 'run'}", f"training.max_steps={args.steps}",
        "training.save_steps=1000000", "training.save_at_end=false", "training.logging_steps=1",
        "training.report_to=[]", "training.resume=null", "training.warmup_ratio=0",
        f"deepspeed={_deepspeed_config(args.deepspeed or zero, variant, out)}",
    ]
    if variant == "ours-qlora":
        overrides.append("lora.quantize=4bit")
    if variant == "ours-fp8-base":
        overrides.append("lora.quantize=fp8")
    overrides.append(f"training.optimizer={levers['optimizer']}")
    if args.profile:  # the last step, left out of the medians
        overrides += ["training.profile_steps=1", f"training.profile_from_step={args.steps}"]
    if variant != "baseline" and args.checkpointed_layers is not None:
        overrides.append(f"training.checkpointed_layers={args.checkpointed_layers}")
    cap = levers.get("activation_memory_gib", args.activation_memory_gib if variant != "baseline" else None)
    if cap is not None:
        overrides.append(f"training.activation_memory_gib={cap}")
    if args.gpu_memory_gib is not None and variant != "baseline":
        overrides.append(f"training.gpu_memory_gib={args.gpu_memory_gib}")
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench.yaml").write_text(f"stage: {stage}\n")
    cmd = [sys.executable, "-m", "train", "train", str(out / "bench.yaml"), *overrides, "--nproc", str(args.nproc)]
    log = out / "train.log"
    print(f"[{name}] {' '.join(cmd)}\n[{name}] log: {log}", flush=True)
    start = time.perf_counter()
    with open(log, "w") as sink:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=sink, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            code = proc.wait(timeout=max(1.0, deadline - time.time()))
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            code = "timed out"
    lines = log.read_text(errors="replace").splitlines()
    for line in lines:
        if _interesting(line):
            print(f"[{name}]   {line[-220:]}")
    towers = "compile+fp8" if levers["fp8_towers"] else "compile" if levers["compile_towers"] else "eager"  # FP8 implies compile
    label = (f"{name}: ac {levers['activation_checkpointing']}, kernels {levers['fused_kernels']}, packing "
            f"{'on' if levers['packing'] else 'off'}, towers {towers}"
            + (f", cap {levers['activation_memory_gib']} GiB" if "activation_memory_gib" in levers else "")
            + ("" if variant == "baseline" else
               (", MLP product kept" if not levers["recompute_mlp_product"] else "")
               + (", norm outputs kept" if not levers["recompute_norm_outputs"] else "")
               + (", gate/up in FP8" if levers["fp8_mlp_activations"] else "")
               + (", no Triton passes" if not levers["triton_kernels"] else "")
               + (", peft's LoRA forward" if not levers["fused_lora"] else ""))
            + (", 8-bit Adam" if levers["optimizer"] == "adamw_8bit" else "")
            + (", varlen attention" if variant == "ours-varlen" else "")
            + (", FP8 LoRA base" if variant == "ours-fp8-base" else "")
            + (", ZeRO-3 params persistent" if variant == "ours-persist" else ""))
    resolved = [line.split(": ", 1)[1] for line in lines
                if ": fused kernels: " in line or "decoder layers recomputed" in line]
    summary = out / "run" / "run_summary.json"
    if code != 0 or not summary.is_file():
        print(f"[{name}] failed ({code}); last lines:\n" + "\n".join(lines[-40:]), flush=True)
        return {"name": label, "failed": str(code)}
    steps = [h for h in json.loads(summary.read_text())["log_history"] if "loss" in h][1:]  # step 1: start-up
    if args.profile:
        steps = steps[:-1]
        profile = out / "run" / "profile" / "rank0.summary.txt"
        text = profile.read_text().splitlines() if profile.is_file() else ["(no profile written)"]
        print(f"[{name}] profile of step {args.steps}:\n" + "\n".join(f"[{name}]   {line}" for line in text[:32]))
    pick = lambda key, of=statistics.median: of(float(h[key]) for h in steps) if steps and key in steps[0] else float("nan")  # noqa: E731
    tokens = [float(h["tokens_per_s"]) * float(h["step_time_s"]) for h in steps if "tokens_per_s" in h]  # each step's
    return {"name": label, "resolved": resolved, "s_per_step": pick("step_time_s"), "tokens_per_s": pick("tokens_per_s"), "mfu": pick("mfu"),
            "peak_gib": pick("peak_memory_gib", max), "reserved_gib": pick("peak_reserved_gib", max),
            "tokens_per_step": statistics.median(tokens) if tokens else float("nan"),
            "data_wait_s": pick("data_wait_s"), "wall_s": time.perf_counter() - start}


# ---- stock Hugging Face -------------------------------------------------------------------------


def _stock_model(liger: bool):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import Qwen2Config, Qwen2ForCausalLM

    cfg = Qwen2Config(vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                      num_attention_heads=28, num_key_value_heads=4, max_position_embeddings=32768,
                      rope_parameters={"rope_type": "default", "rope_theta": 1e6}, tie_word_embeddings=False)
    with torch.device("cuda"):
        model = Qwen2ForCausalLM._from_config(cfg, dtype=torch.bfloat16, attn_implementation="sdpa")
    if liger:
        from liger_kernel.transformers import apply_liger_kernel_to_qwen2

        apply_liger_kernel_to_qwen2(model=model)  # RoPE, RMSNorm, SwiGLU, fused linear cross-entropy
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False
    return get_peft_model(model, LoraConfig(r=64, lora_alpha=128, lora_dropout=0.05, task_type="CAUSAL_LM",
                                            target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                            "up_proj", "down_proj"])), cfg


def _stock_flops(model, cfg, seq: int) -> float:
    """Model FLOPs of one LoRA step by our convention (train.metrics.FlopModel), LLM only."""
    from train.metrics import FlopModel

    base = model.get_base_model()
    params = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    flops = FlopModel(params(base.model.layers), params(base.lm_head), cfg.num_hidden_layers, cfg.hidden_size,
                      0, 0, 0, 0, 0, 0, 0, 0, 0, 0, lora=True)
    return flops.step_flops([seq], seq - 1, 0, 0)


def run_stock(steps: int, liger: bool) -> dict:
    import torch

    from train.metrics import peak_flops

    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    model, cfg = _stock_model(liger)
    optim = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    ids = torch.randint(0, 151000, (1, STOCK_SEQ), device="cuda")
    times = []
    for _ in range(steps):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        model(input_ids=ids, labels=ids).loss.backward()
        optim.step()
        optim.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    s = statistics.median(times[1:])
    peak = peak_flops(torch.device("cuda"))
    row = {"name": f"stock HF Qwen2-7B + PEFT LoRA{' + Liger' if liger else ''}", "s_per_step": s,
           "tokens_per_s": STOCK_SEQ / s, "mfu": _stock_flops(model, cfg, STOCK_SEQ) / s / peak if peak else float("nan"),
           "peak_gib": torch.cuda.max_memory_allocated() / 2**30, "reserved_gib": torch.cuda.max_memory_reserved() / 2**30,
           "tokens_per_step": STOCK_SEQ,
           "data_wait_s": 0.0, "wall_s": sum(times)}
    del model, optim
    torch.cuda.empty_cache()
    return row


# ---- kernel parity ---------------------------------------------------------------------------------


def _two_layer_llm():
    """LongVU with a 2-layer LLM at the 7B width, bf16, on the GPU (seeded)."""
    import torch

    from longvu.modeling import LongVUForCausalLM

    torch.manual_seed(0)
    with torch.device("cuda"):
        return LongVUForCausalLM(released_shape_config(llm_layers=2)).to(torch.bfloat16)


def _bf16_parity(ref_loss, ref_grads: dict, loss, grads: dict) -> str:
    """Relative loss difference and worst relative gradient difference against bf16 bounds."""
    loss_rel = float((loss - ref_loss).abs() / ref_loss.abs())
    grad_rel = max(float((grads[n] - g).norm() / g.norm().clamp_min(1e-12)) for n, g in ref_grads.items())
    ok = loss_rel < 1e-2 and grad_rel < 5e-2
    return (f"loss rel diff {loss_rel:.2e}, worst gradient rel diff {grad_rel:.2e} -> {'PASS' if ok else 'FAIL'} "
            f"(bf16 bounds 1e-2 / 5e-2)")


def check_kernels(tokens: int = 4096) -> str:
    """Loss and gradients of Liger's path against the unfused one, bf16, a 2-layer 7B-width LLM."""
    import torch

    from longvu.kernels import apply_fused_kernels

    ref = _two_layer_llm()
    ids = torch.randint(0, 151000, (1, tokens), device="cuda")

    def loss_and_grads(model):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        grads = {n: p.grad.float() for n, p in model.named_parameters() if p.grad is not None}
        return loss.float(), grads

    ref_loss, ref_grads = loss_and_grads(ref)  # before any Liger patch in this process
    fused = copy.deepcopy(ref)
    fused.zero_grad(set_to_none=True)
    apply_fused_kernels(fused, "liger")
    loss, grads = loss_and_grads(fused)
    del ref, fused
    torch.cuda.empty_cache()
    return (f"kernel parity, liger vs unfused (2-layer 7B-width LLM, bf16, {tokens} tokens): "
            f"{_bf16_parity(ref_loss, ref_grads, loss, grads)}")


def check_packed_attention(lengths=(3000, 1500, 2500, 700, 400), repeats: int = 5) -> str:
    """A packed row under `sdpa_varlen` (PyTorch's varlen flash kernel) against SDPA with its [T, T]
    block mask (the path before it): loss and gradients in bf16 on a 2-layer 7B-width LLM, and the
    forward + backward time of each (medians of `repeats` after one warm-up)."""
    import torch

    from longvu.packed_attention import VARLEN_ATTENTION

    ref = _two_layer_llm()
    ref.config._attn_implementation = "sdpa"
    width = max(lengths)
    ids = torch.randint(0, 151000, (len(lengths), width), device="cuda")
    mask = (torch.arange(width, device="cuda")[None] < torch.tensor(lengths, device="cuda")[:, None]).long()

    def loss_grads_ms(model):
        times = []
        for _ in range(repeats + 1):
            model.zero_grad(set_to_none=True)
            torch.cuda.synchronize()
            start = time.perf_counter()
            loss = model(input_ids=ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100),
                         pack_sequences=True).loss
            loss.backward()
            torch.cuda.synchronize()
            times.append(1000 * (time.perf_counter() - start))
        grads = {n: p.grad.float() for n, p in model.named_parameters() if p.grad is not None}
        return loss.float(), grads, statistics.median(times[1:])

    ref_loss, ref_grads, ref_ms = loss_grads_ms(ref)
    varlen = copy.deepcopy(ref)
    varlen.config._attn_implementation = VARLEN_ATTENTION
    loss, grads, ms = loss_grads_ms(varlen)
    del ref, varlen
    torch.cuda.empty_cache()
    return (f"packed attention, {VARLEN_ATTENTION} vs sdpa block mask (2-layer 7B-width LLM, bf16, samples {list(lengths)} "
            f"in one row of {sum(lengths)}): {_bf16_parity(ref_loss, ref_grads, loss, grads)}; "
            f"forward + backward {ms:.1f} ms vs {ref_ms:.1f} ms")


def _timed_step(model, ids, repeats: int):
    """`repeats` + 1 forward + backward passes of `model` on `ids` (the same dropout masks each time) ->
    (loss, gradients, peak MiB above the weights, median ms after the first)."""
    import torch

    times, peaks = [], []
    for _ in range(repeats + 1):
        model.zero_grad(set_to_none=True)
        torch.manual_seed(2)
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        torch.cuda.synchronize()
        times.append(1000 * (time.perf_counter() - start))
        peaks.append((torch.cuda.max_memory_allocated() - before) / 2**20)
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return loss.detach(), grads, max(peaks), statistics.median(times[1:])


def check_fp8_base(tokens: int = 8192, repeats: int = 5) -> str:
    """LoRA (r=64, every linear layer, no dropout) over an FP8 base (`lora.quantize: fp8`) against the
    same adapters over the bf16 base: loss, the adapters' gradients and forward + backward time on a
    2-layer 7B-width LLM at `tokens` tokens (medians of `repeats` after one warm-up)."""
    import torch

    from longvu.quantize import quantize_llm_fp8
    from train.config import RunConfig
    from train.model_setup import apply_lora, set_trainable

    config = RunConfig()
    config.lora.enabled, config.lora.dropout = True, 0.0
    base = _two_layer_llm()
    set_trainable(base, config)
    ref = apply_lora(base, config)
    torch.manual_seed(1)
    for name, p in ref.named_parameters():
        if "lora_B" in name:  # adapters that already move the output, so lora_A's gradients are not zero
            p.data.normal_(0, 0.01)
    fp8 = copy.deepcopy(ref)
    quantize_llm_fp8(fp8.get_base_model())
    ids = torch.randint(0, 151000, (1, tokens), device="cuda")

    def loss_grads_ms(model):
        loss, grads, _, ms = _timed_step(model, ids, repeats)
        return loss.float(), {n: g.float() for n, g in grads.items() if "lora_" in n}, ms

    ref_loss, ref_grads, ref_ms = loss_grads_ms(ref)
    loss, grads, ms = loss_grads_ms(fp8)
    loss_rel = float((loss - ref_loss).abs() / ref_loss.abs())
    grad_rel = max(float((grads[n] - g).norm() / g.norm().clamp_min(1e-12)) for n, g in ref_grads.items())
    cosine = _lowest_cosine(grads, ref_grads)
    transient = ", ".join(f"{name} {_linear_peak_mib(fp8_layer, tokens):.0f} vs {_linear_peak_mib(bf16_layer, tokens):.0f} MiB"
                          for name, fp8_layer, bf16_layer in _fp8_base_layers(fp8, ref))
    return (f"FP8 LoRA base vs bf16 base (2-layer 7B-width LLM, LoRA r=64 on every linear layer, {tokens} tokens): "
            f"loss rel diff {loss_rel:.2e}, adapter gradients: worst rel diff {grad_rel:.2e}, lowest cosine "
            f"{cosine:.4f} ({len(ref_grads)} tensors); forward + backward {ms:.1f} ms vs {ref_ms:.1f} ms; one base "
            f"layer's forward + input-gradient peak above its weights, FP8 vs bf16: {transient}")


def _fp8_base_layers(fp8, ref):
    """(name, FP8 base layer, bf16 base layer) for layer 0's up_proj and down_proj of two peft models."""
    for name in ("up_proj", "down_proj"):
        yield (name, getattr(fp8.get_base_model().model.layers[0].mlp, name).base_layer,
               getattr(ref.get_base_model().model.layers[0].mlp, name).base_layer)


def _linear_peak_mib(layer, tokens: int) -> float:
    """Peak MiB above what was allocated before one forward + input-gradient pass of a frozen linear
    layer on `tokens` bf16 rows (input, output and both gradients included)."""
    import torch

    x = torch.randn(tokens, layer.in_features, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    layer(x).sum().backward()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - before) / 2**20


def check_lora_dropout(tokens: int = 8192, repeats: int = 5) -> str:
    """LoRA (r=64, every linear layer, dropout 0.05) with its dropout folded into lora_A
    (`longvu.lora_dropout`, what `longvu train` runs) against peft's own dropout module: peak memory
    above the weights and forward + backward time on a 2-layer 7B-width LLM at `tokens` tokens."""
    import torch

    from longvu.lora_dropout import DropoutLoraA
    from train.config import RunConfig
    from train.model_setup import apply_lora, set_trainable

    config = RunConfig()
    config.lora.enabled, config.lora.dropout = True, 0.05
    base = _two_layer_llm()
    set_trainable(base, config)
    folded = apply_lora(base, config)
    plain = copy.deepcopy(folded)
    for module in plain.modules():  # back to peft's own dropout module
        if isinstance(getattr(module, "lora_A", None), torch.nn.ModuleDict):
            for adapter, lora_a in module.lora_A.items():
                if isinstance(lora_a, DropoutLoraA):
                    module.lora_dropout[adapter] = torch.nn.Dropout(lora_a.p)
                    lora_a.__class__ = torch.nn.Linear
    ids = torch.randint(0, 151000, (1, tokens), device="cuda")

    _, _, plain_mib, plain_ms = _timed_step(plain, ids, repeats)
    _, _, folded_mib, folded_ms = _timed_step(folded, ids, repeats)
    return (f"LoRA dropout 0.05 folded into lora_A vs peft's dropout (2-layer 7B-width LLM, r=64 on every linear layer, "
            f"{tokens} tokens): peak above the weights {folded_mib:.0f} MiB vs {plain_mib:.0f} MiB "
            f"({(plain_mib - folded_mib) / 2 / tokens * 2**20:.0f} bytes a token a layer less); "
            f"forward + backward {folded_ms:.1f} ms vs {plain_ms:.1f} ms")


def _difference(a, b) -> str:
    """How two (loss, gradients, ...) results differ: bit for bit, or the worst relative difference."""
    import torch

    (loss_a, grads_a), (loss_b, grads_b) = a[:2], b[:2]
    if torch.equal(loss_a, loss_b) and all(torch.equal(grads_a[n], g) for n, g in grads_b.items()):
        return "bit for bit equal"
    worst = max(float((grads_a[n].float() - g.float()).norm() / g.float().norm().clamp_min(1e-12)) for n, g in grads_b.items())
    return f"loss rel diff {float((loss_a - loss_b).abs() / loss_b.abs()):.1e}, worst gradient rel diff {worst:.1e}"


def _lowest_cosine(grads: dict, ref_grads: dict) -> float:
    """The lowest cosine between the LoRA adapters' gradients in `grads` and in `ref_grads` (other
    trained tensors, e.g. the connector's, get zero gradients on text-only batches)."""
    import torch

    return min(float(torch.nn.functional.cosine_similarity(grads[n].float().flatten(), g.float().flatten(), dim=0))
               for n, g in ref_grads.items() if "lora_" in n)


def _lora_llm(layers: int):
    """LongVU with a `layers`-layer 7B-width LLM, LoRA r=64 on every linear layer (dropout 0.05, folded),
    adapters moving the output, Liger's kernels, all bf16 as DeepSpeed trains it (seeded)."""
    import torch

    from longvu.kernels import apply_fused_kernels
    from longvu.modeling import LongVUForCausalLM
    from train.config import RunConfig
    from train.model_setup import apply_lora, set_trainable

    config = RunConfig()
    config.lora.enabled, config.lora.dropout = True, 0.05
    torch.manual_seed(0)
    with torch.device("cuda"):
        base = LongVUForCausalLM(released_shape_config(llm_layers=layers))
    set_trainable(base, config)
    model = apply_lora(base, config).to(torch.bfloat16)
    torch.manual_seed(1)
    for name, p in model.named_parameters():
        if "lora_B" in name:  # adapters that already move the output, so lora_A's gradients are not zero
            p.data.normal_(0, 0.01)
    apply_fused_kernels(model.get_base_model(), "liger")
    return model


def _kept_lora_llm(layers: int):
    """`_lora_llm(layers)` with its decoder layers keeping their activations as `longvu train`'s kept
    layers do at the bench's levers: products and norm outputs rebuilt, gate and up held in FP8."""
    from longvu.kept_activations import set_kept_layer_saving

    model = _lora_llm(layers)
    for layer in model.get_base_model().model.layers:
        set_kept_layer_saving(layer, kept=True, fused=True, product=True, norm_outputs=True, fp8_mlp=True)
    return model


def _forward_ms(model, ids, repeats: int) -> tuple[float, float]:
    """Medians over `repeats` forward passes (after one more) -> (ms until the host has queued the last
    kernel, ms until the GPU has run it): a forward whose two figures are close is bound by the host."""
    import torch

    host, done = [], []
    for _ in range(repeats + 1):
        torch.manual_seed(2)
        torch.cuda.synchronize()
        start = time.perf_counter()
        loss = model(input_ids=ids, labels=ids).loss
        host.append(1000 * (time.perf_counter() - start))
        torch.cuda.synchronize()
        done.append(1000 * (time.perf_counter() - start))
        del loss
    return statistics.median(host[1:]), statistics.median(done[1:])


def check_fused_lora(tokens: int = 8192, layers: int = 4, repeats: int = 5) -> str:
    """Each LoRA layer as one autograd op (`longvu.fused_lora`, what `longvu train` runs) against peft's
    own forward, over the bf16 base and then over the FP8 one (lora.quantize fp8), on
    `_lora_llm(layers)` with its decoder layers keeping their activations as `longvu train`'s kept
    layers do, at `tokens` tokens: loss and gradients against peft's path, peak memory, the forward's
    host and GPU time, forward + backward time."""
    import torch
    from peft.tuners import lora

    from longvu.fused_lora import FusedLoraLinear
    from longvu.quantize import quantize_llm_fp8

    model = _kept_lora_llm(layers)
    ids = torch.randint(0, 151000, (1, tokens), device="cuda")
    lines = []
    for base in ("bf16", "fp8"):
        if base == "fp8":
            quantize_llm_fp8(model.get_base_model(), "cuda")
        runs = {}
        for fused in (False, True):
            for module in model.modules():
                if isinstance(module, lora.Linear):
                    module.__class__ = FusedLoraLinear if fused else lora.Linear
            runs[fused] = (*_timed_step(model, ids, repeats), *_forward_ms(model, ids, repeats))
        (_, _, peft_mib, peft_ms, peft_host, peft_fwd), (_, _, ours_mib, ours_ms, ours_host, ours_fwd) = runs[False], runs[True]
        lines.append(f"{base} base: {_difference(runs[True], runs[False])}; peak above the weights {ours_mib:.0f} vs "
                     f"{peft_mib:.0f} MiB; forward host {ours_host:.1f} vs {peft_host:.1f} ms, GPU done "
                     f"{ours_fwd:.1f} vs {peft_fwd:.1f} ms; forward + backward {ours_ms:.1f} vs {peft_ms:.1f} ms "
                     f"({peft_ms / ours_ms:.2f}x)")
    return (f"fused LoRA layers vs peft's forward ({layers}-layer 7B-width LLM, r=64 on every linear layer, dropout "
            f"0.05, kept layers as trained, {tokens} tokens), ours vs peft's: " + " | ".join(lines))


def check_host_time(tokens: int = 8192, layers: int = 4, top: int = 25) -> str:
    """Where the host's time goes in a LoRA step as `longvu train` runs it (`_lora_llm(layers)`, the FP8
    base, kept layers holding gate/up in FP8, fused LoRA layers) at `tokens` tokens: the forward's and
    the backward's host and GPU time, then cProfile's `top` functions by own time over one forward +
    backward (the backward on the calling thread, so that its Python code is seen)."""
    import cProfile
    import io
    import pstats

    import torch

    from longvu.quantize import quantize_llm_fp8

    model = _kept_lora_llm(layers)
    quantize_llm_fp8(model.get_base_model(), "cuda")
    ids = torch.randint(0, 151000, (1, tokens), device="cuda")

    def step():
        torch.manual_seed(2)
        model.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        loss = model(input_ids=ids, labels=ids).loss
        t1 = time.perf_counter()
        torch.cuda.synchronize()
        t2 = time.perf_counter()
        loss.backward()
        t3 = time.perf_counter()
        torch.cuda.synchronize()
        t4 = time.perf_counter()
        return [1000 * d for d in (t1 - t0, t2 - t0, t3 - t2, t4 - t2)]

    for _ in range(2):
        step()
    fwd_host, fwd_done, bwd_host, bwd_done = (statistics.median(v) for v in zip(*(step() for _ in range(5))))
    torch.autograd.set_multithreading_enabled(False)
    profile = cProfile.Profile()
    profile.enable()
    step()
    profile.disable()
    torch.autograd.set_multithreading_enabled(True)
    text = io.StringIO()
    pstats.Stats(profile, stream=text).sort_stats("tottime").print_stats(top)
    body = "\n".join(line for line in text.getvalue().splitlines() if line.strip())
    return (f"host time ({layers}-layer 7B-width LLM, FP8 base, kept layers, fused LoRA, {tokens} tokens): forward host "
            f"{fwd_host:.1f} ms / GPU done {fwd_done:.1f} ms; backward host {bwd_host:.1f} ms / GPU done {bwd_done:.1f} ms; "
            f"cProfile of one forward + backward, top {top} by own time:\n{body}")


def check_kept_activations(tokens: int = 8192, repeats: int = 5) -> str:
    """What kept decoder layers hold (`longvu.kept_activations`): the MLP product rebuilt, then also the
    norm outputs (what `longvu train` runs), then also gate and up in FP8, against everything kept, on
    `_lora_llm(2)` at `tokens` tokens: loss and gradients against the all-kept path's (and that path
    against a repeat of itself, as the GPU's kernels need not be deterministic), the adapters'
    gradients' lowest cosine, peak memory above the weights, forward + backward time."""
    import torch

    from longvu.kept_activations import set_kept_layer_saving

    model = _lora_llm(2)
    ids = torch.randint(0, 151000, (1, tokens), device="cuda")

    def run(**holds):
        for layer in model.get_base_model().model.layers:
            set_kept_layer_saving(layer, kept=True, fused=True, **holds)
        return _timed_step(model, ids, repeats)

    kept = run(product=False)
    lines = [f"kept layers' holdings (Liger, 2-layer 7B-width LLM, LoRA r=64 on every linear layer, {tokens} tokens), "
             f"against everything kept ({kept[2]:.0f} MiB above the weights, {kept[3]:.1f} ms forward + backward; "
             f"a repeat of it: {_difference(run(product=False), kept)}):"]
    for label, holds in (("product rebuilt", {}), ("product and norm outputs rebuilt", {"norm_outputs": True}),
                         ("those and gate/up in FP8", {"norm_outputs": True, "fp8_mlp": True})):
        result = run(**holds)
        cosine = _lowest_cosine(result[1], kept[1])
        lines.append(f"  {label}: {_difference(result, kept)}, lowest adapter gradient cosine {cosine:.5f}; peak above the "
                     f"weights {result[2]:.0f} MiB ({(kept[2] - result[2]) / 2 / tokens * 2**20:.0f} bytes a token a "
                     f"layer less); forward + backward {result[3]:.1f} ms")
    return "\n".join(lines)


def _gpu_ms(fn, repeats: int = 20) -> float:
    """Median GPU milliseconds of `fn()` over `repeats` calls after two warm-ups (compilation included there)."""
    import torch

    fn(), fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(repeats):
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def _same_codes(a, b) -> str:
    """How two (codes, scales) quantizations agree: the fraction of equal codes, and whether the scales are equal."""
    import torch

    equal = (a[0].view(torch.uint8) == b[0].view(torch.uint8)).float().mean().item()
    return f"codes {100 * equal:.4f} % equal, scales {'equal' if torch.equal(a[1], b[1]) else 'differ'}"


def check_triton_kernels(tokens: int = 8192) -> str:
    """longvu/triton_kernels.py against the PyTorch ops it replaces, as the trainer runs them (the
    quantizations compiled, `compiled_on_gpu`), at the 7B LLM's widths for `tokens` tokens."""
    import torch

    from longvu import triton_kernels as tk
    from longvu.fp8 import _scaled_rows, compiled_on_gpu, quantize
    from longvu.kept_activations import BLOCK, dequantize_blocks, quantize_blocks
    from longvu.lora_dropout import _keep_mask

    lines = []
    hidden, inner = 3584, 18944
    x = torch.randn(tokens, inner, device="cuda", dtype=torch.bfloat16)
    g = torch.randn_like(x)
    p, seed, scale = 0.05, 1234, 1 / 0.95

    def torch_backward():
        keep = _keep_mask(x, p, seed)
        return torch.where(keep, g * scale, 0), torch.where(keep, x * scale, 0)

    y = tk.dropped(x, p, seed)
    kept = y != 0
    pair = tk.dropped_pair(x, g, p, seed)
    lines.append(
        f"dropout p={p} on [{tokens}, {inner}] bf16: kept {100 * kept.float().mean().item():.3f} %, kept values "
        f"{'equal' if torch.equal(y[kept], (x[kept].float() * scale).to(x.dtype)) else 'DIFFER from'} x / (1 - p), "
        f"pair {'equals' if torch.equal(pair[0], y) and torch.equal(pair[1], tk.dropped(g, p, seed)) else 'DIFFERS from'}"
        f" two single passes, another seed keeps {100 * (tk.dropped(x, p, seed + 1) != 0).eq(kept).float().mean().item():.2f} % "
        f"the same; forward {_gpu_ms(lambda: tk.dropped(x, p, seed)):.3f} ms vs torch "
        f"{_gpu_ms(lambda: torch.where(_keep_mask(x, p, seed), x / (1 - p), 0)):.3f}, backward pair "
        f"{_gpu_ms(lambda: tk.dropped_pair(x, g, p, seed)):.3f} ms vs torch {_gpu_ms(torch_backward):.3f}")
    for width in (hidden, inner):
        a = torch.randn(tokens, width, device="cuda", dtype=torch.bfloat16)
        column = torch.rand(1, width, device="cuda") + 0.5
        ours, ref = tk.quantize_rows(a), compiled_on_gpu("rows", quantize, a)
        ours_s, ref_s = tk.quantize_rows(a, column), compiled_on_gpu("scaled_rows", _scaled_rows, a, column)
        ms = _gpu_ms(lambda: tk.quantize_rows(a))
        lines.append(f"per-row quantization [{tokens}, {width}]: {_same_codes(ours, ref)}; with a column scale "
                     f"{_same_codes(ours_s, ref_s)}; {ms:.3f} ms ({3 * a.numel() / ms / 1e6:.0f} GB/s) vs compiled "
                     f"{_gpu_ms(lambda: compiled_on_gpu('rows', quantize, a)):.3f}; with the column scale "
                     f"{_gpu_ms(lambda: tk.quantize_rows(a, column)):.3f} vs "
                     f"{_gpu_ms(lambda: compiled_on_gpu('scaled_rows', _scaled_rows, a, column)):.3f}")
    ours = tk.quantize_rows(x.reshape(-1, BLOCK))
    ref = compiled_on_gpu("fp8_blocks", quantize_blocks, x, BLOCK)
    ref_flat = (ref[0].reshape(-1, BLOCK), ref[1].reshape(-1, 1))
    back = tk.dequantize_rows(*ours, torch.bfloat16)
    ref_back = compiled_on_gpu("fp8_unblocks", dequantize_blocks, *ref, torch.bfloat16).reshape(-1, BLOCK)
    ms = _gpu_ms(lambda: tk.quantize_rows(x.reshape(-1, BLOCK)))
    lines.append(f"blocks of {BLOCK} of [{tokens}, {inner}]: {_same_codes(ours, ref_flat)}; quantize {ms:.3f} ms "
                 f"({3 * x.numel() / ms / 1e6:.0f} GB/s) vs compiled "
                 f"{_gpu_ms(lambda: compiled_on_gpu('fp8_blocks', quantize_blocks, x, BLOCK)):.3f}; dequantize "
                 f"{'equal' if torch.equal(back, ref_back) else 'DIFFERS'}, "
                 f"{_gpu_ms(lambda: tk.dequantize_rows(*ours, torch.bfloat16)):.3f} ms vs compiled "
                 f"{_gpu_ms(lambda: compiled_on_gpu('fp8_unblocks', dequantize_blocks, *ref, torch.bfloat16)):.3f}")
    for shape in ((inner, hidden), (hidden, inner), (512, hidden)):
        codes = torch.randn(shape, device="cuda").to(torch.float8_e4m3fn)
        same = torch.equal(tk.transposed(codes).view(torch.uint8), codes.t().contiguous().view(torch.uint8))
        ms = _gpu_ms(lambda: tk.transposed(codes))
        lines.append(f"transpose {list(shape)} e4m3: {'equal' if same else 'DIFFERS'}, {ms:.3f} ms "
                     f"({2 * codes.numel() / ms / 1e6:.0f} GB/s) vs .t().contiguous() "
                     f"{_gpu_ms(lambda: codes.t().contiguous()):.3f}")
    return "Triton kernels vs PyTorch ops:\n  " + "\n  ".join(lines)


def run_check(name: str, check) -> None:
    """Print `check()`'s line (or its failure: the variants still run), then give its GPU memory back."""
    import gc

    import torch

    try:
        print(check(), flush=True)
    except Exception as err:
        print(f"{name} check failed: {type(err).__name__}: {err}", flush=True)
    gc.collect()
    torch.cuda.empty_cache()
    print(f"after the {name} check this process holds {torch.cuda.memory_reserved() / 2**30:.1f} GiB of GPU memory",
          flush=True)


# ---- main ------------------------------------------------------------------------------------


def print_table(rows: list[dict], args) -> None:
    print(f"\n{args.mode}, {args.steps} steps, GPU {_gpu_name()}")
    print(f"| {'run':<78} | s/step | tokens/step | tokens/s |  MFU  | peak GiB alloc / reserved | data wait s (%) |")
    print(f"|{'-' * 80}|--------|-------------|----------|-------|---------------------------|-----------------|")
    for r in rows:
        if "failed" in r:
            print(f"| {r['name']:<78} | failed: {r['failed']}")
            continue
        wait = r["data_wait_s"]
        share = 100 * wait / r["s_per_step"] if r["s_per_step"] else float("nan")
        print(f"| {r['name']:<78} | {r['s_per_step']:6.2f} | {r['tokens_per_step']:11.0f} | {r['tokens_per_s']:8.0f} "
              f"| {r['mfu']:5.3f} | {r['peak_gib']:12.1f} / {r['reserved_gib']:<10.1f} | {wait:6.3f} ({share:4.1f}%) |")
    for r in rows:
        for line in r.get("resolved", []):
            print(f"  {r['name'].split(':')[0]}: {line}")
    done = {r["name"].split(":")[0]: r for r in rows if "failed" not in r}
    others = ("baseline", "stock HF Qwen2-7B + PEFT LoRA", "stock HF Qwen2-7B + PEFT LoRA + Liger", "ours-nopack",
              "ours-eager-towers")
    for mine in ("ours", "ours-capped", "ours-fp8-towers", "ours-qlora", "ours-varlen", "ours-fp8-base",
                 "ours-fp8-base-capped", "ours-persist"):
        for other in others + (("ours",) if mine in ("ours-varlen", "ours-fp8-base", "ours-persist") else ()) \
                + (("ours-fp8-towers",) if mine == "ours-fp8-base" else ()) \
                + (("ours-capped",) if mine == "ours-fp8-base-capped" else ()):
            if mine in done and other in done:
                a, b = done[mine], done[other]
                print(f"{mine} vs {other}: {a['tokens_per_s'] / b['tokens_per_s']:.2f}x tokens/s, "
                      f"peak {a['peak_gib']:.1f} vs {b['peak_gib']:.1f} GiB")
    for mine in list(done):  # a modified variant against the same one without its modifiers; Triton passes on vs off
        pairs = [(mine, split_variant(mine).unmodified), (mine.replace("-no-triton", ""), mine)]
        for first, second in pairs:
            if first != second and first in done and second in done:
                a, b = done[first], done[second]
                print(f"{first} vs {second}: {a['tokens_per_s'] / b['tokens_per_s']:.2f}x tokens/s, "
                      f"peak {a['peak_gib']:.1f} vs {b['peak_gib']:.1f} GiB")


def _gpu_name() -> str:
    import torch

    return torch.cuda.get_device_name() if torch.cuda.is_available() else "none"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--mode", choices=sorted(MODES), required=True)
    parser.add_argument("--variants", default="ours,baseline",
                        help="comma list of ours, ours-<lever> (above), baseline, stock, stock-liger")
    parser.add_argument("--packing", choices=["on", "off"], default="off", help="data.packing for `ours`")
    parser.add_argument("--activation-checkpointing", choices=["auto", "full", "selective", "none"], default="auto")
    parser.add_argument("--checkpointed-layers", type=int, help="for selective: decoder layers recomputed")
    parser.add_argument("--activation-memory-gib", type=float, help="auto/selective fit within this much")
    parser.add_argument("--gpu-memory-gib", type=float, help="training.gpu_memory_gib: run as on a card this size")
    parser.add_argument("--capped-gib", type=float, default=31.7, help="the cap of the ours-capped variant")
    parser.add_argument("--fused-kernels", choices=["auto", "liger", "none"], default="auto")
    parser.add_argument("--compile-towers", choices=["on", "off"], default="on", help="training.compile_towers for `ours`")
    parser.add_argument("--fp8-towers", action="store_true", help="training.fp8_towers for `ours`")
    parser.add_argument("--optimizer", choices=["adamw", "adamw_8bit"], default="adamw",
                        help="training.optimizer for `ours` (`ours-adamw`: adamw whatever this says)")
    parser.add_argument("--attn", default="auto", help="model.attn_implementation (auto, sdpa, flex_attention, ...)")
    parser.add_argument("--check-kernels", action="store_true", help="Liger vs unfused loss/gradients in bf16")
    parser.add_argument("--check-packed-attention", action="store_true",
                        help="sdpa_varlen vs SDPA's block mask on a packed row: loss/gradients in bf16, time")
    parser.add_argument("--check-fp8-base", action="store_true",
                        help="LoRA over an FP8 base vs over the bf16 base: loss, adapter gradients, time")
    parser.add_argument("--check-lora-dropout", action="store_true",
                        help="LoRA dropout folded into lora_A vs peft's dropout module: peak memory, time")
    parser.add_argument("--check-fused-lora", action="store_true",
                        help="each LoRA layer as one autograd op vs peft's forward (bf16 and FP8 base): parity, "
                             "memory, host and GPU time")
    parser.add_argument("--check-host-time", action="store_true",
                        help="a LoRA step's host vs GPU time, forward and backward, and cProfile's top functions")
    parser.add_argument("--check-triton-kernels", action="store_true",
                        help="longvu/triton_kernels.py against the PyTorch ops it replaces: agreement, GPU time")
    parser.add_argument("--check-kept-activations", action="store_true",
                        help="what kept layers hold (product, norm outputs rebuilt; gate/up in FP8) vs everything "
                             "kept: parity, memory, time (Liger)")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--profile", action="store_true",
                        help="our variants: torch.profiler on the last step (training.profile_steps), its regions "
                             "and top GPU ops printed; that step is left out of the medians")
    parser.add_argument("--max-tokens", type=int, default=8192, help="data.max_tokens_per_batch")
    parser.add_argument("--num-workers", type=int, default=4, help="data.num_workers (the default count)")
    parser.add_argument("--deepspeed", help="DeepSpeed config (default: the mode's)")
    parser.add_argument("--nproc", type=int, default=1)
    parser.add_argument("--video-seconds", type=int, default=240)
    parser.add_argument("--llm-layers", type=int, default=28, help="decoder layers (28 = Qwen2-7B)")
    parser.add_argument("--init", help="model.init instead of the released shapes (e.g. tiny:image for a CPU smoke run)")
    parser.add_argument("--work", type=Path, default=Path("/tmp/longvu-bench"), help="data, runs and logs")
    parser.add_argument("--results", type=Path, help="also write the rows as JSON here")
    parser.add_argument("--time-limit-s", type=float, default=3600, help="stop starting runs; kill one past it")
    parser.add_argument("--dino-threshold", type=float, default=1.01,
                        help="above 1 keeps every frame: random DINO weights find all frames alike, a real "
                             "content-rich video keeps most of them; this fills the 8K budget as such a video does")
    parser.add_argument("--drop-threshold", type=float, default=1.01,
                        help="STC threshold; above 1 keeps every token (then the budget trim applies), for the "
                             "same reason")
    args = parser.parse_args()
    deadline = time.time() + args.time_limit_s
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    ours_variants = ("ours", "ours-capped", "ours-nopack", "ours-varlen", "ours-adamw", "ours-eager-towers", "ours-fp8-towers",
                     "ours-qlora", "ours-fp8-base", "ours-persist", "baseline")
    unknown = {v for v in variants if split_variant(v).base not in ours_variants} - {"stock", "stock-liger"}
    if unknown:
        parser.error(f"--variants: unknown {sorted(unknown)}")
    args.work.mkdir(parents=True, exist_ok=True)
    rows = []
    if "stock" in variants:  # first, so that the time limit never leaves the baseline out
        rows.append(run_stock(args.steps, liger=False))
    if args.check_packed_attention:  # first: ours-varlen runs this kernel
        run_check("packed attention", check_packed_attention)
    if args.check_fp8_base:
        run_check("FP8 LoRA base", check_fp8_base)
    if args.check_lora_dropout:
        run_check("LoRA dropout", check_lora_dropout)
    if args.check_kept_activations:
        run_check("kept activations", check_kept_activations)
    if args.check_triton_kernels:
        run_check("Triton kernels", check_triton_kernels)
    if args.check_fused_lora:
        run_check("fused LoRA", check_fused_lora)
    if args.check_host_time:
        run_check("host time", check_host_time)
    ours = [v for v in variants if split_variant(v).base in ours_variants]
    if ours:
        data_kind = MODES[args.mode][2]
        init = args.init
        if init is None:
            released_shape_config(llm_layers=args.llm_layers).save_pretrained(args.work / "config")
            init = f"config:{args.work / 'config'}"
        per_step = max(8, -(-args.max_tokens // 1000)) if data_kind == "images" else 1  # samples: ~1,800 tokens
        manifest = write_dataset(args.work / "data", data_kind, (args.steps + 2) * per_step, args.video_seconds)
        for variant in ours:
            if time.time() < deadline:
                rows.append(run_ours(args, variant, manifest, init, deadline))
    if args.check_kernels and time.time() < deadline:
        run_check("kernel parity", check_kernels)  # patches Qwen2 globally: after the plain stock run
    if "stock-liger" in variants and time.time() < deadline:
        rows.append(run_stock(args.steps, liger=True))
    print_table(rows, args)
    if args.results:
        args.results.parent.mkdir(parents=True, exist_ok=True)
        args.results.write_text(json.dumps({"mode": args.mode, "argv": sys.argv, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
