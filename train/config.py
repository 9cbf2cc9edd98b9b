"""Run configuration: one YAML file (model, data, training, LoRA, DeepSpeed, launcher), plus
`key=value` command-line overrides with dotted keys (`training.learning_rate=2e-5`), which win.

A `stage` fills in that stage's defaults before the file's own values are applied.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml


@dataclass
class ModelConfig:
    """Where the weights come from.

    init: "tiny:FAMILY" (a random tiny model, see longvu.tiny), "config:PATH" (random weights from a
    LongVUConfig json or its folder), "qwen2:PATH" (a Qwen2 LLM folder; the connector starts fresh), or
    "longvu:PATH" (an original LongVU directory or one of ours)."""

    init: str = "tiny:video"
    siglip_path: str | None = None
    dino_path: str | None = None
    tokenizer: str | None = None  # a tokenizer folder; None: the offline Qwen2 tokenizer
    dtype: str = "bf16"  # bf16 | fp16 | fp32 (training precision)
    attn_implementation: str = "auto"  # auto (flash_attention_2 when installed on a GPU, else sdpa) | sdpa | ...
    overrides: dict[str, Any] = field(default_factory=dict)  # LongVUConfig fields


@dataclass
class DataSection:
    train_manifest: str | list | None = None  # a manifest, a LLaVA-NeXT data YAML, or a list (data/mixture.py)
    media_root: str | None = None
    video_fps: float = 1.0
    max_frames: int | None = 1000
    decode_backend: str = "decord"
    decode_max_side: int | None = 384
    decode_timeout_s: float | None = 120.0
    per_device_batch_size: int = 1
    max_tokens_per_batch: int = 16384  # estimated (text + visual) tokens, padded, per device batch
    packing: bool = False  # pack samples into one row of up to max_tokens_per_batch (per_device_batch_size unused)
    num_workers: int = 4
    prefetch_factor: int = 2
    max_bad_fraction: float = 0.01
    bad_min_samples: int = 100


@dataclass
class LearningRates:
    """Per-module learning rates; None: the base `learning_rate`."""

    projector: float | None = None  # mm_projector and the aux projectors
    connector: float | None = None  # SVA (vision_sampler_0), vision_query, image_newline
    llm: float | None = None
    towers: float | None = None  # only when `unfreeze_towers`


@dataclass
class TrainingSection:
    output_dir: str = "runs/longvu"
    learning_rate: float = 1e-5
    lr: LearningRates = field(default_factory=LearningRates)
    weight_decay: float = 0.0  # never on biases, norms or embeddings-free vectors (1-D parameters)
    lr_scheduler: str = "cosine"
    warmup_ratio: float = 0.03
    num_train_epochs: float = 1.0
    max_steps: int = -1
    gradient_accumulation_steps: int = 1
    max_grad_norm: float = 1.0
    # auto | full | selective | none (train/activation_checkpointing.py); auto: least recomputation that fits
    activation_checkpointing: str = "auto"
    checkpointed_layers: int | None = None  # `selective`: how many decoder layers are recomputed
    activation_memory_gib: float | None = None  # `auto`/`selective`: cap on the estimated peak, if below the GPU's
    fused_kernels: str = "auto"  # auto | liger | none (longvu/kernels.py); auto: liger when installed, on a GPU
    unfreeze_towers: bool = False
    save_steps: int = 500
    save_at_end: bool = True
    keep_last: int = 3
    resume: str | None = "auto"  # auto | PATH | None
    logging_steps: int = 1
    report_to: list[str] = field(default_factory=lambda: ["tensorboard"])
    run_name: str | None = None
    seed: int = 42


@dataclass
class LoraSection:
    enabled: bool = False
    r: int = 64
    alpha: int = 128
    dropout: float = 0.05
    target_modules: list[str] = field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    )


@dataclass
class LauncherSection:
    """How `longvu train` starts its processes when run outside a distributed launcher."""

    launcher: str = "deepspeed"  # deepspeed | torchrun
    nproc: int | None = None  # processes on this node; None: one per GPU (2 on a CPU-only machine)
    hostfile: str | None = None  # DeepSpeed hostfile for several nodes
    master_addr: str | None = None
    master_port: int | None = None


@dataclass
class RunConfig:
    stage: str = "custom"
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataSection = field(default_factory=DataSection)
    training: TrainingSection = field(default_factory=TrainingSection)
    lora: LoraSection = field(default_factory=LoraSection)
    deepspeed: str | None = "configs/deepspeed/zero2.json"
    launch: LauncherSection = field(default_factory=LauncherSection)


# What each stage sets unless the file says otherwise (spec §5, the reference scripts).
STAGE_DEFAULTS: dict[str, dict[str, Any]] = {
    "image_pretrain": {
        "model": {"overrides": {"image_token_len": 576, "highres": False}},
        "training": {"learning_rate": 1e-5, "lr_scheduler": "cosine", "warmup_ratio": 0.03},
        "data": {"per_device_batch_size": 4},
    },
    "video_finetune": {
        "model": {"overrides": {"image_token_len": 144, "highres": True, "lowres_token": 8, "drop_threshold": 0.8}},
        "training": {"learning_rate": 5e-6, "lr_scheduler": "cosine", "warmup_ratio": 0.03},
        "data": {"video_fps": 1.0, "per_device_batch_size": 1},
    },
    "lora_video": {
        "model": {"overrides": {"image_token_len": 144, "highres": True, "lowres_token": 8, "drop_threshold": 0.8}},
        "training": {"learning_rate": 2e-4, "lr_scheduler": "cosine", "warmup_ratio": 0.03},
        "data": {"video_fps": 1.0, "per_device_batch_size": 1},
        "lora": {"enabled": True},
    },
    "custom": {},
}


class _Loader(yaml.SafeLoader):
    """SafeLoader that reads `1e-5` as a float, as YAML 1.2 does (PyYAML's YAML 1.1 rules need `1.0e-5`
    and would otherwise hand a learning rate over as the string "1e-5")."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9][0-9_]*)[eE][-+]?[0-9]+$"),
    list("-+0123456789."),
)


