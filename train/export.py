"""`longvu export CHECKPOINT_OR_RUN_DIR --output DIR`: a training checkpoint -> a verified model directory.

Source (a run directory means its newest complete `checkpoint-N`):
- full fine-tune checkpoints: `model.safetensors` (ZeRO-3: the gathered 16-bit weights) overlaid with
  the fp32 master weights consolidated from the DeepSpeed shards (`global_stepN/`, ZeRO-2 or ZeRO-3,
  with `deepspeed.utils.zero_to_fp32`, CPU only): the weights the trainer holds. A DeepSpeed checkpoint
  (shards, `latest`, or a run config naming DeepSpeed) whose `latest` is missing or whose masters cannot
  be read is an error unless `--weights model` asks for the model weights file alone;
- LoRA checkpoints: the base rebuilt from the run's `run_config.json` (`model.init`), the connector and
  projectors from `non_lora_trainables.safetensors`, the adapter with peft, then the fp32 masters
  (adapter + connector) from the shards. A QLoRA run (`lora.quantize: 4bit`) trained over NF4 decoder
  weights, an FP8 one (`fp8`) over e4m3 ones; the adapter goes onto the full-precision base all the
  same (export_info.json `lora_base`);
- any other model directory `train.model_dir.load_model_dir` reads (an export, an original LongVU dir).
The towers are never in training checkpoints: they come from `--siglip-path/--dino-path`, else the
checkpoint's config.json, else the run config; missing ones are an error naming the paths. The
tokenizer is the source's own; a source without tokenizer files needs `--tokenizer`.

Before anything is loaded the source is checked: its files against its manifest (a checkpoint's
MANIFEST.json, an export's export_info.json), naming the first file that differs, and every pickle
in it loads weights-only (`train.safe_load`; all loads run under `safe_loading`), so a tampered file
is refused and runs no code.

Layouts written (DIR):
- `--format hf` (default): our layout, `LongVUForCausalLM.from_pretrained(DIR)` / the Auto classes.
  config.json (`longvu`), model.safetensors or model-0000i-of-0000n.safetensors + index, tokenizer
  files, generation_config.json, export_info.json. `--include-towers`: the tower weights are in the
  safetensors (keys `model.vision_tower_aux_list.*`) and config.json names no tower folder; without
  it config.json records the absolute tower folders used.
- `--format longvu`: the original LongVU layout (spec §2 keys, `cambrian_qwen` config.json with the
  original field set), the same extra files, for the original code's pins as well as ours: tokenizer
  files that transformers 4.42 reads as `Qwen2TokenizerFast` (`longvu.tokenizer_files`).
  `--include-towers`: the towers as tower folders `DIR/siglip` and `DIR/dino` in the hub layout of
  each tower class, with preprocessor_config.json (`longvu.checkpoint.write_tower_folder`), and
  config.json gains exactly two fields, `siglip_path: "siglip"`, `dino_path: "dino"` (relative to
  DIR; the original code ignores them, our reader resolves them).
  The original code always runs with the compat switches on (spec §7). A model trained with any of
  them off would behave differently there, so the export is refused with the switch named, unless
  `--allow-behaviour-change` (export_info.json then lists the switches under `behaviour_changes`).
- LoRA without `--merge-lora`: DIR is the base model in the chosen format, with the trained connector
  and projectors in it, and `DIR/lora_adapter/` holds the peft adapter of the language model;
  `load_model_dir(DIR)` applies it. With `--merge-lora` the adapter is folded in (merge_and_unload).

Verification, after writing, on the export reloaded through `train.model_dir.load_model_dir`:
- weights: every reloaded tensor is bit-identical (sha1) to the one written (any dtype);
- logits on a fixed probe (a prompt + a 4-frame synthetic video) against the fp32 source model, i.e.
  the consolidated fp32 masters: fp32 exports max |diff| <= 1e-5; bf16/fp16 exports max |diff| <=
  HALF_DRIFT[dtype] * max(1, max |source logits|) (5e-2 bf16, 1e-2 fp16: rounding the weights to 8 or
  11 mantissa bits moves logits by about that much; a wrong or missing tensor moves them far more).
  A `--merge-lora` merge is also checked in memory, in fp32, before the cast (<= 1e-5).
  `--format longvu` reloads with the switches the original layout implies, i.e. what the original
  code will do; only with `--allow-behaviour-change` is the logits check run with the source's
  switches (and the probe under the implied ones recorded).
A failure exits with status 1 and leaves the written files in `DIR.incomplete` for inspection; DIR
itself only appears once verification passed (then export_info.json records the checks and the size
and sha256 of every file). `--force` onto an existing DIR renames the old one to `DIR.replaced`, moves
the new one in, then deletes the old: a kill at any moment leaves DIR complete (old or new) or absent.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path

from longvu.durable import replace_durably

logger = logging.getLogger(__name__)

FP32_TOLERANCE = 1e-5
HALF_DRIFT = {"bf16": 5e-2, "fp16": 1e-2}  # relative to max |source logits|, exported half model vs fp32 source
PROBE_QUESTION = "Describe what happens in this video."


class ExportError(ValueError):
    """An export that cannot be done; the message names the file and the reason."""


class VerificationError(RuntimeError):
    """The written model does not reproduce the source's logits."""


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("export", help="export a training checkpoint as a verified model directory")
    parser.add_argument("source", type=Path, help="a checkpoint-N folder, or a run directory (its newest checkpoint)")
    parser.add_argument("--output", "-o", type=Path, required=True, help="the directory to write")
    parser.add_argument("--format", choices=["hf", "longvu"], default="hf",
                        help="hf: our layout (from_pretrained, Auto classes); longvu: the original LongVU layout")
    parser.add_argument("--merge-lora", action="store_true", help="fold a LoRA adapter into the weights")
    parser.add_argument("--include-towers", action="store_true", help="put the vision towers in DIR (self-contained)")
    parser.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], default="bf16", help="dtype of the written weights")
    parser.add_argument("--force", action="store_true", help="replace a non-empty DIR")
    parser.add_argument("--siglip-path", help="SigLIP tower folder, when the checkpoint's config names none or a "
                                              "wrong one (default: the folder its config.json names, else the run config's)")
    parser.add_argument("--dino-path", help="DINOv2 tower folder (default: as for --siglip-path)")
    parser.add_argument("--max-shard-size", default="5GB", help="safetensors shard size, e.g. 5GB, 200MB")
    parser.add_argument("--device", help="device for the verification forward passes (default: cuda if available)")
    parser.add_argument("--weights", choices=["masters", "model"], default="masters",
                        help="masters: a DeepSpeed checkpoint's fp32 master weights (required when it is one); "
                             "model: the model weights file alone (e.g. 16-bit), ignoring the shards")
    parser.add_argument("--tokenizer", help="tokenizer folder, or 'qwen2' (the offline Qwen2 tokenizer), for a source "
                        "without tokenizer files (default: the source's own tokenizer files)")
    parser.add_argument("--allow-behaviour-change", action="store_true",
                        help="--format longvu: export even when the model was trained with compat switches the "
                             "original layout does not keep (recorded in export_info.json)")
    parser.set_defaults(func=run)


