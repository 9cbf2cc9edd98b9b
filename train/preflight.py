"""Pre-launch checks of a run: everything `longvu train` can verify before any rank starts.

`checked_config(path, overrides)` loads the run config and reports, one line per problem (the key,
the value, what was expected), wrong types and out-of-range values (`train.config.validate`) and
every path the run needs that is missing: the model source (always a local folder: nothing is ever
fetched from a model hub), the vision towers, the tokenizer, the manifests and media roots, the
DeepSpeed config, the hostfile, a checkpoint to resume from, a writable output folder; and an eval
manifest without multiple-choice records when `training.eval.best_metric` is mcq_accuracy. It returns the
config with every path made absolute (what `run_config.json` records). Imports neither torch nor
transformers, so a mistake costs well under a second.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
from pathlib import Path

from longvu.constants import TINY_FAMILIES
from train.config import ConfigError, RunConfig, load_run_config
from train.evaluation.mcq_records import has_mcq_record
from train.optimizers import offloads_optimizer

PROJECT_ROOT = Path(__file__).resolve().parents[1]
MODEL_KINDS = ("tiny", "config", "qwen2", "longvu")
_NEVER_DOWNLOADED = "models are never downloaded: give a local folder, or tiny:FAMILY"


def checked_config(path: str | os.PathLike | None, overrides: list[str]) -> RunConfig:
    """The run config of `path` + `overrides`, checked and with absolute paths; ConfigError otherwise."""
    return absolute_paths(load_run_config(path, overrides, check=path_problems))


# --- the paths a run needs ----------------------------------------------------------------------


def path_problems(config: RunConfig) -> list[str]:
    """One line per path the run needs that is missing or unusable."""
    return (_model_problems(config) + _data_problems(config) + _deepspeed_problems(config.deepspeed)
            + _training_problems(config) + _launch_problems(config) + _qlora_problems(config)
            + _optimizer_problems(config) + _tower_speed_problems(config))


def _folder_problem(key: str, value: str, folder: str,
                    what: str = "a local model folder with a config.json") -> str | None:
    """None if `folder` (from `key=value`) is a folder holding a config.json, else the problem's line."""
    path = Path(folder).expanduser()
    if not path.is_dir():
        where = "" if path.is_absolute() else f" (looked in {Path.cwd()})"
        return f"{key}={value!r}: {folder} is not a local folder{where}; expected {what} ({_NEVER_DOWNLOADED})"
    if not (path / "config.json").is_file():
        return f"{key}={value!r}: {folder} has no config.json; expected {what}"
    return None


def _model_problems(config: RunConfig) -> list[str]:
    m = config.model
    kind, sep, source = m.init.partition(":")
    problems: list[str | None] = []
    if kind not in MODEL_KINDS or not sep and kind != "tiny":
        return [f"model.init={m.init!r}: expected tiny:FAMILY ({', '.join(TINY_FAMILIES)}), config:PATH, "
                f"qwen2:PATH or longvu:PATH ({_NEVER_DOWNLOADED})"]
    if kind == "tiny" and (source or "video") not in TINY_FAMILIES:
        problems.append(f"model.init={m.init!r}: unknown tiny family; expected one of {', '.join(TINY_FAMILIES)}")
    elif kind == "config" and not (Path(source).is_file() or (Path(source) / "config.json").is_file()):
        problems.append(f"model.init={m.init!r}: {source} is neither a LongVUConfig json nor a folder holding one")
    source_problem = _folder_problem("model.init", m.init, source) if kind in ("qwen2", "longvu") else None
    problems.append(source_problem)
    for key in ("siglip_path", "dino_path"):
        value = getattr(m, key)
        if value is not None:
            problems.append(_folder_problem(f"model.{key}", value, value, "a tower folder (config.json + weights)"))
        elif kind == "qwen2":
            problems.append(f"model.{key} is not set: model.init=qwen2:PATH needs both tower folders")
        elif kind == "longvu" and source_problem is None:
            problems.append(_tower_named_by(Path(source), key))
    if m.tokenizer is not None and not Path(m.tokenizer).is_dir():
        problems.append(f"model.tokenizer={m.tokenizer!r}: no such folder; expected a local tokenizer folder "
                        "(or leave it unset for the offline Qwen2 tokenizer)")
    return [p for p in problems if p]


