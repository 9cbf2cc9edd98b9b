"""Synthetic media for the quickstart and smoke runs: clips made of still 'scenes' with a little noise,
so temporal reduction has something to find."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np


def scene_frames(n_frames: int, height: int, width: int, n_scenes: int, seed: int = 0) -> np.ndarray:
    """uint8 [n_frames, height, width, 3]: `n_scenes` smooth random images, each held for an equal
    run of frames, with per-frame noise of about 3 grey levels."""
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 256, (n_scenes, 4, 4, 3)).astype(np.float32)
    rows = np.linspace(0, 3, height)
    cols = np.linspace(0, 3, width)
    r0, c0 = np.floor(rows).astype(int).clip(0, 2), np.floor(cols).astype(int).clip(0, 2)
    fr, fc = (rows - r0)[:, None, None], (cols - c0)[None, :, None]
    scenes = []
    for img in coarse:  # bilinear upsampling of a 4x4 colour grid, one image per scene
        top = img[r0][:, c0] * (1 - fc) + img[r0][:, c0 + 1] * fc
        bottom = img[r0 + 1][:, c0] * (1 - fc) + img[r0 + 1][:, c0 + 1] * fc
        scenes.append(top * (1 - fr) + bottom * fr)
    which = np.minimum(np.arange(n_frames) * n_scenes // max(n_frames, 1), n_scenes - 1)
    frames = np.stack(scenes)[which] + rng.normal(0, 3, (n_frames, height, width, 3))
    return frames.clip(0, 255).astype(np.uint8)


def encode_mp4(path: str | os.PathLike, frames: np.ndarray, fps: int, crf: int = 18, faststart: bool = False) -> str:
    """Write uint8 RGB frames [T, H, W, 3] (even H and W) as an H.264 mp4 with PyAV (`faststart`: the
    index at the front of the file, as streaming services write it)."""
    import av

    path = str(path)
    with av.open(path, "w", options={"movflags": "faststart"} if faststart else None) as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = frames.shape[2], frames.shape[1], "yuv420p"
        stream.options = {"crf": str(crf), "preset": "ultrafast"}
        for frame in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def write_scene_video(path: str | os.PathLike, seconds: int, fps: int = 30, height: int = 180, width: int = 320,
                      n_scenes: int = 4, seed: int = 0) -> str:
    """A `seconds`-long clip of `n_scenes` scenes at `fps` (see `scene_frames`)."""
    return encode_mp4(path, scene_frames(seconds * fps, height, width, n_scenes, seed), fps)


def write_synthetic_dataset(root: str | os.PathLike, n_images: int = 8, n_videos: int = 8, video_seconds: int = 6,
                            seed: int = 0) -> Path:
    """A small LLaVA-style dataset under `root`: PNG images, mp4 clips and `manifest.jsonl`.

    Every answer is derived from the media (the dominant colour of an image, the number of scenes
    of a clip), so a model can actually learn it. -> the manifest path."""
    from PIL import Image

    root = Path(root)
    (root / "media").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    colours = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 40, 220)}
    records = []
    for i in range(n_images):
        name = list(colours)[i % len(colours)]
        pixels = np.clip(np.array(colours[name]) + rng.normal(0, 20, (48, 64, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(root / "media" / f"image_{i}.png")
        records.append({"id": f"image_{i}", "image": f"media/image_{i}.png", "conversations": [
            {"from": "human", "value": "<image>\nWhat colour is this picture?"},
            {"from": "gpt", "value": f"It is {name}."}]})
    for i in range(n_videos):
        scenes = 1 + i % 3
        write_scene_video(root / "media" / f"video_{i}.mp4", seconds=video_seconds, fps=10, height=48, width=64,
                          n_scenes=scenes, seed=seed + i)
        records.append({"id": f"video_{i}", "video": f"media/video_{i}.mp4", "conversations": [
            {"from": "human", "value": "<video>\nHow many scenes does this clip show?"},
            {"from": "gpt", "value": f"{scenes} scene{'s' if scenes > 1 else ''}."}]})
    manifest = root / "manifest.jsonl"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in records))
    return manifest