# ---- source ----------------------------------------------------------------------------------


def resolve_checkpoint(path: Path) -> Path:
    """A checkpoint or model directory as given, or a run directory's newest complete checkpoint."""
    from train.checkpoints import newest_checkpoint

    path = Path(path)
    if not path.is_dir():
        raise ExportError(f"{path}: no such directory")
    if (path / "config.json").is_file() or (path / "adapter_config.json").is_file():
        return path
    newest = newest_checkpoint(path)
    if newest is None:
        raise ExportError(f"{path}: neither a checkpoint (no config.json / adapter_config.json) nor a run "
                          "directory with a complete checkpoint-N")
    return newest


def _run_config(checkpoint: Path):
    """The RunConfig of the run that wrote `checkpoint` (its parent's run_config.json), or None."""
    from train.config import RunConfig, _build

    file = checkpoint.parent / "run_config.json"
    if not file.is_file():
        return None
    try:
        return _build(RunConfig, json.loads(file.read_text()), str(file))
    except (ValueError, TypeError) as err:
        raise ExportError(f"{file}: cannot read the run config: {err}") from err


def _has_tower_weights(checkpoint: Path) -> bool:
    from longvu.checkpoint import TOWER_PREFIX, checkpoint_tensor_shapes

    try:
        return any(k.startswith(TOWER_PREFIX) for k in checkpoint_tensor_shapes(checkpoint))
    except FileNotFoundError:
        return False


