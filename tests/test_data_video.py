"""Decoding with decord and PyAV: exact frame indices read back from the pixels, GIFs, frame folders,
reduced decode size, timeouts and the error for each kind of broken file."""

from __future__ import annotations

import os
import time

import numpy as np
import pytest

from data.errors import MediaError
from data.media import run_with_timeout
from data.video import SamplingConfig, decode_video, probe_video, sample_indices
from longvu.processing import FrameSize
from data_helpers import frame_indices, write_frame_folder, write_gif, write_video


@pytest.fixture(scope="module")
def clip(tmp_path_factory) -> str:
    """4 s at 30 fps, 64x48: 120 frames."""
    return write_video(str(tmp_path_factory.mktemp("video") / "clip.mp4"), n_frames=120, fps=30)


def test_sample_indices_rules():
    assert sample_indices(601, 30.0, 1.0).tolist() == list(range(0, 601, 30))  # 21 frames
    assert sample_indices(120, 29.97, 1.0).tolist() == [0, 30, 60, 90]
    assert sample_indices(120, 30.0, 0.4).tolist() == [0, 75]  # stride round(75)
    assert sample_indices(10, 5.0, 100.0).tolist() == list(range(10))  # stride never 0
    assert sample_indices(120, 30.0, 1.0, start=1.0, end=3.0).tolist() == [30, 60]
    assert sample_indices(120, 30.0, 1.0, start=10.0).tolist() == []
    # 40 candidates (stride 3) capped to 5, uniformly: positions 0, 9.75, 19.5, 29.25, 39
    assert sample_indices(120, 30.0, 10.0, max_frames=5).tolist() == [0, 30, 60, 87, 117]
    with pytest.raises(ValueError, match="video_fps"):
        SamplingConfig(video_fps=0)


@pytest.mark.parametrize("backend", ["decord", "pyav"])
@pytest.mark.parametrize("kwargs,cfg,expected", [
    ({}, {}, [0, 30, 60, 90]),
    ({}, {"video_fps": 2.0}, [0, 15, 30, 45, 60, 75, 90, 105]),
    ({"start": 1.0, "end": 3.0}, {}, [30, 60]),
    ({"start": 2.5}, {"video_fps": 2.0}, [75, 90, 105]),
    ({}, {"video_fps": 10.0, "max_frames": 5}, [0, 30, 60, 87, 117]),
])
def test_decode_exact_frames(clip, backend, kwargs, cfg, expected):
    d = decode_video(clip, SamplingConfig(backend=backend, fallback=False, **cfg), **kwargs)
    assert d.indices.tolist() == expected
    assert frame_indices(d.frames) == expected
    assert d.frames.dtype == np.uint8 and d.frames.shape == (len(expected), 48, 64, 3)
    assert d.size == FrameSize(48, 64) and d.n_total == 120 and d.native_fps == pytest.approx(30.0)


@pytest.mark.parametrize("backend", ["decord", "pyav"])
def test_decode_reduced_size_keeps_original_size(clip, backend):
    d = decode_video(clip, SamplingConfig(backend=backend, fallback=False, max_side=32))
    assert d.frames.shape == (4, 24, 32, 3)
    assert d.size == FrameSize(height=48, width=64)
    assert frame_indices(d.frames) == [0, 30, 60, 90]


def test_empty_range_is_an_error(clip):
    with pytest.raises(MediaError, match="no frame in range") as e:
        decode_video(clip, SamplingConfig(), start=10.0)
    assert e.value.code == "empty_range" and e.value.path == clip


def test_gif_sampled_by_frame_durations(tmp_path):
    gif = write_gif(str(tmp_path / "a.gif"), n_frames=20, duration_ms=100)  # 2 s at 10 fps
    d = decode_video(gif, SamplingConfig(video_fps=2.0))
    assert d.indices.tolist() == [0, 5, 10, 15] and frame_indices(d.frames) == [0, 5, 10, 15]
    assert d.size == FrameSize(24, 32)
    d = decode_video(gif, SamplingConfig(video_fps=1.0), start=0.5, end=2.0)
    assert frame_indices(d.frames) == [5, 15]
    # gif_fps overrides the durations: 20 frames at 4 fps = 5 s -> one frame per second
    d = decode_video(gif, SamplingConfig(video_fps=1.0, gif_fps=4.0))
    assert frame_indices(d.frames) == [0, 4, 8, 12, 16]
    assert probe_video(gif).n_frames == 20


