"""`longvu eval`: score a model directory on MVBench, VideoMME, EgoSchema or MLVU with the original
LongVU protocol (bugs fixed, each fix counted), and `longvu eval score OUT --task T` to rescore a
run's predictions without the model.

    longvu eval --model DIR --task mvbench|videomme|egoschema|mlvu --data-root ROOT --output OUT
                [--nproc N] [--limit N] [--subtitles] [--compat-fallback] [--max-frames N] ...
    longvu eval score OUT --task T [--compat-fallback]
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

TASKS = ("mvbench", "videomme", "egoschema", "mlvu")


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("eval", help="evaluate a model directory on a video benchmark (or rescore a run)")
    parser.add_argument("action", nargs="*", metavar="score OUT", help="rescore OUT's predictions.jsonl (no model)")
    parser.add_argument("--task", required=True, choices=TASKS)
    parser.add_argument("--model", type=Path, help="a model directory (ours, an export, an original LongVU one); "
                        "no default, required except for score")
    parser.add_argument("--data-root", type=Path,
                        help="the benchmark in its published layout; no default, required except for score")
    parser.add_argument("--output", type=Path, help="the run folder (rerun into it to resume); no default, required")
    parser.add_argument("--nproc", type=int, default=1, help="processes (one per GPU), questions sharded over them")
    parser.add_argument("--limit", type=int, help="only the first N questions (default: all)")
    parser.add_argument("--subtitles", action="store_true", help="VideoMME: subtitles in the prompt")
    parser.add_argument("--compat-fallback", action="store_true",
                        help='an out-of-range letter becomes "C", as in the original scripts (counted as fallback)')
    parser.add_argument("--subset-only", action="store_true", help="EgoSchema: only the questions with public answers")
    parser.add_argument("--max-frames", type=int, help="uniform cap on sampled frames (default: the protocol's)")
    parser.add_argument("--device", choices=["cuda", "cpu"], help="default: cuda if available")
    parser.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], help="default: bf16 on cuda, fp32 on cpu")
    parser.add_argument("--siglip-path", help="SigLIP tower folder (default: the one the model directory names)")
    parser.add_argument("--dino-path", help="DINOv2 tower folder (default: the one the model directory names)")
    parser.add_argument("--rank", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--world-size", type=int, help=argparse.SUPPRESS)
    parser.set_defaults(func=run)


def _options(args: argparse.Namespace):
    from train.evaluation.runner import EvalOptions

    return EvalOptions(model=args.model, task=args.task, data_root=args.data_root, output=args.output,
                       nproc=args.nproc, limit=args.limit, subtitles=args.subtitles,
                       compat_fallback=args.compat_fallback, subset_only=args.subset_only, max_frames=args.max_frames,
                       device=args.device, dtype=args.dtype, siglip_path=args.siglip_path, dino_path=args.dino_path)


def _score(args: argparse.Namespace) -> int:
    from train.evaluation.runner import rescore
    from train.evaluation.scoring import summary_table

    out = Path(args.action[1])
    try:
        results = rescore(out, args.task, True if args.compat_fallback else None)
    except (FileNotFoundError, json.JSONDecodeError, KeyError) as err:
        print(f"longvu eval score: {out}: {err}", file=sys.stderr)
        return 2
    print(summary_table(results))
    return 0


def run(args: argparse.Namespace) -> int:
    from data.errors import MediaError
    from train.evaluation.protocol import BenchmarkError
    from train.evaluation.runner import RankFailed
    from train.model_dir import ModelDirError

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if args.action:
        if len(args.action) != 2 or args.action[0] != "score":
            print("longvu eval: positional arguments must be `score OUT`", file=sys.stderr)
            return 2
        return _score(args)
    missing = [f"--{k.replace('_', '-')}" for k in ("model", "data_root", "output") if getattr(args, k) is None]
    if missing or args.nproc < 1:
        print(f"longvu eval: {' '.join(missing) or '--nproc'} required (>= 1)", file=sys.stderr)
        return 2
    opts = _options(args)
    try:
        if args.rank is not None:  # one rank of `--nproc N`, started by the parent
            from train.evaluation.answer import answer_rank
            from train.evaluation.runner import load_benchmark

            answer_rank(opts, load_benchmark(opts), args.rank, args.world_size)
            return 0
        from train.evaluation.runner import evaluate

        evaluate(opts)
    except (BenchmarkError, ModelDirError, MediaError, RankFailed, OSError) as err:
        print(f"longvu eval: {err}", file=sys.stderr)
        return 2
    return 0