def resolve_towers(checkpoint: Path, run_config, siglip_path=None, dino_path=None) -> tuple[str, str] | None:
    """Tower folders: given > the checkpoint's config.json > the run config. None when the weights hold
    the towers. Raises ExportError naming every candidate that is missing."""
    from longvu.checkpoint import tower_path_beside

    if siglip_path is None and dino_path is None and _has_tower_weights(checkpoint):
        return None
    candidates = {"siglip_path": [siglip_path], "dino_path": [dino_path]}
    cfg_file = checkpoint / "config.json"
    if cfg_file.is_file():
        cfg = json.loads(cfg_file.read_text())
        for key in candidates:
            candidates[key].append(tower_path_beside(checkpoint, cfg.get(key)))
    if run_config is not None:
        candidates["siglip_path"].append(run_config.model.siglip_path)
        candidates["dino_path"].append(run_config.model.dino_path)
    chosen, problems = {}, []
    for key, paths in candidates.items():
        named = [p for p in paths if p]
        found = next((p for p in named if Path(p).is_dir()), None)
        if found is None:
            problems.append(f"{key}: " + (", ".join(f"{p} (missing)" for p in named) if named else "not set"))
        chosen[key] = found
    if problems:
        raise ExportError(
            f"{checkpoint}: the vision towers are not in the checkpoint and their folders were not found "
            f"({'; '.join(problems)}). Pass --siglip-path and --dino-path (tiny runs: the folders written by "
            "longvu.tiny.save_tiny_towers; their random towers are saved nowhere else)")
    return str(Path(chosen["siglip_path"]).resolve()), str(Path(chosen["dino_path"]).resolve())


def is_deepspeed_checkpoint(checkpoint: Path, run_config) -> bool:
    """Shards or a `latest` tag present, or the run that wrote it trained with DeepSpeed."""
    return ((checkpoint / "latest").exists() or any(checkpoint.glob("global_step*"))
            or (run_config is not None and bool(run_config.deepspeed)))


def zero_fp32_masters(checkpoint: Path, run_config=None, weights: str = "masters") -> dict | None:
    """The fp32 master weights consolidated from the DeepSpeed shards (ZeRO-2/3); None for a checkpoint
    that is no DeepSpeed one, or with `weights="model"`. Missing or unreadable masters -> ExportError."""
    if weights == "model":
        logger.info("%s: --weights model: the model weights file alone, not the DeepSpeed fp32 masters", checkpoint)
        return None
    if not is_deepspeed_checkpoint(checkpoint, run_config):
        return None
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    from train.safe_load import CheckpointError, safe_loading

    instead = "pass --weights model to export the model weights file instead (16-bit when trained in bf16/fp16)"
    latest = checkpoint / "latest"
    if not latest.is_file():
        raise ExportError(f"{latest}: missing, so the DeepSpeed fp32 master weights cannot be found; {instead}")
    tag = checkpoint / latest.read_text().strip()
    if not tag.is_dir():
        raise ExportError(f"{tag}: missing (named by {latest}): no DeepSpeed fp32 master weights; {instead}")
    logger.info("%s: consolidating the fp32 master weights from the DeepSpeed shards", checkpoint)
    try:
        with safe_loading():
            return get_fp32_state_dict_from_zero_checkpoint(str(checkpoint))
    except CheckpointError:
        raise
    except (OSError, RuntimeError, ValueError, KeyError, IndexError, EOFError) as err:
        raise ExportError(f"{tag}: the DeepSpeed fp32 master weights cannot be read ({type(err).__name__}: "
                          f"{err}); {instead}") from None


def _overlay(module, state: dict, where: str) -> int:
    """Load `state` into `module` (strict about unknown names and shapes) -> tensors loaded."""
    own = module.state_dict()
    unknown = sorted(k for k in state if k not in own)
    if unknown:
        raise ExportError(f"{where}: {len(unknown)} tensors match no model parameter, e.g. {unknown[:3]}")
    bad = [k for k, v in state.items() if tuple(v.shape) != tuple(own[k].shape)]
    if bad:
        raise ExportError(f"{where}: shape mismatch for {bad[:3]} ({[tuple(state[k].shape) for k in bad[:3]]} vs "
                          f"{[tuple(own[k].shape) for k in bad[:3]]})")
    module.load_state_dict(state, strict=False)
    return len(state)


@dataclass
class Source:
    """The model as the trainer holds it. `model`: LongVUForCausalLM, or a PeftModel around `longvu`."""

    checkpoint: Path
    model: object
    longvu: object
    is_lora: bool
    towers: tuple[str, str] | None
    weights: list[str] = field(default_factory=list)  # where the weights came from, in load order
    lora_base: str | None = None  # LoRA: "full" (trained over the base as loaded), "nf4" (QLoRA) or "fp8"


def load_source(checkpoint: Path, siglip_path=None, dino_path=None, weights: str = "masters") -> Source:
    """Rebuild the trained model of `checkpoint` in fp32 (see the module docstring); every pickle it
    reads loads weights-only."""
    from train.safe_load import safe_loading

    with safe_loading():
        return _load_source(checkpoint, siglip_path, dino_path, weights)


