"""``longvu data ...``: build manifests from public datasets and validate manifests.

    longvu data build onevision SHARDS_OR_JSON... --output DIR [--prefix P] [--probe]
    longvu data build videochat2 ANNOTATION_ROOT_OR_FILES... --output DIR [--splits splits.yaml]
    longvu data build llava-video DATASET_ROOT --output DIR
    longvu data validate MANIFEST [--media-root DIR] [--report FILE.json] [--workers N]

``add_parser(subparsers)`` registers the ``data`` command on the project CLI; every handler is set
as ``func`` and returns the exit code. ``python -m data.cli ...`` runs it standalone.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

logger = logging.getLogger(__name__)


def _build(args: argparse.Namespace) -> int:
    from data.builders import llava_video, onevision, videochat2
    from data.builders.common import BuildInputError, BuildOptions

    opts = BuildOptions(prefix=args.prefix, probe=args.probe, media_root=args.media_root, timeout_s=args.timeout,
                        progress=not args.quiet)
    if args.probe and not args.media_root and args.source != "onevision":
        print("error: --probe needs --media-root (where the media paths start)", file=sys.stderr)
        return 2
    if not args.inputs and not args.splits:
        print(f"error: {args.source}: give input files/folders/globs", file=sys.stderr)
        return 2
    try:
        if args.source == "onevision":
            summary = onevision.build(args.inputs, args.output, opts)
        elif args.source == "videochat2":
            summary = videochat2.build(args.inputs, args.output, opts, gif_prefix=args.gif_prefix, splits=args.splits)
        else:
            summary = llava_video.build(args.inputs, args.output, opts)
    except (BuildInputError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(summary.format())
    return 0


def _validate(args: argparse.Namespace) -> int:
    from data.validate import ValidateConfig, format_summary, validate_manifest, write_report
    from data.video import SamplingConfig
    from longvu.config import LongVUConfig

    tokenizer = None
    if not args.estimate_text:
        from longvu.tokenizer import load_tokenizer

        tokenizer = load_tokenizer(args.tokenizer)
    cfg = ValidateConfig(
        media_root=args.media_root or os.path.dirname(os.path.abspath(args.manifest)),
        sampling=SamplingConfig(video_fps=args.video_fps, max_frames=args.max_frames, backend=args.backend,
                                max_side=128),
        model=LongVUConfig(image_token_len=args.image_token_len, tokenizer_model_max_length=args.model_max_length),
        decode_timeout_s=args.timeout,
        workers=args.workers,
    )
    try:
        report = validate_manifest(args.manifest, cfg, tokenizer, progress=not args.quiet)
    except (OSError, ValueError) as e:  # a missing or unreadable manifest (bad lines are bad records)
        print(f"error: {e}", file=sys.stderr)
        return 2
    if report["total"] == 0:
        print(f"error: manifest {args.manifest} has no records", file=sys.stderr)
        return 1
    print(format_summary(report))
    if args.report:
        write_report(report, args.report)
        print(f"report written to {args.report}")
    return 1 if report["bad"] else 0


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Add the ``data`` command (with ``build`` and ``validate``) to an argparse subparsers object."""
    data = subparsers.add_parser("data", help="build and validate training manifests")
    sub = data.add_subparsers(dest="data_command", required=True)

    build = sub.add_parser("build", help="convert a public dataset into a JSONL manifest",
                           formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    build.add_argument("source", choices=["onevision", "videochat2", "llava-video"],
                       help="onevision: LLaVA-OneVision-Data parquet shards/folders/globs or LongVU's onevision.json; "
                            "videochat2: VideoChat2-IT annotation root/files/globs or LongVU's train_video_data.json; "
                            "llava-video: the LLaVA-Video-178K root (subset folders of json + extracted videos)")
    build.add_argument("inputs", nargs="*", help="input files, folders (searched recursively) or globs")
    build.add_argument("--output", required=True, help="output folder (manifest.jsonl, plus images/ for onevision parquet)")
    build.add_argument("--prefix", default="", help="prepended to every relative media path (never twice)")
    build.add_argument("--splits", default=None,
                       help="videochat2: YAML mapping split -> {annotation: PATH, media_root: DIR} (default: none)")
    build.add_argument("--gif-prefix", default="gifs", help="videochat2 (LongVU json): folder of .gif videos")
    build.add_argument("--probe", action="store_true",
                       help="record each media item's n_frames/fps/height/width in the manifest "
                            "(training then opens no file before step 1)")
    build.add_argument("--media-root", default=None,
                       help="with --probe: where relative media paths start (default: none)")
    build.add_argument("--timeout", type=float, default=120.0, help="with --probe: seconds allowed per file")
    build.add_argument("--quiet", action="store_true", help="no progress bar")
    build.set_defaults(func=_build)

    val = sub.add_parser("validate", help="check every record of a manifest (exit 1 if any is bad or none)",
                         formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    val.add_argument("manifest", help="JSON or JSONL manifest")
    val.add_argument("--media-root", default=None, help="folder that relative media paths start from "
                                                        "(default: the manifest's folder)")
    val.add_argument("--report", default=None,
                     help="write a JSON report of every bad record here (default: none; the first bad records "
                          "are printed either way)")
    val.add_argument("--workers", type=int, default=max(1, (os.cpu_count() or 2) // 2), help="parallel processes")
    val.add_argument("--video-fps", type=float, default=1.0, help="frames sampled per second")
    val.add_argument("--max-frames", type=int, default=1000, help="frame cap per video")
    val.add_argument("--backend", choices=["decord", "pyav"], default="decord", help="video decoder")
    val.add_argument("--timeout", type=float, default=120.0, help="seconds allowed per media decode")
    val.add_argument("--image-token-len", type=int, default=144, help="576 for the image stage")
    val.add_argument("--model-max-length", type=int, default=8192, help="sequence length limit")
    val.add_argument("--tokenizer", default=None, help="local tokenizer folder (default: offline Qwen2 build)")
    val.add_argument("--estimate-text", action="store_true",
                     help="estimate text tokens from characters instead of tokenising")
    val.add_argument("--quiet", action="store_true", help="no progress bar")
    val.set_defaults(func=_validate)
    return data


def main(argv: list[str] | None = None) -> int:
    """Standalone entry: ``python -m data.cli build|validate ...``."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    parser = argparse.ArgumentParser(prog="longvu")
    add_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["data", *(sys.argv[1:] if argv is None else argv)])
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
