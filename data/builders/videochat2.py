"""VideoChat2-IT annotations -> one JSONL manifest (media stay where they are).

Published layout (OpenGVLab/VideoChat2-IT; Ask-Anything ``video_chat2/configs/instruction_data.py``
maps each split to (annotation json, media root, media type)): ``<video|image>/<task>/<source>/
train.json`` (a few splits add files such as ``train_100k.json``), each a JSON list of
``{"video"|"image": path, "QA": [{"i": instruction, "q": question, "a": answer}, ...],
"start"?: s, "end"?: s}`` whose paths are relative to that split's own media root.

Inputs are annotation files, folders (searched recursively for ``*.json``) or globs. A split is
named by its folder under the input (``video/caption/textvr``; ``/<stem>`` added for a file not
called ``train.json``). ``splits`` (a YAML mapping ``name: {annotation: PATH, media_root: DIR}``)
names the splits and gives each its media root instead; relative annotation paths start at the
first input folder (else the YAML's folder). A relative media root becomes the prefix of that
split's paths (relative to the training media root), an absolute one makes them absolute. Record
ids are ``<split>/<index in its file>``: unique across splits and stable across rebuilds.

Each QA pair becomes a human/gpt turn pair, in the file's order (VideoChat2 shuffles them at load
time; we do not). The first human turn is ``"<video>\\n"`` (``"<image>\\n"`` for image records) +
the first pair's instruction and question joined by a newline (whichever are non-empty); later
turns take their question (or instruction if the question is empty). ``start``/``end`` are kept.

LongVU's ``train_video_data.json`` (LLaVA-style records with ``video`` and ``conversations``) is
accepted too: records are checked and copied; a ``.gif`` path gets the ``gifs/`` folder the
reference looks GIFs up in (``gif_prefix``), never twice.
"""

from __future__ import annotations

import os
from typing import Iterable

import yaml
from tqdm import tqdm

from data.builders.common import (BuildInputError, BuildOptions, BuildSummary, Writer, add_prefix, atomic_manifest,
                                  expand_inputs)
from data.manifest import BAD_LINE_KEY, read_manifest


def _join(*parts: str) -> str:
    return "\n".join(p.strip() for p in parts if p and p.strip())


def qa_to_conversations(qa: list, kind: str) -> list[dict]:
    """VideoChat2 ``QA`` list -> LLaVA turns; raises ValueError when a pair is unusable."""
    if not isinstance(qa, list) or not qa:
        raise ValueError("QA is missing or empty")
    turns = []
    for k, pair in enumerate(qa):
        if not isinstance(pair, dict):
            raise ValueError("a QA pair is not an object")
        answer = pair.get("a")
        if not isinstance(answer, str) or not answer.strip():
            raise ValueError("a QA pair has no answer")
        question = _join(pair.get("i") or "", pair.get("q") or "") if k == 0 else _join(pair.get("q") or pair.get("i") or "")
        if not question:
            raise ValueError("a QA pair has neither instruction nor question")
        if k == 0:
            question = f"<{kind}>\n{question}"
        turns += [{"from": "human", "value": question}, {"from": "gpt", "value": answer.strip()}]
    return turns


def convert_native(records: list[dict], split: str, prefix: str, writer: Writer, progress: bool = True) -> None:
    """Convert native VideoChat2-IT records of one split and write the valid ones."""
    for i, r in enumerate(tqdm(records, desc=f"videochat2 {split}", unit="rec", disable=not progress)):
        kind = "video" if r.get("video") else "image" if r.get("image") else None
        rid = f"{split}/{i}"
        if BAD_LINE_KEY in r:
            writer.summary.skip(r[BAD_LINE_KEY], rid)
            continue
        if kind is None:
            writer.summary.skip("no video or image path", rid)
            continue
        try:
            conversations = qa_to_conversations(r.get("QA"), kind)
        except ValueError as e:
            writer.summary.skip(f"bad QA: {e}", rid)
            continue
        record = {"id": rid, kind: add_prefix(r[kind], prefix), "conversations": conversations, "data_source": split}
        for key in ("start", "end"):
            if r.get(key) is not None:
                record[key] = r[key]
        writer.write(record, i)


