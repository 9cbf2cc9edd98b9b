#!/usr/bin/env python
"""Training speed and memory at the released 7B shapes (random weights) on GPUs, through `longvu train`.

    python scripts/bench/train_7b.py --mode lora --output /tmp/bench      # lora_video, + stock HF Qwen2-7B LoRA
    python scripts/bench/train_7b.py --mode full --deepspeed configs/deepspeed/zero3_offload.json

Writes a LongVU config with the released shapes (Qwen2-7B, SigLIP-so400m, DINOv2-giant), a synthetic
dataset of 1-fps scene videos long enough to fill the 8K-token budget, and a run config; trains
`--steps` steps with `longvu train` (no checkpoint saved) and prints one table from the run's log:
s/step, tokens/s, MFU and peak memory (steps after the first, median). `--mode lora` then times stock
HF Qwen2-7B + PEFT LoRA (r=64, all linear layers, gradient checkpointing, SDPA, AdamW) on 8K tokens in
the same process family, for comparison.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from scripts.bench.vision_pipeline import released_shape_config  # noqa: E402


def write_dataset(out: Path, n_videos: int, seconds: int, text_only: bool) -> Path:
    """1-fps 360x640 clips whose every frame is a new scene (so the 8K-token budget fills), as JPEG frame
    folders (read at 1 fps; no video codec needed on the GPU machine), with a question and a ~100-token
    answer each; or, `text_only`, records of one ~8K-token conversation and no media."""
    from PIL import Image

    from data.synthetic import scene_frames

    answer = " ".join(f"In scene {k} the camera holds still on a smooth coloured surface." for k in range(8))
    records = []
    if text_only:
        long_answer = " ".join(f"Sentence {k}: the camera holds still on a smooth coloured surface." for k in range(640))
        records = [{"id": f"t{i}", "conversations": [{"from": "human", "value": "Describe the film."},
                                                   {"from": "gpt", "value": long_answer}]} for i in range(n_videos)]
    for i in range(0 if text_only else n_videos):
        folder = out / "media" / f"v{i}"
        folder.mkdir(parents=True, exist_ok=True)
        for t, frame in enumerate(scene_frames(seconds, 360, 640, seconds, seed=i)):
            Image.fromarray(frame).save(folder / f"{t:05d}.jpg", quality=90)
        records.append({"id": f"v{i}", "video": f"media/v{i}", "conversations": [
            {"from": "human", "value": "<video>\nDescribe every scene of this video in order."},
            {"from": "gpt", "value": answer}]})
    manifest = out / "manifest.jsonl"
    out.mkdir(parents=True, exist_ok=True)
    manifest.write_text("".join(json.dumps(r) + "\n" for r in records))
    return manifest


def run_ours(args, out: Path) -> dict:
    config_dir = out / "config"
    cfg = released_shape_config(llm_layers=args.llm_layers)
    cfg.save_pretrained(config_dir)
    manifest = write_dataset(out / "data", n_videos=args.steps + 2, seconds=args.video_seconds,
                             text_only=args.text_only)
    stage = "lora_video" if args.mode == "lora" else "video_finetune"
    overrides = [
        f"model.init=config:{config_dir}", "model.dtype=bf16", f"model.overrides.dino_threshold={args.dino_threshold}",
        f"model.overrides.drop_threshold={args.drop_threshold}",
        f"data.train_manifest={manifest}", "data.per_device_batch_size=1", "data.max_tokens_per_batch=8192",
        "data.num_workers=4", f"training.output_dir={out / 'run'}", f"training.max_steps={args.steps}",
        "training.save_steps=1000000", "training.save_at_end=false", "training.logging_steps=1",
        "training.report_to=[]", "training.resume=null", "training.warmup_ratio=0", f"deepspeed={args.deepspeed}",
    ]
    (out / "bench.yaml").write_text(f"stage: {stage}\n")
    cmd = [sys.executable, "-m", "train", "train", str(out / "bench.yaml"), *overrides, "--nproc", str(args.nproc)]
    print("running:", " ".join(cmd), flush=True)
    start = time.perf_counter()
    done = subprocess.run(cmd, cwd=ROOT)
    if done.returncode:
        raise SystemExit(f"longvu train failed ({done.returncode})")
    history = json.loads((out / "run" / "run_summary.json").read_text())["log_history"]
    steps = [h for h in history if "loss" in h][1:]  # the first step includes start-up work
    pick = lambda key: statistics.median(float(h[key]) for h in steps) if steps and key in steps[0] else float("nan")  # noqa: E731
    kind = "text-only" if args.text_only else f"{args.video_seconds}-frame 1-fps video"
    layers = "" if args.llm_layers == 28 else f", {args.llm_layers}-layer LLM"
    return {"name": f"LongVU {stage}, {kind}{layers} ({Path(args.deepspeed).stem})", "s_per_step": pick("step_time_s"),
            "tokens_per_s": pick("tokens_per_s"), "mfu": pick("mfu"), "peak_gib": pick("peak_memory_gib"),
            "tokens_per_step": pick("tokens_per_s") * pick("step_time_s"), "wall_s": time.perf_counter() - start}


def run_stock_lora(steps: int, seq: int) -> dict:
    """Stock HF Qwen2-7B + PEFT LoRA r=64 on all linear layers, grad checkpointing, SDPA, AdamW, bf16."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import Qwen2Config, Qwen2ForCausalLM

    cfg = Qwen2Config(vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                      num_attention_heads=28, num_key_value_heads=4, max_position_embeddings=32768,
                      rope_parameters={"rope_type": "default", "rope_theta": 1e6}, tie_word_embeddings=False)
    with torch.device("cuda"):
        model = Qwen2ForCausalLM._from_config(cfg, dtype=torch.bfloat16, attn_implementation="sdpa")
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False
    model = get_peft_model(model, LoraConfig(r=64, lora_alpha=128, lora_dropout=0.05, task_type="CAUSAL_LM",
                                             target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                             "up_proj", "down_proj"]))
    optim = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    ids = torch.randint(0, 151000, (1, seq), device="cuda")
    torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(steps):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optim.step()
        optim.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    s = statistics.median(times[1:])
    return {"name": "stock HF Qwen2-7B + PEFT LoRA", "s_per_step": s, "tokens_per_s": seq / s, "mfu": float("nan"),
            "peak_gib": torch.cuda.max_memory_allocated() / 2**30, "tokens_per_step": seq, "wall_s": sum(times)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--mode", choices=["lora", "full"], required=True)
    parser.add_argument("--deepspeed", default="configs/deepspeed/zero2.json")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--nproc", type=int, default=1)
    parser.add_argument("--video-seconds", type=int, default=240)
    parser.add_argument("--output", type=Path, default=Path("/tmp/longvu-bench"))
    parser.add_argument("--skip-stock", action="store_true")
    parser.add_argument("--llm-layers", type=int, default=28, help="decoder layers (28 = Qwen2-7B)")
    parser.add_argument("--text-only", action="store_true", help="8K-token text samples (LLM side only)")
    parser.add_argument("--dino-threshold", type=float, default=1.01,
                        help="above 1 keeps every frame: random DINO weights find all frames alike, a real "
                             "content-rich video keeps most of them; this fills the 8K budget as such a video does")
    parser.add_argument("--drop-threshold", type=float, default=1.01,
                        help="STC threshold; above 1 keeps every token (then the budget trim applies), for the "
                             "same reason")
    args = parser.parse_args()
    args.output.mkdir(parents=True, exist_ok=True)
    rows = [run_ours(args, args.output)]
    if args.mode == "lora" and not args.skip_stock:
        rows.append(run_stock_lora(args.steps, 8192))
    print(f"\n| {'run':<60} | s/step | tokens/step | tokens/s |  MFU  | peak GiB |")
    print(f"|{'-' * 62}|--------|-------------|----------|-------|----------|")
    for r in rows:
        print(f"| {r['name']:<60} | {r['s_per_step']:6.2f} | {r['tokens_per_step']:11.0f} | {r['tokens_per_s']:8.0f} "
              f"| {r['mfu']:5.3f} | {r['peak_gib']:8.1f} |")


if __name__ == "__main__":
    main()
