"""Run configuration: one YAML file (model, data, training, LoRA, DeepSpeed, launcher), plus
`key=value` command-line overrides with dotted keys (`training.learning_rate=2e-5`), which win.

A `stage` fills in that stage's defaults before the file's own values are applied.
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from train.optimizers import OPTIMIZERS


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
    attn_implementation: str = "auto"  # auto (flash_attention_2 when installed on a GPU, else sdpa) | sdpa | sdpa_varlen | ...
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
class EvalSection:
    """Evaluation during training: eval loss on a held-out manifest every `eval_steps`, plus the MCQ
    accuracy of its records with `options` and an `answer` letter (train.evaluation.train_eval).
    `best_metric` ("loss" or "mcq_accuracy"): the checkpoint best by it is kept beyond `keep_last`."""

    manifest: str | None = None
    eval_steps: int = 500
    mcq: bool = True
    best_metric: str | None = None


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
    optimizer: str = "adamw"  # adamw | adamw_8bit: torchao's 8-bit moments, ~6 bytes a trained parameter less (train/optimizers.py)
    # auto | full | selective | none (train/activation_checkpointing.py); auto: least recomputation that fits
    activation_checkpointing: str = "auto"
    checkpointed_layers: int | None = None  # `selective`: how many decoder layers are recomputed (1..layers-1)
    activation_memory_gib: float | None = None  # `auto`/`selective`: cap on the estimated peak, if below the GPU's
    gpu_memory_gib: float | None = None  # cap this process's CUDA memory: runs as on a card this size (train/gpu_memory.py)
    # what decoder layers that keep their activations hold for the backward pass (longvu/kept_activations.py)
    recompute_mlp_product: bool = True  # the MLP product rebuilt from gate and up
    recompute_norm_outputs: bool = True  # the RMSNorm outputs rebuilt from their inputs (with Liger's kernels)
    fp8_mlp_activations: bool = False  # gate and up held in FP8 (e4m3, a scale per 128 values): lossy
    fused_kernels: str = "auto"  # auto | liger | none (longvu/kernels.py); auto: liger when installed, on a GPU
    # on a CUDA GPU, LoRA dropout and the FP8 (de)quantizations as one Triton kernel each (longvu/triton_kernels.py)
    triton_kernels: bool = True
    unfreeze_towers: bool = False
    compile_towers: bool = False  # the frozen towers under torch.compile (one static graph each; ~1 min to compile)
    fp8_towers: bool = False  # the frozen towers' linear layers in FP8, compiled (longvu.fp8; compute capability 8.9+)
    save_steps: int = 500
    save_at_end: bool = True
    keep_last: int = 3
    resume: str | None = "auto"  # auto | PATH | None (train/lineage.py)
    overwrite_output_dir: bool = False  # a fresh run into a folder holding checkpoints moves them aside
    logging_steps: int = 1
    profile_steps: int = 0  # > 0: torch.profiler records this many steps of each rank (train/profiling.py)
    profile_from_step: int = 5  # the first recorded step of this process (>= 2: the step before warms up)
    report_to: list[str] = field(default_factory=lambda: ["tensorboard"])
    run_name: str | None = None
    seed: int = 42
    eval: EvalSection = field(default_factory=EvalSection)


@dataclass
class LoraSection:
    enabled: bool = False
    r: int = 64
    alpha: int = 128
    dropout: float = 0.05
    target_modules: list[str] = field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    )
    # none | 4bit: QLoRA, the frozen LLM decoder weights held in NF4 (torchao) | fp8: held in e4m3, their
    # matmuls in FP8 (longvu.fp8; a GPU of compute capability 8.9+)
    quantize: str = "none"
    # each adapted layer's base matmul, dropout, adapter and their sum as one autograd op in training's
    # common case (longvu/fused_lora.py); false: peft's own forward
    fused: bool = True


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

# transformers' SchedulerType values (listed here so that checking a config imports no transformers)
LR_SCHEDULERS = ("linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup",
                 "inverse_sqrt", "reduce_lr_on_plateau", "cosine_with_min_lr", "cosine_warmup_with_min_lr",
                 "warmup_stable_decay", "greedy")


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
    """A run config that cannot be used: `problems` holds one line per problem, each naming the key (or
    file), the value and what was expected; the message is those lines."""

    def __init__(self, problems: str | list[str]):
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        super().__init__("\n".join(self.problems))


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


def load_run_config(path: str | Path | None, overrides: list[str] = (), check=None) -> RunConfig:
    """YAML file (may be None) + overrides -> RunConfig, with the stage's defaults underneath, validated
    (`check(config) -> list[str]`: further problems, e.g. train.preflight's missing paths)."""
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
    validate(config, check)
    return config


def validate(config: RunConfig, check=None) -> None:
    """Raise ConfigError listing every problem of `config`: types first, then ranges, choices and
    `check(config)`'s problems; the model-side choices last (`_model_problems` imports torch)."""
    problems = type_problems(config)
    if not problems:
        problems = value_problems(config) + (check(config) if check else [])
    if not problems:
        problems = _model_problems(config)
    if problems:
        raise ConfigError(problems)


def _type_name(hint) -> str:
    if hint is type(None):
        return "null"
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        return " or ".join(_type_name(h) for h in typing.get_args(hint))
    origin = typing.get_origin(hint) or hint
    return {int: "an integer", float: "a number", bool: "true/false", str: "a string", list: "a list",
            dict: "a mapping"}.get(origin, getattr(origin, "__name__", str(origin)))


def _matches(value, hint) -> bool:
    if hint is Any:
        return True
    if hint is type(None):
        return value is None
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        return any(_matches(value, h) for h in typing.get_args(hint))
    origin = typing.get_origin(hint) or hint
    if origin is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if origin is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if not isinstance(value, origin):
        return False
    args = typing.get_args(hint)
    if origin is list and args:
        return all(_matches(v, args[0]) for v in value)
    return True


def type_problems(section, where: str = "") -> list[str]:
    """One line per field whose value does not have the declared type (recursing into sections)."""
    problems, hints = [], typing.get_type_hints(type(section))
    for f in dataclasses.fields(section):
        value, key, hint = getattr(section, f.name), f"{where}{f.name}", hints[f.name]
        if dataclasses.is_dataclass(value):
            problems += type_problems(value, key + ".")
        elif not _matches(value, hint):
            problems.append(f"{key}={value!r}: expected {_type_name(hint)}")
    return problems


def _at_least(lo, exclusive=False):
    def check(v):
        return v > lo if exclusive else v >= lo
    return check, (f"a value > {lo}" if exclusive else f"a value >= {lo}")


def _fraction(upper_inclusive=True):
    if upper_inclusive:
        return (lambda v: 0 <= v <= 1), "a value in [0, 1]"
    return (lambda v: 0 <= v < 1), "a value in [0, 1)"


def _one_of(*choices):
    return (lambda v: v in choices), "one of " + ", ".join(map(str, choices))


# key -> (check, what is expected); None values pass (they mean "the default")
_RANGES: dict[str, tuple] = {
    "model.dtype": _one_of("bf16", "fp16", "fp32"),
    "data.video_fps": _at_least(0, exclusive=True),
    "data.max_frames": _at_least(1),
    "data.decode_backend": _one_of("decord", "pyav"),
    "data.decode_max_side": _at_least(1),
    "data.decode_timeout_s": _at_least(0, exclusive=True),
    "data.per_device_batch_size": _at_least(1),
    "data.max_tokens_per_batch": _at_least(1),
    "data.num_workers": _at_least(0),
    "data.prefetch_factor": _at_least(1),
    "data.max_bad_fraction": _fraction(),
    "data.bad_min_samples": _at_least(0),
    "training.learning_rate": _at_least(0, exclusive=True),
    "training.lr.projector": _at_least(0, exclusive=True),
    "training.lr.connector": _at_least(0, exclusive=True),
    "training.lr.llm": _at_least(0, exclusive=True),
    "training.lr.towers": _at_least(0, exclusive=True),
    "training.weight_decay": _at_least(0),
    "training.lr_scheduler": _one_of(*LR_SCHEDULERS),
    "training.warmup_ratio": _fraction(upper_inclusive=False),
    "training.num_train_epochs": _at_least(0, exclusive=True),
    "training.max_steps": ((lambda v: v == -1 or v >= 1), "-1 (train num_train_epochs) or a value >= 1"),
    "training.gradient_accumulation_steps": _at_least(1),
    "training.max_grad_norm": _at_least(0),
    "training.optimizer": _one_of(*OPTIMIZERS),
    "training.save_steps": _at_least(1),
    "training.keep_last": _at_least(1),
    "training.logging_steps": _at_least(1),
    "training.profile_steps": _at_least(0),
    "training.profile_from_step": _at_least(2),
    "training.eval.eval_steps": _at_least(1),
    "training.checkpointed_layers": _at_least(1),
    "training.activation_memory_gib": _at_least(0, exclusive=True),
    "training.gpu_memory_gib": _at_least(0, exclusive=True),
    "training.eval.best_metric": _one_of("loss", "mcq_accuracy"),
    "lora.r": _at_least(1),
    "lora.alpha": _at_least(0, exclusive=True),
    "lora.dropout": _fraction(upper_inclusive=False),
    "lora.quantize": _one_of("none", "4bit", "fp8"),
    "launch.launcher": _one_of("deepspeed", "torchrun"),
    "launch.nproc": ((lambda v: v >= 1), "a process count >= 1 (--nproc N)"),
    "launch.master_port": ((lambda v: 1 <= v <= 65535), "a TCP port in 1..65535"),
}


def _get(config: RunConfig, key: str):
    value = config
    for part in key.split("."):
        value = getattr(value, part)
    return value


def value_problems(config: RunConfig) -> list[str]:
    """One line per value out of its range or choices (`_RANGES`), plus the required and structural ones."""
    problems = [f"{key}={value!r}: expected {expected}" for key, (check, expected) in _RANGES.items()
                if (value := _get(config, key)) is not None and not check(value)]
    if config.data.train_manifest is None:
        problems.append("data.train_manifest is required (a manifest, a data YAML or a list of them)")
    else:
        from data.mixture import MixtureError, parse_spec  # numpy and yaml only

        try:
            parse_spec(config.data.train_manifest)
        except MixtureError as err:
            problems.append(str(err))
    problems += _best_metric_problems(config.training)
    if config.lora.enabled and not config.lora.target_modules:
        problems.append("lora.target_modules=[]: expected at least one module name (e.g. q_proj)")
    return problems


def _best_metric_problems(t: TrainingSection) -> list[str]:
    """`training.eval.best_metric` needs an eval manifest, for mcq_accuracy the MCQ scoring, and a
    checkpoint at every evaluation (the best one is kept by the eval step that found it)."""
    e = t.eval
    if not e.best_metric:
        return []
    if not e.manifest:
        return [f"training.eval.best_metric={e.best_metric!r}: needs training.eval.manifest"]
    problems = []
    if e.best_metric == "mcq_accuracy" and not e.mcq:
        problems.append("training.eval.best_metric='mcq_accuracy': needs training.eval.mcq=true (with mcq off "
                        "no eval_mcq_accuracy is computed); set mcq=true or best_metric=loss")
    if e.eval_steps >= 1 and t.save_steps >= 1 and e.eval_steps % t.save_steps:  # (ranges checked above)
        problems.append(f"training.eval.best_metric={e.best_metric!r}: every evaluation must also save a checkpoint, "
                        f"but training.eval.eval_steps={e.eval_steps} is not a multiple of training.save_steps="
                        f"{t.save_steps}; set training.save_steps to a divisor of {e.eval_steps} or "
                        f"training.eval.eval_steps to a multiple of {t.save_steps}")
    return problems


def _model_problems(config: RunConfig) -> list[str]:
    """`model.overrides` names, the activation-checkpointing policy and the fused kernels (these checks
    import torch and transformers, so they come last)."""
    from longvu.config import ConfigOverrideError, check_override_names

    try:
        check_override_names(config.model.overrides, "model.overrides")
    except ConfigOverrideError as err:
        problems = [str(err)]
    else:
        problems = []
    from train.activation_checkpointing import POLICIES  # imports torch, as the two checks below do

    if config.training.activation_checkpointing not in POLICIES:
        problems.append(f"training.activation_checkpointing={config.training.activation_checkpointing!r}: "
                        f"expected one of {', '.join(POLICIES)}")
    from longvu.kernels import check_choice

    try:
        check_choice(config.training.fused_kernels)
    except ValueError as err:
        problems.append(str(err))
    return problems


def config_to_dict(config: RunConfig) -> dict:
    return dataclasses.asdict(config)