def test_frame_folder_natural_order_and_fps(tmp_path):
    folder = write_frame_folder(str(tmp_path / "frames"), n_frames=12)
    d = decode_video(folder, SamplingConfig(video_fps=1.0, folder_fps=2.0))
    assert frame_indices(d.frames) == [0, 2, 4, 6, 8, 10]  # natural order: 10.png after 9.png
    d = decode_video(folder, SamplingConfig(video_fps=1.0), fps=3.0, start=1.0)  # per-record fps
    assert frame_indices(d.frames) == [3, 6, 9]
    meta = probe_video(folder, fps=3.0)
    assert (meta.n_frames, meta.fps, meta.size) == (12, 3.0, FrameSize(24, 32))


def test_frame_folder_errors(tmp_path):
    os.makedirs(tmp_path / "empty")
    with pytest.raises(MediaError, match="no image files") as e:
        decode_video(str(tmp_path / "empty"), SamplingConfig())
    assert e.value.code == "bad_frame_folder"


@pytest.fixture(scope="module")
def broken(tmp_path_factory, clip) -> dict[str, str]:
    d = tmp_path_factory.mktemp("broken")
    data = open(clip, "rb").read()
    files = {"empty": d / "empty.mp4", "text": d / "text.mp4", "truncated": d / "truncated.mp4"}
    files["empty"].write_bytes(b"")
    files["text"].write_text("this is not a video\n" * 20)
    files["truncated"].write_bytes(data[: len(data) // 2])
    return {k: str(v) for k, v in files.items()} | {"missing": str(d / "missing.mp4")}


@pytest.mark.parametrize("backend", ["decord", "pyav"])
@pytest.mark.parametrize("kind,code,match", [
    ("missing", "missing_file", "does not exist"),
    ("empty", "empty_file", "0 bytes"),
    ("text", "not_a_video", "not a video"),
    ("truncated", "corrupt_video", "truncated or corrupt"),
])
def test_broken_files_raise_media_error(broken, backend, kind, code, match):
    for fallback in (False, True):
        with pytest.raises(MediaError, match=match) as e:
            decode_video(broken[kind], SamplingConfig(backend=backend, fallback=fallback))
        assert e.value.code == code and e.value.path == broken[kind]
    with pytest.raises(MediaError) as e:
        probe_video(broken[kind])
    assert e.value.code == code


@pytest.mark.parametrize("backend", ["decord", "pyav"])
def test_truncated_faststart_mp4(tmp_path, backend):
    """moov first, media data cut: opening works, decoding fails; both backends say so."""
    path = write_video(str(tmp_path / "fs.mp4"), faststart=True)
    data = open(path, "rb").read()
    assert data[36:40] == b"moov"
    (tmp_path / "cut.mp4").write_bytes(data[: len(data) * 6 // 10])
    with pytest.raises(MediaError) as e:
        decode_video(str(tmp_path / "cut.mp4"), SamplingConfig(backend=backend))
    assert e.value.code in ("corrupt_video", "undecodable_video") and "PyAV" in e.value.reason
    assert "decord" in e.value.reason  # the fallback was tried too


def test_fallback_to_the_other_backend(clip, monkeypatch):
    import data.video as video

    def failing(path, cfg, start, end):
        raise MediaError(path, "simulated decord failure", "undecodable_video")

    monkeypatch.setattr(video, "_decode_decord", failing)
    d = decode_video(clip, SamplingConfig(backend="decord"))
    assert frame_indices(d.frames) == [0, 30, 60, 90]
    with pytest.raises(MediaError, match="simulated"):
        decode_video(clip, SamplingConfig(backend="decord", fallback=False))


def test_timeout_cuts_off_a_hung_decode():
    t0 = time.monotonic()
    with pytest.raises(MediaError, match="timeout") as e:
        run_with_timeout(lambda: time.sleep(5), 0.2, "/data/slow.mp4")
    assert time.monotonic() - t0 < 2 and e.value.code == "decode_timeout" and e.value.path == "/data/slow.mp4"
    assert run_with_timeout(lambda: 42, 1.0, "x") == 42
    with pytest.raises(MediaError, match="boom"):
        run_with_timeout(lambda: (_ for _ in ()).throw(MediaError("x", "boom")), 1.0, "x")


@pytest.mark.parametrize("cap", ["uniform", "stride"])
def test_every_source_kind_caps_its_frames_by_the_configured_rule(tmp_path, cap):
    """A .npy frame array and a frame folder follow `cap` as a video file does (the .npy path once
    ignored it, so the probe-time frame count and the decoded frames disagreed under cap=stride)."""
    frames = np.arange(40, dtype=np.uint8)[:, None, None, None].repeat(8, 1).repeat(8, 2).repeat(3, 3)
    npy = tmp_path / "clip.npy"
    np.save(npy, frames)
    folder = write_frame_folder(str(tmp_path / "frames"), 40, 8, 8)
    cfg = SamplingConfig(max_frames=7, cap=cap)
    want = sample_indices(40, 1.0, cfg.video_fps, None, None, 7, cap)
    assert want.tolist() != sample_indices(40, 1.0, cfg.video_fps, None, None, 7,
                                           "stride" if cap == "uniform" else "uniform").tolist()
    for path in (str(npy), folder):
        assert decode_video(path, cfg).indices.tolist() == want.tolist(), path
    assert decode_video(str(npy), cfg).frames[:, 0, 0, 0].tolist() == want.tolist()  # the frames those indices name


class _Counting:
    """A stand-in for a PyAV object that forwards every attribute to it."""

    def __init__(self, inner):
        object.__setattr__(self, "_inner", inner)

    def __getattr__(self, name):
        return getattr(self._inner, name)

    def __setattr__(self, name, value):  # e.g. skip_frame, on the real codec context
        setattr(self._inner, name, value)


def _counting(container):
    """(container, stream, counter) stand-ins whose codec adds the frames it returns to counter[0]."""
    counter = [0]
    stream = container.streams.video[0]
    codec = stream.codec_context

    class Codec(_Counting):
        def decode(self, packet):
            frames = codec.decode(packet)
            counter[0] += len(frames)
            return frames

    class Stream(_Counting):
        codec_context = Codec(codec)

    class Container(_Counting):
        def demux(self, _stream):
            return container.demux(stream)

        def seek(self, *args, stream=None, **kwargs):
            return container.seek(*args, stream=stream and stream._inner, **kwargs)

    return Container(container), Stream(stream), counter


def test_unsampled_non_reference_frames_are_not_decoded_and_sampled_frames_are_unchanged(tmp_path):
    """A B-frame clip (x264 superfast: non-reference B-frames): at 1 fps about half its frames never
    reach the decoder's output, and each sampled frame equals the one a full decode gives."""
    import av

    from data.synthetic import scene_frames
    from data.pyav_decode import pyav_sampled_frames

    path = str(tmp_path / "bframes.mp4")
    with av.open(path, "w") as container:
        stream = container.add_stream("libx264", rate=30)
        stream.width, stream.height, stream.pix_fmt = 96, 64, "yuv420p"
        stream.options = {"crf": "23", "preset": "superfast"}
        for frame in scene_frames(300, 64, 96, 3, seed=1):
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    idx, small = np.arange(0, 300, 30), FrameSize(64, 96)
    with av.open(path) as container:
        every = [f.to_ndarray(format="rgb24", width=96, height=64, interpolation="BICUBIC")
                 for f in container.decode(video=0)]
    assert len(every) == 300
    decoded = {}
    for skip in (True, False):
        for start in (0, 4):  # from the first frame, and after a keyframe seek
            with av.open(path) as container:
                proxy, stream, counter = _counting(container)
                frames = pyav_sampled_frames(path, proxy, stream, idx[start:], 30.0, small, skip_nonref=skip)
            np.testing.assert_array_equal(frames, np.stack([every[i] for i in idx[start:]]))
            decoded[skip, start] = counter[0]
    assert decoded[False, 0] == idx[-1] + 1  # every frame through the last sampled one, no further
    assert decoded[True, 0] < 0.7 * decoded[False, 0], decoded
    assert decoded[True, 4] < 0.7 * decoded[False, 4], decoded
