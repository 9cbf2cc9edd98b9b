"""A LongVU model for lmms-eval, registered through lmms-eval's entry-point group `lmms_eval.models`
(pyproject.toml: `longvu = "train.evaluation.lmms_model:manifest"`), so lmms-eval's own tasks run it:

    lmms_eval --model longvu --model_args pretrained=DIR,video_fps=1,max_frames=1000 \
              --tasks mvbench,videomme,egoschema_subset,mlvu_dev

`pretrained` is any directory `longvu generate` loads (train.model_dir). Each request's visuals
(video paths, frame folders, or PIL images) are decoded with data.video at `video_fps` (capped at
`max_frames`, uniform) and preprocessed for both towers; the task's text becomes the question of the
Qwen chat prompt, one media placeholder per visual. `generate_until`: greedy unless the task asks
for a temperature, cut at the task's `until` strings; `loglikelihood`: the summed log-probability of
the continuation after the prompt and whether it is the greedy continuation.
"""

from __future__ import annotations

import os

import numpy as np
import torch
from lmms_eval.api.model import lmms

from longvu.processing import FrameSize, build_prompt_ids
from train.generate import Media

MODEL_ID = "longvu"


def manifest():
    """The entry point's payload: lmms-eval's ModelManifest for `--model longvu`."""
    from lmms_eval.models.registry_v2 import ModelManifest

    return ModelManifest(model_id=MODEL_ID, simple_class_path=f"{__name__}.LongVU")


class LongVU(lmms):
    """lmms-eval's simple-model interface around LongVUForCausalLM (one request at a time)."""

    def __init__(self, pretrained: str, video_fps: float = 1.0, max_frames: int = 1000, device: str | None = None,
                 dtype: str | None = None, max_new_tokens: int = 16, siglip_path: str | None = None,
                 dino_path: str | None = None, batch_size: int = 1, **kwargs) -> None:
        super().__init__()
        from data.video import SamplingConfig
        from train.model_dir import inference_placement, load_dir_tokenizer, load_model_dir

        if kwargs:
            raise ValueError(f"longvu model_args: unknown {sorted(kwargs)}")
        if int(batch_size) != 1:
            raise ValueError("longvu model_args: batch_size must be 1 (each request has its own video)")
        self.device, self.dtype = inference_placement(device, dtype)
        self.model = load_model_dir(pretrained, siglip_path, dino_path, dtype=self.dtype).to(self.device)
        self.tokenizer = load_dir_tokenizer(pretrained)
        self.sampling = SamplingConfig(video_fps=float(video_fps), max_frames=int(max_frames))
        self.max_new_tokens = int(max_new_tokens)
        self.batch_size = 1

    # ---- inputs --------------------------------------------------------------------------------

    def _media(self, visual) -> Media:
        """One visual (a video/frame-folder path, an image path or a PIL image) -> Media of uint8 frames
        (the model preprocesses them on its device)."""
        from data.video import decode_video, load_image_array

        if isinstance(visual, (str, os.PathLike)) and not str(visual).lower().endswith(
                (".jpg", ".jpeg", ".png", ".bmp", ".webp")):
            decoded = decode_video(str(visual), self.sampling)
            frames, size, kind = decoded.frames, decoded.size, "video"
        else:
            pixels = load_image_array(str(visual)) if isinstance(visual, (str, os.PathLike)) else \
                np.asarray(visual.convert("RGB"))
            frames, size, kind = pixels[None], FrameSize(*pixels.shape[:2]), "image"
        return Media(torch.from_numpy(np.ascontiguousarray(frames)), tuple(size), kind, 0.0)

    def _inputs(self, context: str, doc_to_visual, doc_id, task: str, split: str) -> tuple[list[int], dict]:
        """(prompt ids, media kwargs of generate/forward) for one request."""
        visuals = doc_to_visual(self.task_dict[task][split][doc_id]) if doc_to_visual else []
        media = [self._media(v) for v in (visuals or [])]
        kwargs = dict(pixel_values_siglip=[m.frames for m in media], pixel_values_dino=[m.frames for m in media],
                      media_sizes=[m.size for m in media], media_kinds=[m.kind for m in media]) if media else {}
        text = context.replace("<image>", "").replace("<video>", "")
        return build_prompt_ids(self.tokenizer, text, n_media=len(media)), kwargs

    # ---- lmms-eval interface -----------------------------------------------------------------------

    @torch.no_grad()
    def generate_until(self, requests) -> list[str]:
        """requests[i].args = (context, gen_kwargs, doc_to_visual, doc_id, task, split) -> generated texts."""
        out = []
        for req in requests:
            context, gen_kwargs, doc_to_visual, doc_id, task, split = req.args
            ids, media = self._inputs(context, doc_to_visual, doc_id, task, split)
            gen = dict(gen_kwargs or {})
            until = gen.pop("until", None) or []
            until = [until] if isinstance(until, str) else list(until)
            temperature = float(gen.get("temperature", 0) or 0)
            sample = dict(do_sample=True, temperature=temperature) if temperature > 0 else dict(do_sample=False)
            new = self.model.generate(torch.tensor([ids], device=self.device), **media, pad_token_id=self.tokenizer.pad_token_id,
                                      max_new_tokens=int(gen.get("max_new_tokens", self.max_new_tokens)),
                                      eos_token_id=self.tokenizer.convert_tokens_to_ids("<|im_end|>"), **sample)
            text = self.tokenizer.decode(new[0], skip_special_tokens=True)
            for stop in until:
                text = text.split(stop)[0] if stop else text
            out.append(text)
        return out

    @torch.no_grad()
    def loglikelihood(self, requests) -> list:
        """requests[i].args = (context, continuation or doc_to_target, doc_to_visual, doc_id, task, split)
        -> (sum of the continuation's token log-probabilities, whether greedy decoding gives it).

        lmms-eval 0.7.3's evaluator turns any response that is not text into `str(response)`, which
        its multiple_choice scoring then cannot unpack; its own `GenerationResult` wrapper passes the
        pair through unchanged, so each pair is returned inside one."""
        from lmms_eval.api.instance import GenerationResult

        out = []
        for req in requests:
            context, target, doc_to_visual, doc_id, task, split = req.args
            if callable(target):
                target = target(self.task_dict[task][split][doc_id])
            ids, media = self._inputs(context, doc_to_visual, doc_id, task, split)
            cont = self.tokenizer(str(target), add_special_tokens=False)["input_ids"]
            full = torch.tensor([ids + cont], device=self.device)
            logits = self.model(input_ids=full, **media).logits[0, -len(cont) - 1:-1].float()
            logp = torch.log_softmax(logits, dim=-1)
            want = torch.tensor(cont, device=logp.device)
            pair = (float(logp.gather(1, want[:, None]).sum()), bool((logp.argmax(-1) == want).all()))
            out.append(GenerationResult(text=pair))
        return out

    def generate_until_multi_round(self, requests) -> list[str]:
        raise NotImplementedError("longvu: multi-round generation is not supported; use generate_until tasks")