def _load_source(checkpoint: Path, siglip_path, dino_path, weights: str) -> Source:
    import torch

    run_config = _run_config(checkpoint)
    if (checkpoint / "adapter_config.json").is_file() and not (checkpoint / "config.json").is_file():
        return _load_lora_source(checkpoint, run_config, siglip_path, dino_path, weights)
    from longvu.modeling import LongVUForCausalLM

    towers = resolve_towers(checkpoint, run_config, siglip_path, dino_path)
    tower_kw = dict(siglip_path=towers[0], dino_path=towers[1]) if towers else {}
    model = LongVUForCausalLM.from_pretrained(checkpoint, dtype=torch.float32, **tower_kw)
    loaded = [f"{checkpoint.name} model weights"]
    masters = zero_fp32_masters(checkpoint, run_config, weights)
    if masters:
        n = _overlay(model, masters, f"{checkpoint} DeepSpeed fp32 masters")
        loaded.append(f"DeepSpeed fp32 masters ({n} tensors)")
    return Source(checkpoint, model.eval(), model, False, towers, loaded)


def _load_lora_source(checkpoint: Path, run_config, siglip_path, dino_path, weights: str) -> Source:
    import torch
    from peft import PeftModel
    from safetensors.torch import load_file

    from train.model_setup import load_model
    from train.checkpoints import CONNECTOR_FILE

    if run_config is None:
        raise ExportError(f"{checkpoint}: a LoRA checkpoint, but {checkpoint.parent / 'run_config.json'} is missing: "
                          "the base model cannot be rebuilt")
    connector_file = checkpoint / CONNECTOR_FILE
    if not connector_file.is_file():
        raise ExportError(f"{connector_file}: missing; the trained connector/projector weights would be lost")
    towers = resolve_towers(checkpoint, run_config, siglip_path, dino_path)
    if towers is not None:
        run_config.model.siglip_path, run_config.model.dino_path = towers
    logger.info("%s: rebuilding the LoRA base from model.init=%s", checkpoint, run_config.model.init)
    base = load_model(run_config).to(torch.float32)
    n_conn = _overlay(base, load_file(str(connector_file)), str(connector_file))
    model = PeftModel.from_pretrained(base, str(checkpoint), is_trainable=False)
    model.to(torch.float32)
    loaded = [f"base {run_config.model.init}", f"{CONNECTOR_FILE} ({n_conn} tensors)", "adapter_model.safetensors"]
    masters = zero_fp32_masters(checkpoint, run_config, weights)
    if masters:
        masters = {_peft_key(k): v for k, v in masters.items()}
        n = _overlay(model, masters, f"{checkpoint} DeepSpeed fp32 masters")
        loaded.append(f"DeepSpeed fp32 masters ({n} tensors)")
    lora_base = {"4bit": "nf4", "fp8": "fp8"}.get(run_config.lora.quantize, "full")
    if lora_base != "full":
        logger.info("%s: trained over the %s base (lora.quantize %s); the adapter applies to the full-precision "
                    "base, which differs from the trained one by %s's rounding of the decoder weights", checkpoint,
                    lora_base.upper(), run_config.lora.quantize, lora_base.upper())
    return Source(checkpoint, model.eval(), base, True, towers, loaded, lora_base)


def _peft_key(name: str) -> str:
    """DeepSpeed names adapter weights as the trained module did (`lora_A.default.weight`); older peft
    versions save `lora_A.weight`. Both map to the PeftModel's state-dict key."""
    for part in ("lora_A", "lora_B"):
        if f".{part}.weight" in name:
            return name.replace(f".{part}.weight", f".{part}.default.weight")
    return name


# ---- probe ---------------------------------------------------------------------------------------


def probe_inputs(config, tokenizer, device) -> dict:
    """A fixed prompt + a 4-frame, 2-scene synthetic 48x64 video, preprocessed for `config`'s towers."""
    import torch

    from data.synthetic import scene_frames
    from longvu.processing import FrameSize, build_prompt_ids, preprocess_frames

    frames = scene_frames(4, 48, 64, n_scenes=2, seed=0)
    siglip, dino = preprocess_frames(frames, config.siglip_image_size, config.dino_image_size)
    ids = torch.tensor([build_prompt_ids(tokenizer, PROBE_QUESTION)], device=device)
    return dict(input_ids=ids, pixel_values_siglip=[siglip.to(device)], pixel_values_dino=[dino.to(device)],
                media_sizes=[FrameSize(48, 64)], media_kinds=["video"])