def _tower_named_by(model_dir: Path, key: str) -> str | None:
    """A LongVU directory without model.siglip_path/dino_path: its config.json must name a tower folder
    that exists (relative names: inside the directory, else from the working directory), or hold the
    towers in its weights (our exports with `--include-towers`: a tower config and no path)."""
    try:
        cfg = json.loads((model_dir / "config.json").read_text())
    except (OSError, json.JSONDecodeError) as err:
        return f"model.init=longvu:{model_dir}: cannot read its config.json: {err}"
    named = cfg.get(key)  # also in our `--format longvu --include-towers` exports: "siglip" inside DIR
    if named is None and cfg.get("model_type") == "cambrian_qwen":
        return (f"model.{key} is not set: an original LongVU directory ({model_dir}) does not hold the vision "
                "towers; expected a local tower folder")
    if named is None:
        tower_config = cfg.get("siglip_config" if key == "siglip_path" else "dino_config")
        return None if tower_config else f"model.{key} is not set and {model_dir}/config.json names no tower folder"
    if (model_dir / named).is_dir() or Path(named).is_dir():  # as longvu.checkpoint.tower_path_beside
        return None
    return (f"model.{key} is not set and {model_dir}/config.json names {named!r}, which is not a local folder; "
            f"expected model.{key} set to the tower folder ({_NEVER_DOWNLOADED})")


def _data_problems(config: RunConfig) -> list[str]:
    from data.mixture import MixtureError, parse_spec  # numpy and yaml only

    d = config.data
    problems = []
    if d.media_root is not None and not Path(d.media_root).is_dir():
        problems.append(f"data.media_root={d.media_root!r}: no such folder; expected the folder that relative "
                        "media paths start from")
    try:
        sources = parse_spec(d.train_manifest)
    except MixtureError:  # a malformed spec: already reported by train.config.value_problems
        return problems
    for i, source in enumerate(sources):
        key = "data.train_manifest" if isinstance(d.train_manifest, str) else f"data.train_manifest[{i}]"
        if isinstance(d.train_manifest, str) and d.train_manifest.endswith((".yaml", ".yml")):
            key = f"{d.train_manifest}: datasets[{i}].json_path"
        if not Path(source.path).is_file():
            problems.append(f"{key}={source.path!r}: no such file; expected a JSON or JSONL manifest")
        if source.media_root is not None and not Path(source.media_root).is_dir():
            problems.append(f"{key}: media_root={source.media_root!r}: no such folder")
    e = config.training.eval
    if e.manifest and not Path(e.manifest).is_file():
        problems.append(f"training.eval.manifest={e.manifest!r}: no such file; expected the held-out JSON or JSONL "
                        "manifest (its media next to it)")
    elif e.manifest and e.best_metric == "mcq_accuracy" and e.mcq and has_mcq_record(e.manifest) is False:
        problems.append(f"training.eval.manifest={e.manifest!r}: no multiple-choice records (\"options\": [...] and "
                        "an \"answer\" letter), which training.eval.best_metric='mcq_accuracy' needs; add some or "
                        "set best_metric=loss")
    return problems


def resolve_deepspeed_path(value: str) -> Path:
    """A DeepSpeed config path: as given (from the working directory), else the shipped one of this
    project (`configs/deepspeed/zero2.json` works from any directory)."""
    path = Path(value).expanduser()
    if not path.is_absolute() and not path.exists() and (PROJECT_ROOT / path).exists():
        return PROJECT_ROOT / path
    return path


def load_deepspeed_json(value: str) -> dict:
    """The DeepSpeed config named by `deepspeed:` as a dict; ValueError naming the file and the reason."""
    path = resolve_deepspeed_path(value)
    try:
        ds = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ValueError(f"{path}: cannot read the DeepSpeed config: {err}") from err
    if not isinstance(ds, dict):
        raise ValueError(f"{path}: the DeepSpeed config must be a JSON object")
    for section in ("optimizer", "scheduler"):
        if section in ds:
            raise ValueError(f"{path}: remove the {section!r} section: the run config sets the optimizer "
                             "(per-module learning rates) and the schedule")
    return ds


def _deepspeed_problems(value: str | None) -> list[str]:
    if not value:
        return []
    if not resolve_deepspeed_path(value).is_file():
        return [f"deepspeed={value!r}: no such file; expected a DeepSpeed JSON config such as "
                "configs/deepspeed/zero2.json, zero3.json or zero3_offload.json"]
    try:
        load_deepspeed_json(value)
    except ValueError as err:
        return [f"deepspeed={value!r}: {err}"]
    return []


def _training_problems(config: RunConfig) -> list[str]:
    t, problems = config.training, []
    out = Path(t.output_dir).expanduser()
    if out.exists() and not out.is_dir():
        problems.append(f"training.output_dir={t.output_dir!r}: exists and is not a folder")
    else:
        parent = next(p for p in (out, *out.parents) if p.exists())
        if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
            problems.append(f"training.output_dir={t.output_dir!r}: {parent} is not a writable folder")
    if t.resume not in (None, "", "none", "auto") and not Path(t.resume, "trainer_state.json").is_file():
        problems.append(f"training.resume={t.resume!r}: not a complete checkpoint (no trainer_state.json); "
                        "expected auto, null or a checkpoint-N folder")
    return problems


