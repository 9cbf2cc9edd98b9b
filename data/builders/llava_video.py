"""LLaVA-Video-178K (lmms-lab/LLaVA-Video-178K) -> one JSONL manifest (videos stay where they are).

Published layout: one folder per subset (``0_30_s_academic_v0_1/``, ``2_3_m_youtube_v0_1/``, ...)
holding json files of LLaVA-style records (``<subset>_cap_processed.json``,
``<subset-prefix>_oe_v0_1_qa_processed.json``, ``..._mc_...``), each a list of ``{"id", "video",
"conversations", "data_source"}``, and ``<subset>_videos_<k>.tar.gz`` archives that extract beside
them; ``video`` is relative to the subset folder (``academic_source/...mp4``).

The input is the dataset root (or subset folders, or json files/globs). Each record's video path
gets its subset folder (relative to the root: train with ``--media-root`` at the root), plus
``--prefix``, never twice. Ids are ``<json stem>/<index>`` (the same id recurs across a subset's
caption, open-ended and multiple-choice files); the original id is kept as ``source_id``.
"""

from __future__ import annotations

import os
from typing import Iterable

from data.builders.common import BuildOptions, BuildSummary, Writer, atomic_manifest, expand_inputs
from data.builders.videochat2 import convert_llava
from data.manifest import read_manifest


def subset_prefix(path: str, root: str, prefix: str) -> str:
    """``prefix/<subset folder>`` of a json file found under ``root``."""
    folder = os.path.relpath(os.path.dirname(os.path.abspath(path)), os.path.abspath(root))
    parts = [p.strip("/") for p in (prefix, "" if folder == "." else folder) if p]
    return "/".join(parts)


def build(inputs: Iterable[str], out_dir: str, opts: BuildOptions | None = None,
          manifest_name: str = "manifest.jsonl") -> BuildSummary:
    """Convert every subset json under the inputs into one manifest."""
    opts = opts or BuildOptions()
    summary = BuildSummary("llava-video", os.path.join(out_dir, manifest_name))
    files = expand_inputs(inputs, (".json", ".jsonl"))
    with atomic_manifest(summary.manifest) as out:
        writer = Writer(summary, out, opts)
        for path, root in files:
            stem = os.path.splitext(os.path.basename(path))[0]
            convert_llava(read_manifest(path), subset_prefix(path, root, opts.prefix), "", writer,
                          f"llava-video {stem}", id_prefix=stem, progress=opts.progress)
    return summary