def _load_yaml(text: str) -> Any:
    return yaml.load(text, Loader=_Loader)


class ConfigError(ValueError):
    """A run config that cannot be used; the message names the key and the reason."""


def _merge(base: dict, update: dict) -> dict:
    out = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def _build(cls, values: dict, where: str):
    """Instantiate dataclass `cls` from a dict, recursing into dataclass fields; unknown keys are errors."""
    known = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {unknown}; known: {sorted(known)}")
    kwargs = {}
    for name, value in values.items():
        default = known[name].default_factory() if known[name].default_factory is not dataclasses.MISSING else None
        if dataclasses.is_dataclass(default) and not isinstance(value, dict):
            raise ConfigError(f"{where}.{name}: expected a mapping, got {value!r}")
        kwargs[name] = _build(type(default), value, f"{where}.{name}") if dataclasses.is_dataclass(default) else value
    return cls(**kwargs)


def parse_override(text: str) -> tuple[list[str], Any]:
    """`a.b.c=value` -> (["a", "b", "c"], value parsed as YAML)."""
    if "=" not in text:
        raise ConfigError(f"override {text!r}: expected KEY=VALUE")
    key, raw = text.split("=", 1)
    if not key:
        raise ConfigError(f"override {text!r}: empty key")
    return key.split("."), _load_yaml(raw) if raw else None


def load_run_config(path: str | Path | None, overrides: list[str] = ()) -> RunConfig:
    """YAML file (may be None) + overrides -> RunConfig, with the stage's defaults underneath."""
    values: dict = {}
    if path is not None:
        try:
            values = _load_yaml(Path(path).read_text()) or {}
        except (OSError, yaml.YAMLError) as err:
            raise ConfigError(f"{path}: cannot read the run config: {err}") from err
        if not isinstance(values, dict):
            raise ConfigError(f"{path}: the top level must be a mapping")
    for text in overrides:
        keys, value = parse_override(text)
        update: Any = value
        for key in reversed(keys):
            update = {key: update}
        values = _merge(values, update)
    stage = values.get("stage", "custom")
    if stage not in STAGE_DEFAULTS:
        raise ConfigError(f"stage {stage!r}: choose from {sorted(STAGE_DEFAULTS)}")
    config = _build(RunConfig, _merge(STAGE_DEFAULTS[stage], values), str(path or "config"))
    validate(config)
    return config


def validate(config: RunConfig) -> None:
    from longvu.config import ConfigOverrideError, check_override_names

    try:
        check_override_names(config.model.overrides, "model.overrides")
    except ConfigOverrideError as err:
        raise ConfigError(str(err)) from err
    if config.model.dtype not in ("bf16", "fp16", "fp32"):
        raise ConfigError(f"model.dtype {config.model.dtype!r}: choose bf16, fp16 or fp32")
    if config.launch.launcher not in ("deepspeed", "torchrun"):
        raise ConfigError(f"launch.launcher {config.launch.launcher!r}: choose deepspeed or torchrun")
    from train.activation_checkpointing import POLICIES

    if config.training.activation_checkpointing not in POLICIES:
        raise ConfigError(f"training.activation_checkpointing {config.training.activation_checkpointing!r}: "
                          f"choose from {', '.join(POLICIES)}")
    from longvu.kernels import check_choice

    try:
        check_choice(config.training.fused_kernels)
    except ValueError as err:
        raise ConfigError(str(err)) from err
    if config.training.keep_last < 1:
        raise ConfigError("training.keep_last must be >= 1")
    if config.data.train_manifest is None:
        raise ConfigError("data.train_manifest is required")
    from data.mixture import MixtureError, parse_spec

    try:
        parse_spec(config.data.train_manifest)
    except MixtureError as err:
        raise ConfigError(str(err)) from err


def config_to_dict(config: RunConfig) -> dict:
    return dataclasses.asdict(config)
