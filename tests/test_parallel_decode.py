"""Parallel segment decoding gives exactly the frames of the sequential PyAV decoder."""

from __future__ import annotations

import numpy as np
import pytest

from data.errors import MediaError
from data.parallel_decode import decode_video_parallel, split_segments
from data.synthetic import write_scene_video
from data.video import SamplingConfig, decode_video


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    # 20 s at 30 fps, keyframes every 250 frames (x264's default): later segments seek
    return write_scene_video(tmp_path_factory.mktemp("v") / "clip.mp4", seconds=20, height=90, width=160, n_scenes=5)


def test_split_segments_covers_indices_in_order():
    idx = np.arange(0, 100, 7)
    parts = split_segments(idx, 4)
    assert len(parts) == 4 and np.array_equal(np.concatenate(parts), idx)
    assert [len(p) for p in split_segments(idx[:2], 8)] == [1, 1]


@pytest.mark.parametrize("executor", ["thread", "process"])
def test_parallel_equals_sequential(clip, executor):
    cfg = SamplingConfig(video_fps=2, max_frames=None, backend="pyav", fallback=False, max_side=96)
    want = decode_video(clip, cfg, start=1.0, end=19.0)
    seen = []
    got = decode_video_parallel(clip, cfg, workers=4, executor=executor, start=1.0, end=19.0,
                                on_segment=lambda done, total: seen.append((done, total)))
    assert got.frames.shape == want.frames.shape == (36, 54, 96, 3)
    assert np.array_equal(got.frames, want.frames) and np.array_equal(got.indices, want.indices)
    assert got.size == want.size and seen == [(1, 4), (2, 4), (3, 4), (4, 4)]


def test_bad_file_is_one_media_error(tmp_path):
    bad = tmp_path / "bad.mp4"
    bad.write_bytes(b"not a video at all")
    with pytest.raises(MediaError, match="bad.mp4"):
        decode_video_parallel(str(bad), SamplingConfig(), workers=2)
