"""The model side of `longvu eval`: load the model with the benchmark's thresholds, decode each video
group once, generate (greedy, 5 new tokens, stop at <|im_end|>), append one row per question."""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path

from data.errors import MediaError
from train.evaluation.protocol import MAX_NEW_TOKENS, Protocol, Question
from train.evaluation.scoring import parse_answer

logger = logging.getLogger(__name__)


def load_eval_model(opts, protocol: Protocol, rank: int):
    """(model on its device, tokenizer): the model directory with the protocol's thresholds applied
    (config overrides: this run only, nothing is written back)."""
    import torch

    from train.model_dir import inference_placement, load_dir_tokenizer, load_model_dir

    device, dtype = inference_placement(opts.device, opts.dtype)
    if device == "cuda":
        device = f"cuda:{rank % torch.cuda.device_count()}"
    model = load_model_dir(opts.model, opts.siglip_path, opts.dino_path, dtype=dtype, **protocol.overrides)
    return model.to(device), load_dir_tokenizer(opts.model)


def decode_question(q: Question, protocol: Protocol, max_frames: int | None):
    """(train.generate.Media of uint8 frames [T, h, w, 3], frame times in seconds [T]) for a question's
    video; raises MediaError. The model preprocesses the frames on its own device."""
    import torch

    from data.video import decode_video
    from train.generate import Media

    start = time.perf_counter()
    decoded = decode_video(q.video, protocol.sampling(os.path.isdir(q.video), max_frames), q.start, q.end,
                           q.folder_fps)
    media = Media(torch.from_numpy(decoded.frames), tuple(decoded.size), "video", time.perf_counter() - start)
    return media, (decoded.indices / decoded.native_fps).tolist()


def question_row(q: Question, prompt: str, output: str | None, stats: dict, seconds: float,
                 error: str | None = None) -> dict:
    """The predictions row of one question (`output` None: no answer, with `error` saying why)."""
    row = {"question_id": q.question_id, "task": q.task, "prompt": prompt, "output": output, "pred": None,
           "answer": q.answer, "correct": None, "n_options": len(q.options), **stats, "seconds": round(seconds, 4)}
    if error is not None:
        row["error"] = error
    return row


def generate_answer(model, tokenizer, media, prompt: str, cache) -> tuple[str, dict]:
    """(raw generated text, {frames_kept, visual_tokens}) for one prompt on decoded media."""
    import torch

    from longvu.processing import build_prompt_ids

    ids = torch.tensor([build_prompt_ids(tokenizer, prompt)], device=model.device)
    stop = tokenizer.convert_tokens_to_ids("<|im_end|>")
    out = model.generate(ids, **media.kwargs(), media_encoder=cache, max_new_tokens=MAX_NEW_TOKENS, do_sample=False,
                         eos_token_id=stop, pad_token_id=tokenizer.pad_token_id, return_dict_in_generate=True)
    text = tokenizer.decode(out.sequences[0], skip_special_tokens=False)
    return text, {"frames_kept": sum(out.media.frames_kept), "visual_tokens": sum(out.media.visual_tokens)}


def answer_group(ctx: dict, questions: list[Question]) -> list[dict]:
    """Rows for the questions of one video group: one decode, one MediaCache."""
    from longvu.media_cache import MediaCache
    from train.evaluation import videomme

    start = time.perf_counter()
    try:
        media, times = decode_question(questions[0], ctx["protocol"], ctx["max_frames"])
    except MediaError as err:
        logger.error("%s: %s", questions[0].question_id, err)
        empty = {"frames_decoded": 0, "frames_kept": 0, "visual_tokens": 0}
        return [question_row(q, q.prompt, None, empty, 0.0, error=str(err)) for q in questions]
    cache, rows = MediaCache(), []
    for q in questions:
        prompt = videomme.subtitle_prompt(q, times, ctx["tokenizer"]) if q.subtitles else q.prompt
        output, stats = generate_answer(ctx["model"], ctx["tokenizer"], media, prompt, cache)
        rows.append(question_row(q, prompt, output, {"frames_decoded": media.frames_decoded, **stats},
                         time.perf_counter() - start))
        start = time.perf_counter()
    return rows


def _groups(questions: list[Question]) -> list[list[Question]]:
    groups: dict[str, list[Question]] = {}
    for q in questions:
        groups.setdefault(q.group, []).append(q)
    return list(groups.values())


def open_shard(path: Path):
    """`path` opened for appending rows; a partial last line (a kill mid-write) is ended first, so it
    stays one unreadable line and the next row is whole."""
    with open(path, "a+b") as f:
        if f.seek(0, os.SEEK_END) > 0:
            f.seek(-1, os.SEEK_END)
            if f.read(1) != b"\n":
                f.write(b"\n")  # append mode: written at the end
    return open(path, "a")


def answer_rank(opts, questions: list[Question], rank: int, world: int) -> int:
    """Answer this rank's unanswered questions, appending rows to OUT/shards/rank<rank>.jsonl.
    Shows a progress bar with the running accuracy. Returns the number of questions answered."""
    from tqdm import tqdm

    from train.evaluation.runner import BENCHMARKS, SHARDS, done_ids, shard

    protocol = BENCHMARKS[opts.task].PROTOCOL
    done = done_ids(opts.output)
    todo = [q for q in shard(questions, rank, world) if q.question_id not in done]
    if not todo:
        return 0
    model, tokenizer = load_eval_model(opts, protocol, rank)
    ctx = dict(model=model, tokenizer=tokenizer, protocol=protocol, max_frames=opts.max_frames)
    path = Path(opts.output) / SHARDS / f"rank{rank}.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    hits = scored = 0
    bar = tqdm(total=len(todo), desc=f"{opts.task} rank {rank}", position=rank, dynamic_ncols=True)
    with open_shard(path) as f:
        for group in _groups(todo):
            for row in answer_group(ctx, group):
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
                f.flush()
                if row["answer"] is not None:
                    parsed = parse_answer(row["output"] or "", row["n_options"], protocol.search_letters,
                                          opts.compat_fallback) if row["output"] is not None else None
                    hits += int(parsed is not None and parsed.pred == row["answer"])
                    scored += 1
                bar.set_postfix(acc=f"{100.0 * hits / max(scored, 1):.1f}%")
                bar.update(1)
    bar.close()
    return len(todo)
