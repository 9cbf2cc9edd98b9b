"""PyAV decoding of sampled frames, importable without torch, and the decoder-process entry point.

`pyav_sampled_frames` decodes a run of sampled frames from an open stream (used by `data.video` and by
`data.parallel_decode`'s workers). `python -m data.pyav_decode FD` is one decoder process of
`data.parallel_decode`: it maps the shared frame buffer passed as file descriptor FD, reads one JSON
line naming the file (path, fps, frame height/width, rows), then one JSON line per segment (its first
row and its frame indices), decodes the segment into its rows of the buffer and answers one JSON
line per segment: {"row"} when done, {"row", "reason", "code"} when it cannot be decoded. The
process imports numpy and PyAV only: it is started fresh (not forked), so a parent holding CUDA or
other threads cannot leave it a lock that nobody releases.
"""

from __future__ import annotations

import json
import mmap
import os
import signal
import sys
from types import SimpleNamespace

import numpy as np

from data.errors import MediaError, open_failure


def pyav_sampled_frames(path: str, container, stream, idx: np.ndarray, fps: float, small,
                        skip_nonref: bool = True) -> np.ndarray:
    """Decode frames `idx` (ascending) of an open PyAV stream: seek to the keyframe before idx[0],
    decode through idx[-1], convert only the sampled frames (RGB, `small` size) -> uint8 [T, h, w, 3].
    With `skip_nonref`, packets of frames that are not sampled are decoded only if other frames refer
    to them (the decoder's skip_frame NONREF: H.264's non-reference B-frames, tested, and the like in
    other codecs are dropped undecoded), which leaves every sampled frame's pixels as a full decode
    gives them. Frames are placed by their timestamps; a stream without them is counted frame by
    frame, so skipping stops at the first data packet without a timestamp."""
    import av

    wanted = {int(i): k for k, i in enumerate(idx)}
    out: list[np.ndarray | None] = [None] * len(idx)
    tb = float(stream.time_base)
    t_start = float(stream.start_time or 0) * tb

    def index_of(pts: int) -> int:
        return round((pts * tb - t_start) * fps)

    codec = stream.codec_context
    try:
        if idx[0] / fps > 2.0:
            container.seek(int((idx[0] / fps + t_start) / tb), stream=stream, backward=True, any_frame=False)
        count, done = 0, False
        for packet in container.demux(stream):
            if packet.pts is None and packet.size:
                skip_nonref = False
            skip = skip_nonref and packet.pts is not None and index_of(packet.pts) not in wanted
            codec.skip_frame = "NONREF" if skip else "DEFAULT"
            for frame in codec.decode(packet):
                i = index_of(frame.pts) if frame.pts is not None else count
                count += 1
                k = wanted.get(i)
                if k is not None:
                    out[k] = frame.to_ndarray(format="rgb24", width=small.width, height=small.height,
                                              interpolation="BICUBIC")
                if i >= idx[-1]:
                    done = True
                    break
            if done:
                break
    except av.error.FFmpegError as e:
        raise MediaError(path, f"PyAV failed while decoding: {e}", "undecodable_video") from e
    missing = [int(idx[k]) for k, f in enumerate(out) if f is None]
    if missing:
        raise MediaError(path, f"PyAV could not decode frames {missing[:5]} (truncated?)", "undecodable_video")
    return np.stack(out)

def decode_segment(path: str, idx: np.ndarray, fps: float, small) -> np.ndarray:
    """Frames `idx` of the file at `path` -> uint8 [len(idx), small.height, small.width, 3], one
    decoder thread. Raises MediaError."""
    import av

    try:
        container = av.open(path)
    except (av.error.FFmpegError, OSError) as e:
        raise open_failure(path, "PyAV", e) from e
    with container:
        stream = container.streams.video[0]
        stream.thread_count = 1
        return pyav_sampled_frames(path, container, stream, idx, fps, small)


def serve(fd: int, requests=sys.stdin, replies=None) -> None:
    """The decoder-process loop described in the module docstring. Answers go to `replies` (default: a
    private copy of stdout, stdout itself then pointing at stderr, so that nothing a library prints can
    pass for an answer); each answer echoes its segment's first row."""
    if replies is None:
        replies = os.fdopen(os.dup(1), "w")
        os.dup2(2, 1)
    video = json.loads(requests.readline())
    small = SimpleNamespace(height=video["height"], width=video["width"])
    shape = (video["rows"], small.height, small.width, 3)
    with mmap.mmap(fd, int(np.prod(shape))) as buffer:
        rows = np.frombuffer(buffer, dtype=np.uint8).reshape(shape)
        for line in requests:
            segment = json.loads(line)
            idx = np.asarray(segment["indices"], dtype=np.int64)
            try:
                frames = decode_segment(video["path"], idx, video["fps"], small)
                rows[segment["row"]:segment["row"] + len(idx)] = frames
                answer = {"row": segment["row"]}
            except MediaError as err:
                answer = {"row": segment["row"], "reason": err.reason, "code": err.code}
            except Exception as err:  # noqa: BLE001 (any failure is this segment's, reported with its cause)
                answer = {"row": segment["row"], "reason": f"decoder failed: {type(err).__name__}: {err}",
                          "code": "undecodable_video"}
            replies.write(json.dumps(answer) + "\n")
            replies.flush()
        del rows  # the buffer cannot close while a view of it is alive


if __name__ == "__main__":
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent handles Ctrl-C; stdin's end stops this process
    serve(int(sys.argv[1]))
