"""Benchmark: building a VideoChat2-IT manifest at scale, and time to the first training batch.

Writes a synthetic VideoChat2-IT tree as published (``video/<task>/<source>/train.json`` lists of
``{video, QA: [{i, q, a}]}``, one media folder per split given by a splits YAML) with ``--records``
records over ``--splits`` splits. Every record names its own media file: one small H.264 mp4 per
split, hard-linked under each record's name (distinct paths, so each file is probed on its own). Then:

1. ``longvu data build videochat2 ROOT --splits splits.yaml`` without probing, and with ``--probe``
   (records/s, the whole CLI build including reading and writing);
2. time to the first batch of ``train.run.build_dataset`` + a DataLoader (0 workers, the Qwen2
   tokenizer, a tiny model config) on the built manifest: with the probe recorded in the manifest
   (no file opened before step 1), with a warm cache in the run folder (a resumed run), and cold.

Prints one table.

    python scripts/bench/data_build.py [--records 100000] [--splits 20] [--workdir /tmp/longvu-data-bench]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import time
from types import SimpleNamespace

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "tests"))

from data.cli import main as data_cli  # noqa: E402
from data_helpers import write_video  # noqa: E402

TASKS = ("caption", "classification", "conversation", "reasoning", "vqa")


def write_tree(root: str, n_records: int, n_splits: int) -> str:
    """The annotation tree, the media folders and the splits YAML; returns the YAML's path."""
    base = os.path.join(root, "base.mp4")
    write_video(base, n_frames=60, fps=30, height=48, width=64)
    per_split = n_records // n_splits
    lines = []
    for s in range(n_splits):
        task, source = TASKS[s % len(TASKS)], f"source{s}"
        ann_dir = os.path.join(root, "VideoChat2-IT", "video", task, source)
        media_dir = os.path.join(root, "media", source)
        os.makedirs(ann_dir, exist_ok=True)
        os.makedirs(media_dir, exist_ok=True)
        records = [{"video": f"{source}_{i:06d}.mp4",
                    "QA": [{"i": "Watch the video and answer.", "q": f"What happens in clip {i}?",
                            "a": "A person walks across the room and opens the window."}]} for i in range(per_split)]
        with open(os.path.join(ann_dir, "train.json"), "w") as f:
            json.dump(records, f)
        split_base = os.path.join(media_dir, "base.mp4")  # one inode per split: file systems cap links per inode
        shutil.copyfile(base, split_base)
        for r in records:
            os.link(split_base, os.path.join(media_dir, r["video"]))
        lines.append(f"{task}_{source}: {{annotation: video/{task}/{source}/train.json, media_root: {source}}}")
    path = os.path.join(root, "splits.yaml")
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    return path


def timed_build(root: str, splits: str, out: str, probe: bool) -> float:
    """Seconds for one CLI build."""
    args = ["build", "videochat2", os.path.join(root, "VideoChat2-IT"), "--splits", splits, "--output", out, "--quiet"]
    if probe:
        args += ["--probe", "--media-root", os.path.join(root, "media")]
    t0 = time.perf_counter()
    if data_cli(args) != 0:
        raise SystemExit("build failed")
    return time.perf_counter() - t0


def first_batch_seconds(manifest: str, media_root: str, run_dir: str, tokenizer) -> float:
    """Seconds from nothing to the first collated batch, as training does it (rank 0 of 1)."""
    from torch.utils.data import DataLoader

    from data.collate import Collator
    from train.config import load_run_config
    from train.run import build_dataset

    config = load_run_config(None, [f"data.train_manifest={manifest}", f"data.media_root={media_root}",
                                    f"training.output_dir={run_dir}", "data.num_workers=0"])
    model_config = SimpleNamespace(tokenizer_model_max_length=8192, siglip_image_size=384, dino_image_size=378,
                                   image_token_len=144, lowres_token=8, highres=True)
    t0 = time.perf_counter()
    dataset, sampler, _, _ = build_dataset(config, tokenizer, model_config)
    next(iter(DataLoader(dataset, batch_sampler=sampler, collate_fn=Collator())))
    return time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--records", type=int, default=100_000, help="records in the tree")
    parser.add_argument("--splits", type=int, default=20, help="splits (annotation files)")
    parser.add_argument("--workdir", default="/tmp/longvu-data-bench", help="scratch folder (emptied first)")
    args = parser.parse_args()
    import logging

    logging.basicConfig(level=logging.WARNING)
    from longvu.tokenizer import build_qwen2_tokenizer

    shutil.rmtree(args.workdir, ignore_errors=True)
    os.makedirs(args.workdir)
    t0 = time.perf_counter()
    splits = write_tree(args.workdir, args.records, args.splits)
    print(f"wrote the tree ({args.records} records, {args.splits} splits) in {time.perf_counter() - t0:.1f} s")
    plain, probed = os.path.join(args.workdir, "plain"), os.path.join(args.workdir, "probed")
    rows = [("build, no probing", timed_build(args.workdir, splits, plain, False)),
            ("build, --probe", timed_build(args.workdir, splits, probed, True))]
    tokenizer = build_qwen2_tokenizer()
    media = os.path.join(args.workdir, "media")
    rows.append(("first batch, probe recorded in manifest",
                 first_batch_seconds(os.path.join(probed, "manifest.jsonl"), media, os.path.join(args.workdir, "r0"),
                                     tokenizer)))
    cold = first_batch_seconds(os.path.join(plain, "manifest.jsonl"), media, os.path.join(args.workdir, "r1"), tokenizer)
    warm = first_batch_seconds(os.path.join(plain, "manifest.jsonl"), media, os.path.join(args.workdir, "r1"), tokenizer)
    rows += [("first batch, warm cache (resume)", warm), ("first batch, cold (every file probed)", cold)]
    n = args.splits * (args.records // args.splits)
    print(f"\n{platform.node()} ({os.cpu_count()} CPUs), {n} records")
    print(f"{'what':<42} {'seconds':>9} {'records/s':>11}")
    for name, seconds in rows:
        print(f"{name:<42} {seconds:>9.1f} {n / seconds:>11,.0f}")


if __name__ == "__main__":
    main()
