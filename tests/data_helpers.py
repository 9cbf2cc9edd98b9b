"""Media writers for the data tests: small clips whose frame index is readable from the pixels."""

from __future__ import annotations

import os

import numpy as np
from PIL import Image

from data.synthetic import encode_mp4

# Frame i (i < 256) has its left half at grey 8 + 16 * (i // 16) and its right half at
# 8 + 16 * (i % 16): steps of 16 survive lossy YUV conversion and resizing.


def frame_indices(frames: np.ndarray) -> list[int]:
    """Frame indices read back from decoded frames ``[T, H, W, 3]``."""
    w = frames.shape[2]
    left = frames[:, :, : w // 2 - w // 8].reshape(len(frames), -1).mean(axis=1)
    right = frames[:, :, w // 2 + w // 8 :].reshape(len(frames), -1).mean(axis=1)
    return [int(round((a - 8) / 16)) * 16 + int(round((b - 8) / 16)) for a, b in zip(left, right)]


def grey_frames(n: int, height: int, width: int) -> np.ndarray:
    """uint8 ``[n, height, width, 3]`` encoding each frame's index (see above)."""
    out = np.empty((n, height, width, 3), dtype=np.uint8)
    for i in range(n):
        out[i, :, : width // 2] = 8 + 16 * (i // 16)
        out[i, :, width // 2 :] = 8 + 16 * (i % 16)
    return out


def write_video(path: str, n_frames: int = 120, fps: int = 30, height: int = 48, width: int = 64,
                frames: np.ndarray | None = None, faststart: bool = False) -> str:
    """Encode a lossless H.264 mp4; frames default to ``grey_frames``; ``faststart``: moov first."""
    frames = grey_frames(n_frames, height, width) if frames is None else frames
    return encode_mp4(path, frames, fps, crf=0, faststart=faststart)


def write_gif(path: str, n_frames: int = 20, duration_ms: int = 100, height: int = 24, width: int = 32) -> str:
    """An animated GIF with ``n_frames`` grey frames of ``duration_ms`` each."""
    frames = [Image.fromarray(f) for f in grey_frames(n_frames, height, width)]
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=duration_ms, loop=0, optimize=False,
                   disposal=1)
    return path


def write_frame_folder(path: str, n_frames: int = 12, height: int = 24, width: int = 32) -> str:
    """A folder of PNG frames named 1.png .. n.png (natural order matters: 2 before 10)."""
    os.makedirs(path, exist_ok=True)
    for i, f in enumerate(grey_frames(n_frames, height, width)):
        Image.fromarray(f).save(os.path.join(path, f"{i + 1}.png"))
    return path


def write_image(path: str, height: int = 30, width: int = 40, seed: int = 0) -> str:
    """A random RGB image (PNG or JPEG by extension)."""
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(path)
    return path


def conv(question: str = "<video>\nWhat happens?", answer: str = "Nothing much.") -> list[dict]:
    """A one-round LLaVA conversation."""
    return [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]