def convert_llava(records: list[dict], prefix: str, gif_prefix: str, writer: Writer, desc: str,
                  id_prefix: str = "", progress: bool = True) -> None:
    """Check LLaVA-style records, prefix their media paths (``.gif`` videos also ``gif_prefix``), write them.

    ``id_prefix`` qualifies the ids (``<id_prefix>/<index>``, the original id kept as ``source_id``).
    """
    for i, r in enumerate(tqdm(records, desc=desc, unit="rec", disable=not progress)):
        record = dict(r)
        if id_prefix:
            record["id"] = f"{id_prefix}/{i}"
            if "id" in r:
                record["source_id"] = r["id"]
        record.setdefault("id", f"video_{i}")
        for key in ("video", "image"):
            if record.get(key) is not None:
                record[key] = _llava_path(record[key], prefix, gif_prefix if key == "video" else "")
        writer.write(record, i)


def _llava_path(path, prefix: str, gif_prefix: str):
    """``prefix/[gif_prefix/]path``, leaving a path already under ``prefix`` (a rebuild) as it is."""
    if isinstance(path, list):
        return [_llava_path(p, prefix, gif_prefix) for p in path]
    if prefix and add_prefix(path, prefix) == path:
        return path
    if gif_prefix and isinstance(path, str) and path.lower().endswith(".gif"):
        path = add_prefix(path, gif_prefix)
    return add_prefix(path, prefix)


def split_name(path: str, root: str) -> str:
    """``video/caption/textvr`` for ``<root>/video/caption/textvr/train.json`` (``/<stem>`` unless train)."""
    folder = os.path.relpath(os.path.dirname(os.path.abspath(path)), os.path.abspath(root))
    stem = os.path.splitext(os.path.basename(path))[0]
    parts = [p for p in folder.split(os.sep) if p not in (".", "")]
    if stem != "train" or not parts:
        parts.append(stem)
    return "/".join(parts)


def read_splits(path: str, inputs: list[str]) -> list[tuple[str, str, str]]:
    """``(name, annotation file, media prefix)`` per split of a splits YAML; BuildInputError if malformed."""
    try:
        with open(path, encoding="utf-8") as f:
            spec = yaml.safe_load(f)
    except (OSError, yaml.YAMLError) as e:
        raise BuildInputError(f"{path}: cannot read the splits YAML: {e}") from e
    if not isinstance(spec, dict) or not spec:
        raise BuildInputError(f"{path}: expected a mapping split -> {{annotation: PATH, media_root: DIR}}")
    base = inputs[0] if inputs and os.path.isdir(inputs[0]) else os.path.dirname(os.path.abspath(path))
    out = []
    for name, entry in spec.items():
        if not isinstance(entry, dict) or not isinstance(entry.get("annotation"), str):
            raise BuildInputError(f"{path}: split {name!r} needs 'annotation: PATH' (and 'media_root: DIR')")
        ann = os.path.join(base, entry["annotation"])
        if not os.path.isfile(ann):
            raise BuildInputError(f"{path}: split {name!r}: annotation file {ann} does not exist")
        out.append((str(name), ann, str(entry.get("media_root") or "")))
    return out


def _split_prefix(media_root: str, prefix: str) -> str:
    """A split's media prefix: its absolute media root, or ``prefix/media_root``."""
    if os.path.isabs(media_root):
        return media_root
    return "/".join(p.strip("/") for p in (prefix, media_root) if p)


def build(inputs: Iterable[str], out_dir: str, opts: BuildOptions | None = None, gif_prefix: str = "gifs",
          splits: str | None = None, manifest_name: str = "manifest.jsonl") -> BuildSummary:
    """Convert annotation files (native QA layout or LongVU json, detected per file) to one manifest."""
    opts = opts or BuildOptions()
    inputs = list(inputs)
    if splits:
        jobs = [(name, ann, _split_prefix(media, opts.prefix)) for name, ann, media in read_splits(splits, inputs)]
    else:
        jobs = [(split_name(f, root), f, opts.prefix) for f, root in expand_inputs(inputs, (".json", ".jsonl"))]
    summary = BuildSummary("videochat2", os.path.join(out_dir, manifest_name))
    with atomic_manifest(summary.manifest) as out:
        writer = Writer(summary, out, opts)
        for split, path, prefix in jobs:
            records = read_manifest(path)
            if any("QA" in r for r in records[:100]):
                convert_native(records, split, prefix, writer, opts.progress)
            else:
                convert_llava(records, prefix, gif_prefix, writer, f"videochat2 {split} (LongVU json)",
                              progress=opts.progress)
    return summary
