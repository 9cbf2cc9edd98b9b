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
    assert got.size == want.size and seen == [(9, 36), (18, 36), (27, 36), (36, 36)]


def test_stride_cap_matches_sequential(clip):
    """`cap="stride"` keeps every k-th sampled frame in both paths (not the uniform cap's linspace)."""
    cfg = SamplingConfig(video_fps=2, max_frames=7, cap="stride", backend="pyav", fallback=False, max_side=96)
    want = decode_video(clip, cfg, start=1.0, end=19.0)
    got = decode_video_parallel(clip, cfg, workers=3, executor="thread", start=1.0, end=19.0)
    # 36 frames sampled at 2 fps from frame 30 (stride 15); every 36 // 7 = 5th of them is kept
    assert want.indices.tolist() == list(range(30, 570, 75))
    assert np.array_equal(got.indices, want.indices) and np.array_equal(got.frames, want.frames)


def test_bad_file_is_one_media_error(tmp_path):
    bad = tmp_path / "bad.mp4"
    bad.write_bytes(b"not a video at all")
    with pytest.raises(MediaError, match="bad.mp4"):
        decode_video_parallel(str(bad), SamplingConfig(), workers=2)


def _pending_frames():
    """DecodingFrames over two hand-driven segments of 3 and 2 rows [5, 2, 2, 3]."""
    from concurrent.futures import Future

    from data.parallel_decode import DecodingFrames

    futures = [Future(), Future()]
    return DecodingFrames("clip.mp4", (5, 2, 2, 3), [0, 3], futures), futures


def test_reading_waits_only_for_the_segments_it_touches():
    import threading

    import torch

    frames, futures = _pending_frames()
    futures[0].set_result(np.full((3, 2, 2, 3), 7, dtype=np.uint8))
    assert torch.equal(frames[0:3], torch.full((3, 2, 2, 3), 7, dtype=torch.uint8))  # segment 1 still pending
    got = []
    reader = threading.Thread(target=lambda: got.append(frames[torch.tensor([1, 4])]))
    reader.start()
    reader.join(0.2)
    assert reader.is_alive() and frames.seconds is None  # row 4 is not decoded yet: the read waits
    futures[1].set_result(np.full((2, 2, 2, 3), 9, dtype=np.uint8))
    reader.join(5)
    assert got[0][:, 0, 0, 0].tolist() == [7, 9] and frames.seconds is not None


def test_a_failed_segment_raises_its_media_error_where_read():
    frames, futures = _pending_frames()
    futures[0].set_result(np.zeros((3, 2, 2, 3), dtype=np.uint8))
    futures[1].set_exception(MediaError("clip.mp4", "PyAV failed while decoding: boom", "undecodable_video"))
    assert frames[0:2].shape == (2, 2, 2, 3)
    with pytest.raises(MediaError, match="clip.mp4.*boom"):
        frames.wait()


def test_model_reads_decoding_frames_like_the_decoded_tensor(clip):
    import torch

    from data.parallel_decode import start_decode
    from longvu.constants import IMAGE_TOKEN_INDEX
    from longvu.tiny import tiny_model

    cfg = SamplingConfig(video_fps=2, max_frames=None, max_side=96)
    seen = []
    frames, decoded = start_decode(clip, cfg, workers=3, executor="thread", segments_per_worker=2,
                                   on_segment=lambda done, total: seen.append(done))
    model = tiny_model("video", vocab_size=4096, pad_token_id=0)
    ids = torch.tensor([[1, IMAGE_TOKEN_INDEX, 7]])

    def embeds(f):
        with torch.no_grad():
            return model.prepare_multimodal_inputs(ids, None, None, [f], [f], [decoded.size], ["video"]).inputs_embeds

    streamed = embeds(frames)
    assert torch.equal(streamed, embeds(frames.wait().clone())) and frames.shape[0] == len(decoded.indices) == 40
    assert len(seen) == 6 and seen[-1] == 40  # 3 workers x 2 segments, all read


