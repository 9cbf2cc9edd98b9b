"""`longvu quickstart`: the project's main job on an embedded default, with nothing to download.

Writes a small synthetic dataset (images, videos) and tiny random towers, trains the image stage
(configs/quickstart_image.yaml, ZeRO-2) then the video stage from its checkpoint
(configs/quickstart_video.yaml, ZeRO-3: the 576 -> 144 query switch happens there), each with
DeepSpeed over two processes (on the CPU when there is no GPU), answers a question about a clip with
the trained model, and prints where everything went: a JSON summary, alone on stdout (every log line
goes to stderr, so `longvu quickstart | jq` works), with the commands that continue from its outputs.
Without a GPU the stages run on the CPU, launched by torchrun, and build no C++ op (train.cpu_ops).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
QUESTION = "How many scenes does this clip show?"
NOTE = ("The tiny model has random weights and trains for a few steps on synthetic data: its answers are "
        "meaningless by design. The run shows that every stage works end to end.")


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("quickstart",
                                   help="tiny two-stage training run + generate on generated data (no downloads)")
    parser.add_argument("--output", type=Path, default=Path("outputs/quickstart"), help="where everything goes")
    parser.add_argument("--steps", type=int, default=6, help="optimizer steps per stage")
    parser.add_argument("--nproc", type=int, default=2, help="processes per stage")
    parser.set_defaults(func=run)


def _train(config: Path, overrides: list[str], nproc: int, gpu: bool) -> None:
    launcher = [] if gpu else ["--launcher", "torchrun"]  # DeepSpeed's own launcher speaks of GPUs
    cmd = [sys.executable, "-m", "train", "train", str(config), *overrides, "--nproc", str(nproc), *launcher]
    print(f"\n== {shlex.join(cmd)}", file=sys.stderr, flush=True)
    if subprocess.call(cmd, stdout=sys.stderr) != 0:
        raise SystemExit(f"quickstart: training with {config.name} failed (see the log above)")


def run(args: argparse.Namespace) -> int:
    import torch

    gpu = torch.cuda.is_available()
    if not gpu:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # DeepSpeed need not guess (and say so)
    with contextlib.redirect_stdout(sys.stderr):  # stdout carries the summary only
        summary = _quickstart(args, gpu)
    print(json.dumps(summary, indent=2, ensure_ascii=False))
    return 0


def _quickstart(args: argparse.Namespace, gpu: bool) -> dict:
    from data.synthetic import write_scene_video, write_synthetic_dataset
    from longvu.tiny import save_tiny_towers

    start = time.perf_counter()
    out = args.output.resolve()
    images = write_synthetic_dataset(out / "data" / "images", n_images=12, n_videos=0)
    videos = write_synthetic_dataset(out / "data" / "videos", n_images=0, n_videos=8, video_seconds=8)
    siglip, dino = save_tiny_towers(out / "towers")
    towers = [f"model.siglip_path={siglip}", f"model.dino_path={dino}"]
    steps = [f"training.max_steps={args.steps}", f"training.save_steps={args.steps}"]

    image_run = out / "runs" / "image"
    _train(CONFIGS / "quickstart_image.yaml",
           [f"data.train_manifest={images}", f"training.output_dir={image_run}", *towers, *steps], args.nproc, gpu)
    image_ckpt = image_run / f"checkpoint-{args.steps}"
    video_run = out / "runs" / "video"
    _train(CONFIGS / "quickstart_video.yaml",
           [f"model.init=longvu:{image_ckpt}", f"data.train_manifest={videos}", f"training.output_dir={video_run}",
            *towers, *steps], args.nproc, gpu)
    video_ckpt = video_run / f"checkpoint-{args.steps}"

    clip = write_scene_video(out / "data" / "question.mp4", seconds=8, fps=10, height=48, width=64, n_scenes=2, seed=99)
    answer = _answer(video_ckpt, clip)
    next_steps = _next_steps(out, videos, siglip, dino, clip)
    print(f"\n{NOTE}\nNext, LoRA on your own manifest with the tiny model and these towers, export, ask:",
          *(f"  {c}" for c in next_steps), sep="\n")
    return {
        "dataset": {"images": str(images), "videos": str(videos)},
        "towers": {"siglip": siglip, "dino": dino},
        "image_stage": {"checkpoint": str(image_ckpt), "losses": _losses(image_run)},
        "video_stage": {"checkpoint": str(video_ckpt), "losses": _losses(video_run)},
        "tensorboard_logs": [str(image_run / "logs"), str(video_run / "logs")],
        "generate": answer,
        "note": NOTE,
        "next_steps": next_steps,
        "seconds": round(time.perf_counter() - start, 1),
    }


def _next_steps(out: Path, videos: Path, siglip: str, dino: str, clip: str) -> list[str]:
    """The commands that continue from the quickstart's outputs (configs/lora_tiny.yaml, export, generate)."""
    lora, model = out / "runs" / "lora", out / "models" / "lora"
    train = ["longvu", "train", str(CONFIGS / "lora_tiny.yaml"), f"data.train_manifest={videos}",
             f"model.siglip_path={siglip}", f"model.dino_path={dino}", f"training.output_dir={lora}"]
    return [
        shlex.join(train),
        shlex.join(["longvu", "export", str(lora), "--output", str(model), "--merge-lora", "--include-towers",
                    "--dtype", "fp32"]),
        shlex.join(["longvu", "generate", "--model", str(model), "--video", clip, "--question", QUESTION]),
    ]


def _losses(run_dir: Path) -> list[float]:
    history = json.loads((run_dir / "run_summary.json").read_text())["log_history"]
    return [round(float(h["loss"]), 4) for h in history if "loss" in h]


def _answer(checkpoint: Path, clip: str) -> dict:
    """Answer a question about `clip` with the trained checkpoint (the tiny model's words mean nothing)."""
    import torch

    from data.video import SamplingConfig, decode_video
    from longvu.modeling import LongVUForCausalLM
    from longvu.processing import build_prompt_ids, preprocess_frames
    from longvu.tokenizer import load_tokenizer

    model = LongVUForCausalLM.from_pretrained(checkpoint).eval()
    tokenizer = load_tokenizer(str(checkpoint))
    decoded = decode_video(clip, SamplingConfig(video_fps=1.0))
    siglip, dino = preprocess_frames(decoded.frames, model.config.siglip_image_size, model.config.dino_image_size)
    ids = torch.tensor([build_prompt_ids(tokenizer, QUESTION)])
    media = dict(pixel_values_siglip=[siglip], pixel_values_dino=[dino], media_sizes=[decoded.size],
                 media_kinds=["video"])
    with torch.no_grad():
        visual = model.prepare_multimodal_inputs(ids, None, None, **media).media[0]
        new = model.generate(ids, **media, max_new_tokens=8, do_sample=False)
    return {"clip": clip, "frames_decoded": int(decoded.frames.shape[0]), "frames_kept": int(visual.kept_indices.numel()),
            "visual_tokens": int(visual.tokens.shape[0]), "answer": tokenizer.decode(new[0], skip_special_tokens=True)}