def _launch_problems(config: RunConfig) -> list[str]:
    hostfile = config.launch.hostfile
    if hostfile is not None and not Path(hostfile).is_file():
        return [f"launch.hostfile={hostfile!r}: no such file; expected a DeepSpeed hostfile (HOST slots=N per line)"]
    return []


def _deepspeed_zero(config: RunConfig) -> dict:
    """The `zero_optimization` section of the run's DeepSpeed config ({} without one or when unreadable:
    _deepspeed_problems reports that)."""
    if not config.deepspeed:
        return {}
    try:
        return load_deepspeed_json(config.deepspeed).get("zero_optimization", {})
    except ValueError:
        return {}


def _optimizer_problems(config: RunConfig) -> list[str]:
    """`training.optimizer: adamw_8bit` needs torchao and the optimizer on the GPU (not ZeRO-Offload's)."""
    if config.training.optimizer != "adamw_8bit":
        return []
    problems = []
    if importlib.util.find_spec("torchao") is None:
        problems.append("training.optimizer='adamw_8bit': needs torchao >= 0.17 (pip install 'longvu-train[quant]')")
    if offloads_optimizer(_deepspeed_zero(config)):
        problems.append(f"training.optimizer='adamw_8bit': deepspeed={config.deepspeed!r} offloads the optimizer to "
                        "the CPU, where DeepSpeed's own CPU Adam runs instead; use one or the other")
    return problems


def _qlora_problems(config: RunConfig) -> list[str]:
    """`lora.quantize: 4bit | fp8` needs LoRA and whole (unpartitioned) frozen weights; 4bit needs torchao."""
    quantize = config.lora.quantize
    if quantize == "none":
        return []
    problems, base = [], "4-bit" if quantize == "4bit" else "FP8"
    if not config.lora.enabled:
        problems.append(f"lora.quantize={quantize!r}: needs lora.enabled=true (the adapters train over the {base} base)")
    if _deepspeed_zero(config).get("stage") == 3:
        problems.append(f"lora.quantize={quantize!r}: deepspeed={config.deepspeed!r} is ZeRO-3, which partitions "
                        f"the frozen weights; the {base} base stays whole on every rank: use configs/deepspeed/zero2.json")
    if quantize == "4bit" and importlib.util.find_spec("torchao") is None:
        problems.append("lora.quantize='4bit': needs torchao >= 0.17 (pip install 'longvu-train[quant]')")
    return problems


def _tower_speed_problems(config: RunConfig) -> list[str]:
    """`training.compile_towers` / `fp8_towers` apply to frozen towers only."""
    t, problems = config.training, []
    chosen = [key for key in ("compile_towers", "fp8_towers") if getattr(t, key)]
    if chosen and t.unfreeze_towers:
        problems.append(f"training.{chosen[0]}=true: applies to frozen towers only, and training.unfreeze_towers=true "
                        "trains them; turn one of the two off")
    return problems


# --- absolute paths -----------------------------------------------------------------------------


def _absolute(value: str | None) -> str | None:
    return value if value is None else str(Path(value).expanduser().absolute())


def _absolute_spec(spec):
    if isinstance(spec, str):
        return _absolute(spec)
    return [_absolute(v) if isinstance(v, str) else
            {**v, **{k: _absolute(v[k]) for k in ("json_path", "path", "media_root") if v.get(k) is not None}}
            for v in spec]


def absolute_paths(config: RunConfig) -> RunConfig:
    """A copy of `config` whose paths are absolute (from the working directory; the DeepSpeed config as
    `resolve_deepspeed_path` finds it), so a run folder's `run_config.json` works from anywhere."""
    m, d, t, launch = config.model, config.data, config.training, config.launch
    kind, sep, source = m.init.partition(":")
    model = dataclasses.replace(
        m, init=f"{kind}:{_absolute(source)}" if sep and kind != "tiny" else m.init,
        siglip_path=_absolute(m.siglip_path), dino_path=_absolute(m.dino_path), tokenizer=_absolute(m.tokenizer))
    resume = t.resume if t.resume in (None, "", "none", "auto") else _absolute(t.resume)
    return dataclasses.replace(
        config, model=model,
        data=dataclasses.replace(d, train_manifest=_absolute_spec(d.train_manifest),
                                 media_root=_absolute(d.media_root)),
        training=dataclasses.replace(t, output_dir=_absolute(t.output_dir), resume=resume,
                                     eval=dataclasses.replace(t.eval, manifest=_absolute(t.eval.manifest))),
        deepspeed=str(resolve_deepspeed_path(config.deepspeed).absolute()) if config.deepspeed else None,
        launch=dataclasses.replace(launch, hostfile=_absolute(launch.hostfile)),
    )