def test_decoder_processes_are_fresh_torch_free_interpreters(clip, monkeypatch):
    """Forked decoders hung on the GPU machine (a parent holding CUDA and compile threads): the
    workers are new interpreters that import only numpy and PyAV."""
    import subprocess
    import sys

    from data import parallel_decode

    started = []
    real_popen = subprocess.Popen

    def spy(args, **kw):
        started.append(list(args))
        return real_popen(args, **kw)

    monkeypatch.setattr(parallel_decode.subprocess, "Popen", spy)
    cfg = SamplingConfig(video_fps=2, max_frames=None, backend="pyav", fallback=False, max_side=96)
    got = decode_video_parallel(clip, cfg, workers=2, start=1.0, end=19.0)
    assert np.array_equal(got.frames, decode_video(clip, cfg, start=1.0, end=19.0).frames)
    assert [a[1:3] for a in started] == [["-m", "data.pyav_decode"]] * 2
    probe = real_popen([sys.executable, "-c", "import sys, data.pyav_decode; print(sorted(m for m in "
                        "('torch', 'transformers') if m in sys.modules))"], stdout=subprocess.PIPE, text=True)
    assert probe.communicate()[0].strip() == "[]"


def test_a_dying_decoder_process_fails_its_segments_instead_of_hanging(clip, monkeypatch):
    import subprocess
    import sys

    from data import parallel_decode

    real_popen = subprocess.Popen
    monkeypatch.setattr(parallel_decode.subprocess, "Popen",
                        lambda args, **kw: real_popen([sys.executable, "-c", "import sys; sys.exit(3)"], **kw))
    frames, _ = parallel_decode.start_decode(clip, SamplingConfig(video_fps=2, max_frames=None, max_side=96),
                                             workers=2, segments_per_worker=3)
    with pytest.raises(MediaError, match=r"clip\.mp4.*decoder process failed \(exit code 3"):
        frames.wait()


def test_a_segment_the_decoder_process_cannot_decode_is_its_media_error(clip, monkeypatch):
    """The header claims twice the frames the file has: the later segments' frames are missing."""
    import dataclasses

    from data import parallel_decode

    real_probe = parallel_decode.probe_video
    monkeypatch.setattr(parallel_decode, "probe_video", lambda path, cfg: dataclasses.replace(
        real_probe(path, cfg), n_frames=2 * real_probe(path, cfg).n_frames))
    cfg = SamplingConfig(video_fps=2, max_frames=None, backend="pyav", fallback=False, max_side=96)
    frames, _ = parallel_decode.start_decode(clip, cfg, workers=2, segments_per_worker=2)
    assert frames[0:10].shape == (10, 54, 96, 3)  # the first segment is whole
    with pytest.raises(MediaError, match=r"clip\.mp4: PyAV could not decode frames"):
        frames.wait()


def test_decoder_processes_find_this_data_package_from_a_directory_with_another(clip, tmp_path, monkeypatch):
    """Run from a directory holding a user's own `data` package and a relative video path."""
    import shutil

    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "__init__.py").write_text("raise ImportError('the wrong data package')\n")
    shutil.copy(clip, tmp_path / "clip.mp4")
    monkeypatch.chdir(tmp_path)
    cfg = SamplingConfig(video_fps=2, max_frames=None, backend="pyav", fallback=False, max_side=96)
    got = decode_video_parallel("clip.mp4", cfg, workers=2, start=1.0, end=19.0)
    assert np.array_equal(got.frames, decode_video(clip, cfg, start=1.0, end=19.0).frames)


def test_an_answer_out_of_protocol_fails_the_segments_instead_of_passing_for_done(clip, monkeypatch):
    """A decoder whose answer is `{}` (no row echoed, as a library's stray print could look) has not
    written its rows: the read fails instead of returning an unwritten buffer."""
    import subprocess
    import sys

    from data import parallel_decode

    fake = "import sys\nfor line in sys.stdin:\n    print('{}', flush=True)\n"
    real_popen = subprocess.Popen
    monkeypatch.setattr(parallel_decode.subprocess, "Popen",
                        lambda args, **kw: real_popen([sys.executable, "-c", fake], **kw))
    frames, _ = parallel_decode.start_decode(clip, SamplingConfig(video_fps=2, max_frames=None, max_side=96),
                                             workers=2, segments_per_worker=2)
    with pytest.raises(MediaError, match=r"clip\.mp4.*unexpected answer '\{\}' for the segment at row"):
        frames.wait()
