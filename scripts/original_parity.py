#!/usr/bin/env python
"""Load a `longvu export --format longvu --include-towers` directory with the original LongVU code and
compare its logits on a real clip with ours.

Usage (with this project's python):
    python scripts/original_parity.py EXPORT_DIR --original-code ORIG_CHECKOUT --original-python ORIG_PY \\
        --clip VIDEO [--question TEXT] [--fps 1] [--max-frames 32] [--tolerance 1e-4]

ORIG_CHECKOUT is a checkout of Vision-CAIR/LongVU (commit 1b0be5cc); ORIG_PY a python with its pins and
what its modules import (torch, transformers 4.42.4, tokenizers 0.19, accelerate 0.34.2, numpy 1.26,
iopath, decord; no GPU needed). The original code runs unchanged, in fp32 on the CPU; only its hub
names are redirected to the export's folders, through a hub cache made for the run (HF_HUB_OFFLINE=1):
  google/siglip-so400m-patch14-384 -> EXPORT_DIR/siglip, facebook/dinov2-giant -> EXPORT_DIR/dino,
  Vision-CAIR/LongVU_Llama3_2_3B (a tokenizer that conversation.py loads on import) -> EXPORT_DIR.
The export is loaded as `longvu/builder.py` loads a `cambrian_qwen` directory (AutoTokenizer,
CambrianQwenForCausalLM.from_pretrained, resize_token_embeddings(len(tokenizer)), each tower's
load_model()), in fp32 instead of its fp16/CUDA. One adjustment, only for towers other than
SigLIP-so400m: the original hard-codes SigLIP's width (1152) until the tower is loaded, so for a
narrower tower (the tiny ones) it is set from the export's siglip/config.json; printed when applied.

Both models get the same pixels (ours: `longvu.processing.preprocess_frames`; `process_images` of the
original moves them to CUDA), and the same prompt, which each side tokenizes itself (the original:
its `qwen` conversation template and `tokenizer_image_token`). Printed: the original loader's key
report, whether its towers hold the export's tensors, whether the ids agree, the pixel difference of
the original's SigLIP processor (read from EXPORT_DIR/siglip) against ours, the logits' shapes and
max |diff| over the original's vocabulary. Exit 1 on missing/unexpected keys, a tower not loaded from
the export, differing ids, or logits differing by more than the tolerance.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

HUB_NAMES = {  # hub id the original code loads -> folder of the export
    "google/siglip-so400m-patch14-384": "siglip",
    "facebook/dinov2-giant": "dino",
    "Vision-CAIR/LongVU_Llama3_2_3B": ".",
}
ORIGINAL_SIGLIP_WIDTH = 1152  # hard-coded in the original's SiglipVisionTower before load_model()


def make_hub_cache(export_dir: Path, cache: Path) -> None:
    """A hub cache in which each HUB_NAMES id resolves to its export folder (snapshot = a symlink)."""
    for repo, sub in HUB_NAMES.items():
        root = cache / ("models--" + repo.replace("/", "--"))
        (root / "refs").mkdir(parents=True)
        (root / "snapshots").mkdir()
        (root / "refs" / "main").write_text("0" * 40)
        os.symlink((export_dir / sub).resolve(), root / "snapshots" / ("0" * 40))


# ---- the original side (runs under ORIG_PY with the checkout first on sys.path) -----------------


def original_worker(work: Path, export_dir: Path) -> None:
    """Load the export with the original code, run the prompt and pixels in `work`, write its outputs."""
    import numpy as np
    import torch
    from PIL import Image
    from safetensors.torch import load_file, save_file

    torch.set_grad_enabled(False)
    siglip_width = json.loads((export_dir / "siglip" / "config.json").read_text())["hidden_size"]
    from longvu.multimodal_encoder import siglip_encoder

    if siglip_width != ORIGINAL_SIGLIP_WIDTH:
        init = siglip_encoder.SiglipVisionTower.__init__

        def narrow_init(self, *args, **kwargs):
            init(self, *args, **kwargs)
            self._hidden_size = siglip_width

        siglip_encoder.SiglipVisionTower.__init__ = narrow_init
        print(f"adjustment: SigLIP width {siglip_width} instead of the hard-coded {ORIGINAL_SIGLIP_WIDTH}")

    from transformers import AutoTokenizer

    from longvu.constants import DEFAULT_IMAGE_TOKEN, IMAGE_TOKEN_INDEX
    from longvu.conversation import conv_templates
    from longvu.language_model.cambrian_qwen import CambrianQwenForCausalLM
    from longvu.mm_datautils import expand2square, tokenizer_image_token

    spec = json.loads((work / "inputs.json").read_text())
    tensors = load_file(str(work / "inputs.safetensors"))
    tokenizer = AutoTokenizer.from_pretrained(str(export_dir))
    model, info = CambrianQwenForCausalLM.from_pretrained(str(export_dir), torch_dtype=torch.float32,
                                                          low_cpu_mem_usage=True, output_loading_info=True)
    model.resize_token_embeddings(len(tokenizer))
    towers = model.get_vision_tower_aux_list()
    for tower in towers:
        if not tower.is_loaded:
            tower.load_model()
        tower.to(dtype=torch.float32)
    model.eval()
    tower_weights = {}
    for tower, sub in zip(towers, ("siglip", "dino")):  # loaded from the export, not initialised at random
        written = load_file(str(export_dir / sub / "model.safetensors"))
        loaded = tower.vision_tower.state_dict()
        tower_weights[sub] = [len(loaded), sum(k in written and torch.equal(v, written[k]) for k, v in loaded.items())]

    conv = conv_templates["qwen"].copy()
    conv.append_message(conv.roles[0], DEFAULT_IMAGE_TOKEN + "\n" + spec["question"])
    conv.append_message(conv.roles[1], None)
    ids = tokenizer_image_token(conv.get_prompt(), tokenizer, IMAGE_TOKEN_INDEX, return_tensors="pt")

    siglip_proc = towers[0].image_processor
    side = siglip_proc.size["height"]
    fill = tuple(int(x * 255) for x in siglip_proc.image_mean)
    frames = tensors["frames"].numpy()
    own_siglip = torch.stack([
        siglip_proc.preprocess(expand2square(Image.fromarray(np.ascontiguousarray(f)), fill).resize((side, side)),
                               return_tensors="pt")["pixel_values"][0]
        for f in frames])

    images = [tensors["pixel_values_siglip"].unsqueeze(0), tensors["pixel_values_dino"].unsqueeze(0)]
    logits = model(ids.unsqueeze(0), images=images, image_sizes=[tuple(spec["image_size_hw"])], use_cache=False,
                   return_dict=True).logits[0]
    save_file({"input_ids": ids, "logits": logits.contiguous(), "siglip_pixels": own_siglip.contiguous()},
              str(work / "original.safetensors"))
    (work / "original.json").write_text(json.dumps({
        "missing_keys": sorted(info["missing_keys"]), "unexpected_keys": sorted(info["unexpected_keys"]),
        "mismatched_keys": [str(k) for k in info["mismatched_keys"]], "tokenizer_class": type(tokenizer).__name__,
        "tower_weights": tower_weights,
    }))


# ---- our side ------------------------------------------------------------------------------------


def our_inputs_and_logits(export_dir: Path, clip: str, question: str, fps: float, max_frames: int):
    """Decode `clip` at native size, preprocess, run our loader's model -> (inputs dict, logits [S, V])."""
    import torch

    from data.video import SamplingConfig, decode_video
    from longvu.processing import build_prompt_ids, preprocess_frames
    from train.model_dir import load_dir_tokenizer, load_model_dir

    model = load_model_dir(export_dir, dtype=torch.float32)
    tokenizer = load_dir_tokenizer(export_dir)
    decoded = decode_video(clip, SamplingConfig(video_fps=fps, max_frames=max_frames, max_side=None))
    siglip, dino = preprocess_frames(decoded.frames, model.config.siglip_image_size, model.config.dino_image_size)
    ids = torch.tensor([build_prompt_ids(tokenizer, question)])
    with torch.no_grad():
        logits = model(input_ids=ids, pixel_values_siglip=[siglip], pixel_values_dino=[dino],
                       media_sizes=[decoded.size], media_kinds=["video"]).logits[0]
    inputs = {"frames": torch.from_numpy(decoded.frames), "pixel_values_siglip": siglip, "pixel_values_dino": dino,
              "input_ids": ids[0]}
    return inputs, list(decoded.size), logits


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("export_dir", type=Path)
    parser.add_argument("--original-code", type=Path, required=True, help="checkout of Vision-CAIR/LongVU")
    parser.add_argument("--original-python", required=True, help="python with the original's pins")
    parser.add_argument("--clip", required=True, help="a video file")
    parser.add_argument("--question", default="Describe this video in detail")
    parser.add_argument("--fps", type=float, default=1.0)
    parser.add_argument("--max-frames", type=int, default=32)
    parser.add_argument("--tolerance", type=float, default=1e-4, help="max |logit diff| allowed (fp32)")
    args = parser.parse_args(argv)

    import torch
    from safetensors.torch import load_file, save_file

    export_dir = args.export_dir.resolve()
    missing = [sub for sub in HUB_NAMES.values() if not (export_dir / sub / "config.json").is_file()
               and not (export_dir / sub / "tokenizer.json").is_file()]
    if missing:
        print(f"{export_dir}: no {', '.join(missing)} folder: export with --format longvu --include-towers")
        return 2
    inputs, size_hw, ours = our_inputs_and_logits(export_dir, args.clip, args.question, args.fps, args.max_frames)
    with tempfile.TemporaryDirectory(prefix="longvu-original-parity-") as tmp:
        work = Path(tmp)
        make_hub_cache(export_dir, work / "hub")
        save_file({k: v.contiguous() for k, v in inputs.items()}, str(work / "inputs.safetensors"))
        (work / "inputs.json").write_text(json.dumps({"question": args.question, "image_size_hw": size_hw}))
        env = dict(os.environ, HF_HUB_CACHE=str(work / "hub"), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
                   PYTHONPATH=str(args.original_code.resolve()))
        cmd = [args.original_python, str(Path(__file__).resolve()), "--worker", str(work), str(export_dir)]
        proc = subprocess.run(cmd, cwd=args.original_code, env=env, capture_output=True, text=True)
        if proc.returncode != 0:
            print(proc.stdout[-3000:] + proc.stderr[-3000:])
            print(f"the original code failed (exit {proc.returncode})")
            return 1
        print("".join(line + "\n" for line in proc.stdout.splitlines() if line.startswith("adjustment")), end="")
        theirs = load_file(str(work / "original.safetensors"))
        report = json.loads((work / "original.json").read_text())

    failures = []
    keys = {k: report[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")}
    print(f"original loader: {report['tokenizer_class']}; checkpoint keys missing/unexpected/mismatched: "
          f"{len(keys['missing_keys'])}/{len(keys['unexpected_keys'])}/{len(keys['mismatched_keys'])}")
    if any(keys.values()):
        failures.append(f"checkpoint keys {keys}")
    for sub, (total, equal) in report["tower_weights"].items():
        print(f"original {sub} tower: {equal}/{total} tensors equal to {export_dir / sub / 'model.safetensors'}")
        if equal != total:
            failures.append(f"{sub} tower not loaded from the export")
    ids_equal = torch.equal(theirs["input_ids"], inputs["input_ids"])
    print(f"prompt ids: {'equal' if ids_equal else 'DIFFER'} ({inputs['input_ids'].numel()} ours, "
          f"{theirs['input_ids'].numel()} original)")
    if not ids_equal:
        failures.append("prompt ids differ")
    pixel_diff = float((theirs["siglip_pixels"] - inputs["pixel_values_siglip"]).abs().max())
    print(f"SigLIP pixels, original processor from {export_dir / 'siglip'} vs ours: max |diff| {pixel_diff:.3g}")
    vocab = theirs["logits"].shape[-1]
    print(f"clip {args.clip}: {inputs['frames'].shape[0]} frames of {size_hw[1]}x{size_hw[0]}; logits ours "
          f"{tuple(ours.shape)}, original {tuple(theirs['logits'].shape)}")
    if ours.shape[0] != theirs["logits"].shape[0]:
        failures.append("sequence lengths differ (visual token counts)")
    else:
        diff = float((ours[:, :vocab] - theirs["logits"]).abs().max())
        print(f"logits max |diff| over the first {vocab} ids: {diff:.3g} (tolerance {args.tolerance:g})")
        if not diff <= args.tolerance:
            failures.append(f"logits differ by {diff:.3g}")
    print("PASS" if not failures else "FAIL: " + "; ".join(failures))
    return 0 if not failures else 1


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "--worker":
        original_worker(Path(sys.argv[2]), Path(sys.argv[3]))
    else:
        sys.exit(main())