def probe_logits(model, inputs: dict):
    """Logits [1, S, vocab] (fp32, on the CPU) of `model` on the probe; pixels follow the model's dtype."""
    import torch

    dtype = next(model.parameters()).dtype
    device = next(model.parameters()).device
    kw = dict(inputs, pixel_values_siglip=[p.to(device, dtype) for p in inputs["pixel_values_siglip"]],
              pixel_values_dino=[p.to(device, dtype) for p in inputs["pixel_values_dino"]],
              input_ids=inputs["input_ids"].to(device))
    with torch.no_grad():
        return model(**kw).logits.float().cpu()


def fingerprints(model) -> dict[str, tuple]:
    """name -> (dtype, shape, sha1 of the bytes) for every state-dict tensor: an exact, compact record
    of what was written."""
    import hashlib

    import torch

    out = {}
    for name, t in model.state_dict().items():
        raw = t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()
        out[name] = (str(t.dtype), tuple(t.shape), hashlib.sha1(raw.tobytes()).hexdigest())
    return out


def compare_fingerprints(got: dict, want: dict) -> dict:
    """Every tensor of the reloaded model bit-identical to the one written -> a report row."""
    if got.keys() != want.keys():
        raise VerificationError(f"reloaded tensors differ in names: missing {sorted(want.keys() - got.keys())[:3]}, "
                                f"extra {sorted(got.keys() - want.keys())[:3]}")
    bad = [k for k in want if got[k] != want[k]]
    if bad:
        raise VerificationError(f"{len(bad)} reloaded tensors differ from the written ones, e.g. {bad[:3]} "
                                f"({[got[k][:2] for k in bad[:3]]} vs {[want[k][:2] for k in bad[:3]]})")
    return {"check": f"weights: {len(want)} reloaded tensors bit-identical to the written ones",
            "max_abs_diff": 0.0, "bound": 0.0}


def compare(name: str, got, want, tolerance: float, scale: float = 1.0) -> dict:
    """max |got - want| <= tolerance * scale, else VerificationError -> a report row."""
    if got.shape != want.shape:
        raise VerificationError(f"{name}: logits shape {tuple(got.shape)} != {tuple(want.shape)}")
    diff = float((got - want).abs().max())
    row = {"check": name, "max_abs_diff": diff, "bound": tolerance * scale}
    if not diff <= tolerance * scale:
        raise VerificationError(f"{name}: logits differ by {diff:.3g} > {tolerance * scale:.3g}")
    return row


# ---- writing ---------------------------------------------------------------------------------------


def _generation_config(config):
    from transformers import GenerationConfig

    from longvu.constants import QWEN_ENDOFTEXT_ID

    eos = [config.eos_token_id] + ([QWEN_ENDOFTEXT_ID] if config.eos_token_id != QWEN_ENDOFTEXT_ID else [])
    pad = config.pad_token_id if config.pad_token_id is not None else QWEN_ENDOFTEXT_ID
    return GenerationConfig(bos_token_id=config.bos_token_id, eos_token_id=eos, pad_token_id=pad, do_sample=False)


