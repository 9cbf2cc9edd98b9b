#!/usr/bin/env python
"""Check our model against an oracle made by running the original LongVU code.

Usage: python scripts/parity.py ORACLE_DIR

ORACLE_DIR holds the original checkpoint (config.json + model.safetensors), the tower weights
(`vision_towers.safetensors` + `vision_towers_config.json`) and one folder per case with
`inputs.safetensors`, `inputs.json`, `outputs.safetensors`, `outputs.json`. Every case folder found
is run. One line per case; exit 1 on any differing index, count or token, or a float difference above
1e-4 * max(1, |reference|), else 0.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file

from longvu.checkpoint import is_original_checkpoint, temporary_tower_folders
from longvu.modeling import LongVUForCausalLM

REL_TOL = 1e-4


@dataclass
class CaseReport:
    name: str
    frames_equal: bool | None
    tokens_equal: bool
    embeds_diff: float
    logits_diff: float
    loss_diff: float
    generated_equal: bool
    failures: list[str]

    def line(self) -> str:
        frames = "n/a" if self.frames_equal is None else ("equal" if self.frames_equal else "DIFFER")
        return (
            f"{self.name:<20} frames {frames:<6} visual tokens {'equal' if self.tokens_equal else 'DIFFER':<6} "
            f"max|d| embeds {self.embeds_diff:.2e} logits {self.logits_diff:.2e} loss {self.loss_diff:.2e} "
            f"greedy-5 {'equal' if self.generated_equal else 'DIFFER'}"
            + ("" if not self.failures else "  FAIL: " + "; ".join(self.failures))
        )


def float_check(name: str, ours: torch.Tensor, ref: torch.Tensor, failures: list[str]) -> float:
    """Max |ours - ref|; records a failure where |d| > REL_TOL * max(1, |ref|) or shapes differ."""
    if ours.shape != ref.shape:
        failures.append(f"{name} shape {tuple(ours.shape)} != {tuple(ref.shape)}")
        return float("inf")
    diff = (ours.double() - ref.double()).abs()
    if bool((diff > REL_TOL * ref.double().abs().clamp(min=1.0)).any()):
        failures.append(f"{name} |d| {diff.max().item():.2e}")
    return diff.max().item()


def case_media(inputs: dict, meta: dict) -> dict:
    """The oracle's pixel tensors and verbatim sizes -> our per-placeholder media lists.

    The original callers pass video sizes as (height, width) and image sizes as PIL's (width, height)."""
    siglip, dino = inputs["pixel_values_siglip"], inputs["pixel_values_dino"]
    video = meta["kind"] == "video"
    first, second = meta["image_sizes"][0]
    height, width = (first, second) if video else (second, first)
    return {
        "pixel_values_siglip": [siglip[0] if video else siglip],
        "pixel_values_dino": [dino[0] if video else dino],
        "media_sizes": [(height, width)],
        "media_kinds": ["video" if video else "image"],
    }


@torch.no_grad()
def run_case(model: LongVUForCausalLM, case_dir: Path) -> CaseReport:
    inputs = load_file(str(case_dir / "inputs.safetensors"))
    ref = load_file(str(case_dir / "outputs.safetensors"))
    meta = json.loads((case_dir / "inputs.json").read_text())
    ref_meta = json.loads((case_dir / "outputs.json").read_text())
    media = case_media(inputs, meta)
    input_ids, labels = inputs["input_ids"], inputs["labels"]
    mask = inputs.get("attention_mask")
    failures: list[str] = []

    prepared = model.prepare_multimodal_inputs(input_ids, mask, labels, **media)
    result = prepared.media[0]
    frames_equal = None
    if "selected_frame_indices" in ref:
        frames_equal = torch.equal(result.kept_indices.cpu(), ref["selected_frame_indices"].reshape(-1).long())
        if not frames_equal:
            failures.append(f"frames {result.kept_indices.tolist()} != {ref['selected_frame_indices'].tolist()}")
    n_visual = result.tokens.shape[0]
    expected_visual = ref_meta.get("visual_len_final")
    tokens_equal = expected_visual is None or n_visual == expected_visual
    tokens_equal = tokens_equal and prepared.inputs_embeds.shape == ref["inputs_embeds"].shape
    if not tokens_equal:
        failures.append(f"visual tokens {n_visual} != {expected_visual} (seq {tuple(prepared.inputs_embeds.shape)})")
    embeds_diff = float_check("inputs_embeds", prepared.inputs_embeds, ref["inputs_embeds"], failures)
    if "labels" in ref and not torch.equal(prepared.labels, ref["labels"].long()):
        failures.append("labels differ")

    out = model(input_ids=input_ids, attention_mask=mask, labels=labels, return_logits=True, **media)
    logits = out.logits[0]
    positions = ref["logits_positions"].long()
    logits_diff = max(
        float_check("logits_last", logits[-1], ref["logits_last"], failures),
        float_check("logits_at_positions", logits[positions], ref["logits_at_positions"], failures),
    )
    loss_diff = float_check("loss", out.loss.reshape(1), ref["loss"].reshape(1), failures)

    generated = model.generate(
        input_ids, attention_mask=mask, do_sample=False, max_new_tokens=ref["generated_ids"].numel(),
        min_new_tokens=ref["generated_ids"].numel(), pad_token_id=151643, **media,
    )
    generated_equal = torch.equal(generated[0].cpu(), ref["generated_ids"].reshape(-1).long())
    if not generated_equal:
        failures.append(f"greedy {generated[0].tolist()} != {ref['generated_ids'].tolist()}")
    return CaseReport(case_dir.name, frames_equal, tokens_equal, embeds_diff, logits_diff, loss_diff,
                      generated_equal, failures)


def load_oracle_model(oracle_dir: Path) -> LongVUForCausalLM:
    configs = json.loads((oracle_dir / "vision_towers_config.json").read_text())
    tower_cfgs = [v for k, v in configs.items() if "Siglip" in k] + [v for k, v in configs.items() if "Dinov2" in k]
    handle, siglip, dino = temporary_tower_folders(oracle_dir / "vision_towers.safetensors", tuple(tower_cfgs))
    with handle:
        if not is_original_checkpoint(oracle_dir):
            raise ValueError(f"{oracle_dir}: not an original LongVU checkpoint (config.json model_type)")
        model = LongVUForCausalLM.from_pretrained(oracle_dir, siglip_path=siglip, dino_path=dino, dtype=torch.float32)
    return model.eval()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[1])
    parser.add_argument("oracle_dir", type=Path)
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    model = load_oracle_model(args.oracle_dir)
    cases = sorted(p.parent for p in args.oracle_dir.glob("*/outputs.safetensors"))
    if not cases:
        print(f"{args.oracle_dir}: no case folders found", file=sys.stderr)
        return 1
    reports = [run_case(model, case) for case in cases]
    for report in reports:
        print(report.line())
    failed = [r.name for r in reports if r.failures]
    print(f"{len(reports) - len(failed)}/{len(reports)} cases match" + (f"; failed: {', '.join(failed)}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