def _shard_bytes(size: str) -> int:
    units = {"KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}
    text = size.strip().upper()
    for unit, factor in units.items():
        if text.endswith(unit):
            return int(float(text[: -len(unit)]) * factor)
    if text.isdigit():
        return int(text)
    raise ExportError(f"--max-shard-size {size!r}: expected e.g. 5GB, 500MB or a byte count")


def write_model(model, out: Path, fmt: str, include_towers: bool, towers: tuple[str, str] | None,
                max_shard_size: str) -> None:
    """Write a LongVUForCausalLM (already in the export dtype) in `fmt` (see the module docstring)."""
    from longvu.checkpoint import original_config_dict, save_original_layout
    from longvu.towers import save_tower_folders

    config = model.config
    config.dtype = next(model.parameters()).dtype
    if fmt == "hf":
        config.siglip_path, config.dino_path = (None, None) if include_towers else (towers or (None, None))
        model.save_pretrained(out, include_towers=include_towers, max_shard_size=max_shard_size)
        return
    save_original_layout(model, out, max_shard_bytes=_shard_bytes(max_shard_size))
    if include_towers:
        save_tower_folders(model.model.towers, out, (config.siglip_image_size, config.dino_image_size))
        original = original_config_dict(config)
        original.update(siglip_path="siglip", dino_path="dino")
        (out / "config.json").write_text(json.dumps(dict(sorted(original.items())), indent=2) + "\n")


# ---- the export ----------------------------------------------------------------------------------


# What each behaviour switch does when on (spec §7); the original code always runs with them on.
COMPAT_MEANINGS = {
    "compat_swap_video_hw": "decoded-video sizes are read as (W, H) when unpadding",
    "compat_lowres_single_image": "a single image gets only the low-res grid",
    "compat_dot_product_scoring": "hi-res frames are ranked by raw dot products with the text",
    "compat_dino_legacy_pos_interp": "DINOv2 position embeddings are interpolated as in transformers 4.42",
}


def behaviour_changes(config) -> list[dict]:
    """The compat switches whose value in `config` differs from the one the original LongVU layout implies
    (what our loader, like the original code, uses for a `cambrian_qwen` directory): one row per switch."""
    from longvu.checkpoint import original_config_dict
    from longvu.config import original_to_longvu_dict

    implied = original_to_longvu_dict(original_config_dict(config))
    return [{"switch": k, "trained": getattr(config, k), "original_layout": implied[k], "meaning": meaning}
            for k, meaning in COMPAT_MEANINGS.items() if getattr(config, k) != implied[k]]


def behaviour_change_message(checkpoint: Path, changes: list[dict]) -> str:
    """Why a `--format longvu` export is refused, and the ways out."""
    implied = " and ".join(f"{c['switch']}={c['original_layout']} ({c['meaning']})" for c in changes)
    trained = ", ".join(f"{c['switch']}={c['trained']}" for c in changes)
    overrides = ", ".join(f"{c['switch']}: {str(c['original_layout']).lower()}" for c in changes)
    return (f"{checkpoint}: --format longvu would change what the model does: the original LongVU code always "
            f"runs with {implied}, but this model was trained with {trained}. Ways out: train with the "
            f"original's setting (model.overrides: {{{overrides}}}), export with --format hf, or pass "
            "--allow-behaviour-change (export_info.json then records the change)")


@dataclass
class Prepared:
    """What will be written: `model` (LongVUForCausalLM in the export dtype; with an unmerged adapter the
    base, LLM without it) or `adapter_model` (the PeftModel around it), and their tensor fingerprints."""

    model: object
    adapter_model: object | None
    written: dict
    checks: list


def _check_destination(out: Path, checkpoint: Path, force: bool) -> None:
    if out.exists() and not out.is_dir():
        raise ExportError(f"{out}: exists and is not a directory; --force replaces directories only")
    if out.exists() and any(out.iterdir()) and not force:
        raise ExportError(f"{out}: exists and is not empty; pass --force to replace it")
    if out == checkpoint.resolve() or checkpoint.resolve().is_relative_to(out):
        raise ExportError(f"{out}: would overwrite the source checkpoint {checkpoint}")


def prepare(source: Source, merge_lora: bool, inputs: dict, reference, target_dtype) -> Prepared:
    """Merge (checked in fp32 against the source) or keep the adapter, cast, fingerprint."""
    checks = []
    adapter_model = None
    if source.is_lora and merge_lora:
        model = source.model.merge_and_unload()
        checks.append(compare("merge (fp32, in memory)", probe_logits(model, inputs), reference, FP32_TOLERANCE))
    elif source.is_lora:
        adapter_model, model = source.model, source.longvu
    else:
        model = source.model
    (adapter_model or model).to(target_dtype)
    return Prepared(model, adapter_model, fingerprints(adapter_model or model), checks)


def write(prepared: Prepared, staging: Path, fmt: str, include_towers: bool, towers, max_shard_size: str,
          tokenizer) -> None:
    """Write the model, adapter, tokenizer and generation config into a fresh `staging` folder."""
    from longvu.tokenizer_files import save_original_tokenizer
    from train.model_dir import ADAPTER_DIR

    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    model = prepared.model
    if prepared.adapter_model is not None:
        prepared.adapter_model.save_pretrained(staging / ADAPTER_DIR)
        model = prepared.adapter_model.unload()  # the base with the trained connector, LLM without the adapter
    write_model(model.cpu(), staging, fmt, include_towers, towers, max_shard_size)
    if fmt == "longvu":
        try:  # read by transformers 4.42 (the original's pin) and 5.x
            save_original_tokenizer(tokenizer, staging)
        except ValueError as err:
            raise ExportError(f"--format longvu: the tokenizer cannot be written for the original code: {err}") from err
    else:
        tokenizer.save_pretrained(staging)
    _generation_config(model.config).save_pretrained(staging)


def verify(staging: Path, prepared_written: dict, changes: list[dict], towers, include_towers: bool, dtype: str,
           device: str, inputs: dict, reference) -> tuple[list[dict], dict | None]:
    """Reload the written folder as a user would and compare weights (bit-exact) and probe logits ->
    (checks, probe under the changed behaviour or None).

    The reload takes the directory's own switches (`--format longvu`: those the original layout
    implies, as the original code will run it). With `changes` (allowed behaviour changes) that reload
    cannot match the source: its probe is reported, and the logits check runs on a second reload with
    the source's switches (what it then checks is the weights)."""
    import torch

    from train.model_dir import load_model_dir
    from train.model_setup import DTYPES

    target_dtype = DTYPES[dtype]
    kw = dict(dtype=target_dtype, merge_adapter=False,
              **({} if include_towers else dict(siglip_path=towers[0], dino_path=towers[1])))
    reloaded = load_model_dir(staging, **kw).to(device)
    checks = [compare_fingerprints(fingerprints(reloaded), prepared_written)]
    got = probe_logits(reloaded, inputs)
    del reloaded
    changed_probe = None
    if changes:
        changed_probe = {"probe_tokens": {"source": reference.shape[1], "original_layout": got.shape[1]}}
        if got.shape == reference.shape:
            changed_probe["max_abs_diff"] = float((got - reference).abs().max())
        trained = {c["switch"]: c["trained"] for c in changes}
        got = probe_logits(load_model_dir(staging, **kw, **trained).to(device), inputs)
    name = "logits: reload vs source" + (" (with the trained switches)" if changes else "")
    if target_dtype is torch.float32:
        checks.append(compare(f"{name} (fp32)", got, reference, FP32_TOLERANCE))
    else:
        checks.append(compare(f"{name}: {dtype} vs fp32 source", got, reference, HALF_DRIFT[dtype],
                              max(1.0, float(reference.abs().max()))))
    return checks, changed_probe


def verify_source(checkpoint: Path, weights: str = "masters") -> None:
    """The source's files against its manifest (a checkpoint's MANIFEST.json, an export's
    export_info.json) and its pickles weights-only -> CheckpointError naming the first that fails.
    With `weights="model"` the DeepSpeed state, which is not read, is not checked."""
    from train.checkpoints import deepspeed_state, verify_checkpoint
    from train.integrity import MANIFEST, verify_files
    from train.safe_load import check_pickles

    if (checkpoint / MANIFEST).is_file() or not (checkpoint / "export_info.json").is_file():
        verify_checkpoint(checkpoint, exclude=deepspeed_state(checkpoint) if weights == "model" else ())
        return  # (a folder with no manifest at all: a warning, and the pickles checked)
    recorded = json.loads((checkpoint / "export_info.json").read_text()).get("files")
    if recorded is None:
        logger.warning("%s: its export_info.json records no file hashes: file integrity not checked", checkpoint)
    else:
        verify_files(checkpoint, recorded, exclude=("export_info.json",))
    check_pickles(checkpoint)


def source_tokenizer(checkpoint: Path, named: str | None):
    """`named` (a tokenizer folder, or "qwen2": the offline Qwen2 tokenizer), else the checkpoint's own;
    a checkpoint without tokenizer files and no `named` -> ExportError."""
    from longvu.tokenizer import load_tokenizer
    from train.model_dir import TOKENIZER_FILES

    if named is not None:
        return load_tokenizer(None if named == "qwen2" else named)
    if not any((checkpoint / name).is_file() for name in TOKENIZER_FILES):
        raise ExportError(f"{checkpoint}: no tokenizer files ({', '.join(TOKENIZER_FILES)}); pass --tokenizer DIR, "
                          "or --tokenizer qwen2 for the offline Qwen2 tokenizer LongVU uses")
    return load_tokenizer(checkpoint)


def replace_dir(new: Path, out: Path) -> None:
    """Move the finished `new` to `out`; an existing `out` is renamed aside (`out.replaced`) first and
    deleted only once `new` is in place."""
    aside = out.with_name(out.name + ".replaced")
    shutil.rmtree(aside, ignore_errors=True)  # left by an export killed between the two renames
    if out.exists():
        out.rename(aside)
    replace_durably(new, out)
    shutil.rmtree(aside, ignore_errors=True)


def export(source_path: Path, out: Path, fmt: str = "hf", merge_lora: bool = False, include_towers: bool = False,
           dtype: str = "bf16", force: bool = False, siglip_path=None, dino_path=None, max_shard_size: str = "5GB",
           device: str | None = None, weights: str = "masters", tokenizer: str | None = None,
           allow_behaviour_change: bool = False) -> dict:
    """Check the source, load it, probe it, prepare, write to `DIR.incomplete`, verify, move to DIR; ->
    the report written to DIR/export_info.json. Raises ExportError, CheckpointError (a source file
    refused) or VerificationError (the latter leaves DIR.incomplete)."""
    import torch
    from tqdm import tqdm

    from train.checkpoints import usual_file_modes
    from train.integrity import folder_manifest
    from train.model_dir import ADAPTER_DIR
    from train.model_setup import DTYPES

    checkpoint = resolve_checkpoint(source_path)
    out = Path(out).resolve()
    _check_destination(out, checkpoint, force)
    verify_source(checkpoint, weights)
    tokenizer = source_tokenizer(checkpoint, tokenizer)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    steps = tqdm(total=5, desc="export", unit="step", file=sys.stderr)

    steps.set_postfix_str("load source")
    try:
        source = load_source(checkpoint, siglip_path, dino_path, weights)
    except ValueError as err:  # weights or tower folders that do not fit; the message names the file
        raise ExportError(str(err)) from err
    if source.towers is None and not include_towers:
        raise ExportError(f"{checkpoint}: holds its towers but names no tower folders; pass --include-towers, "
                          "or --siglip-path and --dino-path")
    if not source.is_lora and merge_lora:
        logger.warning("%s: not a LoRA checkpoint; --merge-lora has nothing to merge", checkpoint)
    lora = ("merged" if merge_lora else f"adapter in {ADAPTER_DIR}/") if source.is_lora else "none"
    lora_base = source.lora_base
    towers, weights = source.towers, source.weights
    changes = behaviour_changes(source.longvu.config) if fmt == "longvu" else []
    if changes and not allow_behaviour_change:
        raise ExportError(behaviour_change_message(checkpoint, changes))
    steps.update()

    steps.set_postfix_str("probe source")
    source.model.to(device)
    inputs = probe_inputs(source.longvu.config, tokenizer, device)
    reference = probe_logits(source.model, inputs)
    steps.update()

    steps.set_postfix_str("prepare")
    prepared = prepare(source, merge_lora, inputs, reference, DTYPES[dtype])
    del source
    steps.update()

    steps.set_postfix_str("write")
    staging = out.with_name(out.name + ".incomplete")
    write(prepared, staging, fmt, include_towers, towers, max_shard_size, tokenizer)
    written, checks = prepared.written, prepared.checks
    del prepared
    steps.update()

    steps.set_postfix_str("verify")
    more, changed_probe = verify(staging, written, changes, towers, include_towers, dtype, device, inputs, reference)
    checks += more
    steps.update()
    steps.close()

    report = {
        "source": str(checkpoint.resolve()), "weights": weights, "format": fmt, "dtype": dtype, "lora": lora,
        "towers": "inside" if include_towers else {"siglip_path": towers[0], "dino_path": towers[1]},
        "verification": checks, "files": folder_manifest(staging, exclude=("export_info.json",)),
    }
    if lora_base:
        report["lora_base"] = lora_base
    if changes:
        report["behaviour_changes"] = {"switches": changes, "probe": changed_probe}
    (staging / "export_info.json").write_text(json.dumps(report, indent=2) + "\n")
    usual_file_modes(staging)
    replace_dir(staging, out)
    return report


def run(args: argparse.Namespace) -> int:
    from train.safe_load import CheckpointError

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        report = export(args.source, args.output, args.format, args.merge_lora, args.include_towers, args.dtype,
                        args.force, args.siglip_path, args.dino_path, args.max_shard_size, args.device,
                        args.weights, args.tokenizer, args.allow_behaviour_change)
    except (ExportError, CheckpointError) as err:
        print(f"longvu export: {err}", file=sys.stderr)
        return 2
    except VerificationError as err:
        print(f"longvu export: VERIFICATION FAILED: {err}\nthe written files are in "
              f"{Path(args.output).resolve()}.incomplete", file=sys.stderr)
        return 1
    for row in report["verification"]:
        print(f"verified: {row['check']}: max |diff| {row['max_abs_diff']:.3g} <= {row['bound']:.3g}")
    for change in report.get("behaviour_changes", {}).get("switches", []):
        print(f"behaviour changed: {change['switch']}: trained {change['trained']}, the original layout runs "
              f"{change['original_layout']} ({change['meaning']})")
    print(f"exported {report['source']} -> {Path(args.output).resolve()} ({report['format']}, {report['dtype']}, "
          f"lora: {report['lora']}, towers: {report['towers']})")
    return 0
