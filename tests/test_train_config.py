"""The pure-Python parts of training, fast: run config loading (stage defaults, file, overrides, errors),
the DeepSpeed JSON handling, parameter groups (per-module learning rates, decay rules, LoRA), the
launcher command lines, checkpoint discovery and resume resolution, the adapter check and the
preemption callback. Nothing here starts a process group."""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml
from safetensors.torch import save_file

from train.config import ConfigError, RunConfig, config_to_dict, load_run_config, parse_override

REPO = Path(__file__).resolve().parents[1]
SMALL = dict(vocab_size=4096, pad_token_id=0)  # a tiny model with a small vocabulary: fast to build


def _yaml(tmp_path: Path, values: dict, name: str = "run.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(values))
    return path


def _minimal(**extra) -> dict:
    return {"data": {"train_manifest": "m.jsonl"}, **extra}


# --- run config -------------------------------------------------------------------------------


def test_stage_defaults_fill_in(tmp_path):
    video = load_run_config(_yaml(tmp_path, _minimal(stage="video_finetune")))
    assert video.model.overrides == {"image_token_len": 144, "highres": True, "lowres_token": 8, "drop_threshold": 0.8}
    assert video.training.learning_rate == 5e-6 and video.training.lr_scheduler == "cosine"
    assert video.training.warmup_ratio == 0.03
    assert video.data.video_fps == 1.0 and video.data.per_device_batch_size == 1
    assert not video.lora.enabled

    image = load_run_config(_yaml(tmp_path, _minimal(stage="image_pretrain")))
    assert image.model.overrides == {"image_token_len": 576, "highres": False}
    assert image.training.learning_rate == 1e-5 and image.data.per_device_batch_size == 4

    lora = load_run_config(_yaml(tmp_path, _minimal(stage="lora_video")))
    assert lora.lora.enabled and lora.training.learning_rate == 2e-4
    assert lora.lora.target_modules == ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

    custom = load_run_config(_yaml(tmp_path, _minimal()))
    assert custom.stage == "custom"
    assert config_to_dict(custom) == config_to_dict(RunConfig(data=custom.data))  # dataclass defaults only


def test_file_values_win_over_stage_defaults_and_nested_keys_merge(tmp_path):
    path = _yaml(tmp_path, _minimal(
        stage="video_finetune",
        model={"overrides": {"tokenizer_model_max_length": 2048, "drop_threshold": 0.7}},
        training={"learning_rate": 1e-4},
    ))
    config = load_run_config(path)
    assert config.training.learning_rate == 1e-4
    assert config.training.lr_scheduler == "cosine"  # the stage's, untouched by the file
    # the file's overrides merge into the stage's, key by key
    assert config.model.overrides == {"image_token_len": 144, "highres": True, "lowres_token": 8,
                                      "drop_threshold": 0.7, "tokenizer_model_max_length": 2048}


def test_command_line_overrides_win_over_the_file(tmp_path):
    path = _yaml(tmp_path, _minimal(stage="video_finetune", training={"learning_rate": 1e-4, "max_steps": 5}))
    config = load_run_config(path, [
        "training.learning_rate=3e-5", "training.max_steps=10", "training.report_to=[]",
        "model.overrides.highres=false", "training.resume=null", "deepspeed=configs/deepspeed/zero3.json",
        "lora.target_modules=[q_proj, v_proj]", "training.lr.projector=2e-5",
    ])
    assert config.training.learning_rate == 3e-5 and isinstance(config.training.learning_rate, float)
    assert config.training.max_steps == 10 and isinstance(config.training.max_steps, int)
    assert config.training.report_to == []
    assert config.model.overrides["highres"] is False and config.model.overrides["image_token_len"] == 144
    assert config.training.resume is None
    assert config.deepspeed == "configs/deepspeed/zero3.json"
    assert config.lora.target_modules == ["q_proj", "v_proj"]
    assert config.training.lr.projector == 2e-5 and config.training.lr.connector is None
    # the stage itself can be chosen on the command line, and its defaults then apply
    lora = load_run_config(_yaml(tmp_path, _minimal()), ["stage=lora_video"])
    assert lora.lora.enabled and lora.training.learning_rate == 2e-4


def test_overrides_alone_without_a_file():
    config = load_run_config(None, ["data.train_manifest=x.jsonl", "stage=image_pretrain"])
    assert config.data.train_manifest == "x.jsonl" and config.model.overrides["image_token_len"] == 576


@pytest.mark.parametrize("values, overrides, names", [
    (_minimal(training={"lerning_rate": 1e-5}), [], ["lerning_rate", "training"]),
    (_minimal(trainig={"learning_rate": 1e-5}), [], ["trainig"]),
    (_minimal(), ["training.lr.vision=1e-5"], ["vision", "training.lr"]),
    (_minimal(), ["launch.nprocs=2"], ["nprocs", "launch"]),
    (_minimal(), ["data.max_tokens=8"], ["max_tokens", "data"]),
])
def test_unknown_keys_are_errors_naming_the_key(tmp_path, values, overrides, names):
    with pytest.raises(ConfigError) as err:
        load_run_config(_yaml(tmp_path, values), overrides)
    for name in names:
        assert name in str(err.value)


@pytest.mark.parametrize("values, overrides, match", [
    (_minimal(stage="video"), [], "stage 'video'"),
    ({}, [], "data.train_manifest is required"),
    (_minimal(model={"dtype": "fp8"}), [], "model.dtype"),
    (_minimal(launch={"launcher": "mpirun"}), [], "launch.launcher"),
    (_minimal(training={"keep_last": 0}), [], "keep_last"),
    (_minimal(), ["training.profile_steps=2", "training.profile_from_step=1"], "training.profile_from_step"),
    (_minimal(training=5), [], "training: expected a mapping"),
    (_minimal(), ["training.max_steps"], "expected KEY=VALUE"),
    (_minimal(), ["=3"], "empty key"),
])
def test_bad_configs_are_rejected_with_the_reason(tmp_path, values, overrides, match):
    with pytest.raises(ConfigError, match=match):
        load_run_config(_yaml(tmp_path, values), overrides)


def test_exponent_floats_in_files_are_numbers(tmp_path):
    """`learning_rate: 2e-5` (no dot) is a float, not the string PyYAML's YAML 1.1 rules make of it."""
    path = tmp_path / "run.yaml"
    path.write_text("data: {train_manifest: m.jsonl}\ntraining:\n  learning_rate: 2e-5\n  lr: {projector: 1E-6}\n")
    config = load_run_config(path)
    assert config.training.learning_rate == 2e-5 and isinstance(config.training.learning_rate, float)
    assert config.training.lr.projector == 1e-6


def test_unreadable_config_names_the_file(tmp_path):
    with pytest.raises(ConfigError, match="missing.yaml"):
        load_run_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("- a list\n- not a mapping\n")
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_run_config(bad)


def test_parse_override_parses_values_as_yaml():
    assert parse_override("a.b.c=1e-5") == (["a", "b", "c"], 1e-5)
    assert parse_override("a=2E+3") == (["a"], 2000.0) and parse_override("a=.5e-1") == (["a"], 0.05)
    assert parse_override("a=10") == (["a"], 10) and parse_override("a=1e") == (["a"], "1e")
    assert parse_override("x=true") == (["x"], True)
    assert parse_override("x=[1, 2]") == (["x"], [1, 2])
    assert parse_override("x=") == (["x"], None)
    assert parse_override("x=a=b") == (["x"], "a=b")


@pytest.mark.parametrize("name, stage, lr, queries, zero", [
    ("image_pretrain", "image_pretrain", 1e-5, 576, 3),
    ("video_finetune", "video_finetune", 5e-6, 144, 3),
    ("lora_video", "lora_video", 2e-4, 144, 2),
])
def test_shipped_stage_configs_load(name, stage, lr, queries, zero):
    from train.run import deepspeed_config

    config = load_run_config(REPO / "configs" / f"{name}.yaml")
    assert config.stage == stage and config.training.learning_rate == lr
    assert config.model.overrides["image_token_len"] == queries
    assert config.model.dtype == "bf16" and config.training.activation_checkpointing == "auto"
    ds = deepspeed_config(RunConfig(deepspeed=str(REPO / config.deepspeed)))
    assert ds["zero_optimization"]["stage"] == zero
    assert (stage == "lora_video") == config.lora.enabled


# --- DeepSpeed JSON ----------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["zero2", "zero3", "zero3_offload"])
def test_deepspeed_configs_leave_batch_and_precision_to_the_run_config(name):
    from train.run import deepspeed_config

    ds = deepspeed_config(RunConfig(deepspeed=str(REPO / "configs" / "deepspeed" / f"{name}.json")))
    for key in ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "gradient_clipping"):
        assert ds[key] == "auto", key
    assert ds["bf16"]["enabled"] == "auto" and "optimizer" not in ds and "scheduler" not in ds
    if ds["zero_optimization"]["stage"] == 3:
        assert ds["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] is True


def test_deepspeed_config_forces_weight_gathering_and_rejects_an_optimizer(tmp_path):
    from train.run import deepspeed_config

    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"zero_optimization": {"stage": 3, "stage3_gather_16bit_weights_on_model_save": False}}))
    assert deepspeed_config(RunConfig(deepspeed=str(path)))["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"]
    path.write_text(json.dumps({"zero_optimization": {"stage": 2}, "optimizer": {"type": "AdamW"}}))
    with pytest.raises(ValueError, match="optimizer"):
        deepspeed_config(RunConfig(deepspeed=str(path)))
    with pytest.raises(ValueError, match="nope.json"):
        deepspeed_config(RunConfig(deepspeed=str(tmp_path / "nope.json")))
    assert deepspeed_config(RunConfig(deepspeed=None)) is None


# --- parameter groups -----------------------------------------------------------------------------


@pytest.mark.parametrize("name, group", [
    ("model.mm_projector.0.weight", "projector"),
    ("model.mm_projector_aux_1.3.bias", "projector"),
    ("model.vision_sampler_0.layers.0.cross_attn.q_proj.weight", "connector"),
    ("model.vision_query", "connector"),
    ("model.image_newline", "connector"),
    ("model.vision_tower_aux_list.0.vision_tower.embeddings.patch_embedding.weight", "towers"),
    ("model.layers.1.self_attn.q_proj.weight", "llm"),
    ("model.embed_tokens.weight", "llm"),
    ("lm_head.weight", "llm"),
    ("base_model.model.model.mm_projector.2.weight", "projector"),
    ("base_model.model.model.layers.0.mlp.up_proj.lora_A.default.weight", "llm"),
])
def test_param_group_name(name, group):
    from train.model_setup import param_group_name

    assert param_group_name(name) == group


def _model_and_config(tmp_path, **training):
    from longvu.tiny import tiny_model
    from train.model_setup import set_trainable

    values = _minimal(training={"learning_rate": 1e-5, "weight_decay": 0.1,
                                "lr": {"projector": 2e-5, "connector": 3e-5, "towers": 4e-6}, **training})
    config = load_run_config(_yaml(tmp_path, values))
    model = tiny_model("video", **SMALL)
    set_trainable(model, config)
    return model, config


def _no_decay_expected(name: str, param) -> bool:
    return param.ndim < 2 or name.endswith(".bias") or "norm" in name.lower()


def test_param_groups_per_module_rates_and_no_decay_on_biases_and_norms(tmp_path):
    from train.model_setup import param_group_name, param_groups

    model, config = _model_and_config(tmp_path)
    groups = param_groups(model, config)
    by_name = {g.name: g for g in groups}
    assert set(by_name) == {"projector", "projector_no_decay", "connector", "connector_no_decay", "llm", "llm_no_decay"}
    expected_lr = {"projector": 2e-5, "connector": 3e-5, "llm": 1e-5}  # llm: None -> the base rate
    for g in groups:
        assert g.lr == expected_lr[g.name.removesuffix("_no_decay")]
        assert g.weight_decay == (0.0 if g.name.endswith("_no_decay") else 0.1)

    names = {id(p): n for n, p in model.named_parameters()}
    seen = [id(p) for g in groups for p in g.params]
    trainable = [id(p) for p in model.parameters() if p.requires_grad]
    assert sorted(seen) == sorted(trainable) and len(seen) == len(set(seen))  # each trainable param exactly once
    assert not any("vision_tower" in names[i] for i in seen)  # frozen towers are detached, in no group
    for g in groups:
        for p in g.params:
            name = names[id(p)]
            assert param_group_name(name) == g.name.removesuffix("_no_decay")
            assert g.name.endswith("_no_decay") == _no_decay_expected(name, p), name
    no_decay = {names[id(p)] for g in groups if g.name.endswith("_no_decay") for p in g.params}
    assert "model.norm.weight" in no_decay and "model.layers.0.input_layernorm.weight" in no_decay
    assert "model.mm_projector.0.bias" in no_decay and "model.image_newline" in no_decay
    assert any(n.startswith("model.mm_projector_aux_0.3.") for n in no_decay)  # its LayerNorm


def test_towers_train_only_when_unfrozen_with_their_own_rate(tmp_path):
    from train.model_setup import param_groups

    model, config = _model_and_config(tmp_path, unfreeze_towers=True)
    assert "vision_tower_aux_list" in dict(model.model.named_children())  # not detached
    groups = {g.name: g for g in param_groups(model, config)}
    assert groups["towers"].lr == 4e-6 and groups["towers_no_decay"].lr == 4e-6
    n_tower = sum(p.numel() for p in model.model.vision_tower_aux_list.parameters())
    assert sum(p.numel() for g in ("towers", "towers_no_decay") for p in groups[g].params) == n_tower

    frozen, _ = _model_and_config(tmp_path)
    assert "vision_tower_aux_list" not in dict(frozen.model.named_children())
    assert all(not p.requires_grad for p in frozen.model.towers.parameters())


def test_optimizer_receives_the_groups_with_their_rates(tmp_path):
    """LongVUTrainer.create_optimizer (single process, no DeepSpeed) builds one optimizer group per
    spec, with the group's learning rate and decay; the scheduler starts from those rates."""
    from data.bad_samples import BadSampleTracker
    from transformers import TrainingArguments
    from train.trainer import LongVUTrainer

    model, config = _model_and_config(tmp_path)
    args = TrainingArguments(output_dir=str(tmp_path / "out"), use_cpu=True, report_to=[], learning_rate=1e-5,
                             weight_decay=0.1, max_steps=10, warmup_steps=0, lr_scheduler_type="constant")
    trainer = LongVUTrainer(model=model, args=args, run_config=config, batch_sampler=None,
                            bad_tracker=BadSampleTracker())
    trainer.create_optimizer_and_scheduler(num_training_steps=10)
    rates = {g["name"]: (g["lr"], g["weight_decay"]) for g in trainer.optimizer.param_groups}
    assert rates == {"connector": (3e-5, 0.1), "connector_no_decay": (3e-5, 0.0), "llm": (1e-5, 0.1),
                     "llm_no_decay": (1e-5, 0.0), "projector": (2e-5, 0.1), "projector_no_decay": (2e-5, 0.0)}
    assert sorted(trainer.lr_scheduler.get_last_lr()) == sorted(r for r, _ in rates.values())
    trainer.log({"loss": 1.0, "learning_rate": trainer._get_learning_rate()})
    logged = trainer.state.log_history[-1]
    assert "learning_rate" not in logged  # HF's value is the first group's only
    assert {k: v for k, v in logged.items() if k.startswith("lr/")} == {
        "lr/connector": 3e-5, "lr/llm": 1e-5, "lr/projector": 2e-5}


def test_logged_learning_rates_name_the_lora_group(tmp_path):
    """LoRA: the adapters' rate is logged as lr/lora, beside the connector's and projector's own."""
    from data.bad_samples import BadSampleTracker
    from longvu.tiny import tiny_model
    from transformers import TrainingArguments
    from train.model_setup import apply_lora, set_trainable
    from train.trainer import LongVUTrainer

    config = load_run_config(_yaml(tmp_path, _minimal(lora={"enabled": True, "r": 4, "alpha": 8}, training={
        "learning_rate": 2e-4, "lr": {"projector": 2e-5, "connector": 3e-5}})))
    model = tiny_model("video", **SMALL)
    set_trainable(model, config)
    model = apply_lora(model, config)
    args = TrainingArguments(output_dir=str(tmp_path / "out"), use_cpu=True, report_to=[], learning_rate=2e-4,
                             max_steps=10, warmup_steps=0, lr_scheduler_type="constant")
    trainer = LongVUTrainer(model=model, args=args, run_config=config, batch_sampler=None,
                            bad_tracker=BadSampleTracker())
    trainer.create_optimizer_and_scheduler(num_training_steps=10)
    trainer.log({"loss": 1.0, "learning_rate": trainer._get_learning_rate()})
    logged = trainer.state.log_history[-1]
    assert {k: v for k, v in logged.items() if k.startswith("lr/")} == {
        "lr/connector": 3e-5, "lr/lora": 2e-4, "lr/projector": 2e-5}


def test_lora_trains_adapters_on_llm_linears_plus_the_connector(tmp_path):
    from longvu.tiny import tiny_model
    from train.model_setup import apply_lora, count_parameters, param_groups, set_trainable

    config = load_run_config(_yaml(tmp_path, _minimal(lora={"enabled": True, "r": 4, "alpha": 8},
                                                      training={"lr": {"projector": 2e-5}})))

    model = tiny_model("video", **SMALL)
    set_trainable(model, config)
    peft_model = apply_lora(model, config)
    trainable = [n for n, p in peft_model.named_parameters() if p.requires_grad]
    lora = [n for n in trainable if "lora_" in n]
    assert len(lora) == 2 * 2 * 7  # 2 layers x 7 linear layers x (A, B)
    assert all(".layers." in n and "vision_sampler" not in n for n in lora)
    others = [n for n in trainable if "lora_" not in n]
    assert others and all(("mm_projector" in n) or ("vision_sampler" in n) or ("vision_query" in n)
                          or ("image_newline" in n) for n in others)
    assert not any(p.requires_grad for n, p in peft_model.named_parameters() if "base_layer" in n)
    counts = count_parameters(peft_model)
    assert counts["lora"] > 0 and counts["total_trainable"] == sum(
        p.numel() for p in peft_model.parameters() if p.requires_grad)
    groups = {g.name: g for g in param_groups(peft_model, config)}
    assert groups["projector"].lr == 2e-5 and groups["lora"].lr == config.training.learning_rate
    assert "llm" not in groups  # the base LLM is frozen: its only trainable tensors are the adapters
    assert sum(len(g.params) for g in groups.values()) == len(trainable)


# --- launcher ---------------------------------------------------------------------------------------


def _launch_config(tmp_path, **launch):
    return load_run_config(_yaml(tmp_path, _minimal(launch=launch)))


@pytest.fixture
def no_gpus(monkeypatch):
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)


def _after(cmd: list[str], flag: str) -> str:
    return cmd[cmd.index(flag) + 1]


def test_deepspeed_command_single_node(tmp_path, no_gpus):
    from train.launch import default_nproc, launcher_command

    assert default_nproc() == 2  # no GPUs: two CPU processes
    cmd = launcher_command(_launch_config(tmp_path), ["run.yaml", "training.max_steps=3"])
    assert Path(cmd[0]).name == "deepspeed"
    assert _after(cmd, "--num_gpus") == "2" and "--hostfile" not in cmd
    assert cmd[-5:] == ["--module", "train", "train", "run.yaml", "training.max_steps=3"]

    cmd = launcher_command(_launch_config(tmp_path, nproc=4, master_port=29123), ["run.yaml"])
    assert _after(cmd, "--num_gpus") == "4" and _after(cmd, "--master_port") == "29123"


def test_deepspeed_command_with_hostfile(tmp_path, no_gpus):
    from train.launch import launcher_command

    cfg = _launch_config(tmp_path, hostfile="/etc/hosts.txt", master_addr="10.0.0.1", master_port=29500)
    cmd = launcher_command(cfg, ["run.yaml"])
    assert _after(cmd, "--hostfile") == "/etc/hosts.txt" and _after(cmd, "--master_addr") == "10.0.0.1"
    assert _after(cmd, "--master_port") == "29500"
    assert "--num_gpus" not in cmd  # the hostfile lists the slots
    assert cmd[-4:] == ["--module", "train", "train", "run.yaml"]


def test_torchrun_commands(tmp_path, no_gpus, monkeypatch):
    from train.launch import launcher_command

    cmd = launcher_command(_launch_config(tmp_path, launcher="torchrun", nproc=3, master_port=29600), ["run.yaml", "a=1"])
    assert cmd[:4] == [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=3"]
    assert "--master-port=29600" in cmd
    assert cmd[-5:] == ["-m", "train", "train", "run.yaml", "a=1"]
    assert not any(a.startswith("--rdzv") for a in cmd)

    monkeypatch.setenv("NNODES", "4")
    cmd = launcher_command(_launch_config(tmp_path, launcher="torchrun", master_addr="node0", master_port=29400), ["r.yaml"])
    assert "--rdzv-backend=c10d" in cmd and "--rdzv-endpoint=node0:29400" in cmd and "--nnodes=4" in cmd
    assert "--nproc-per-node=2" in cmd
    assert not any(a.startswith("--master-port") for a in cmd)


def test_train_command_starts_the_launcher_with_the_cli_flags(tmp_path, monkeypatch, capsys):
    from train import cli, launch

    for var in ("RANK", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    calls, envs = [], []

    class FakeLauncher:
        def __init__(self, cmd, env, pass_fds=()):
            calls.append(cmd)
            envs.append(env)
            self.pid = -1

        def wait(self, timeout=None):
            return 7

    monkeypatch.setattr(launch.subprocess, "Popen", FakeLauncher)
    before = signal.getsignal(signal.SIGTERM)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "m.jsonl").write_text("{}\n")  # the pre-launch check needs the manifest to exist
    cfg = str(_yaml(tmp_path, _minimal(training={"output_dir": str(tmp_path / "out")})))
    parser = cli.build_parser(["train.launch"])
    args = parser.parse_args(["train", cfg, "training.max_steps=3", "--nproc", "3", "--launcher", "torchrun"])
    assert args.func(args) == 7  # the launcher's exit code is the command's
    (cmd,) = calls
    assert "--nproc-per-node=3" in cmd and cmd[cmd.index("train") + 1 :][:2] == ["train", cfg]
    # every rank re-reads the same config with the same overrides (the CLI flags become overrides)
    assert cmd[-4:] == [cfg, "training.max_steps=3", "launch.nproc=3", "launch.launcher=torchrun"]
    assert envs[0]["PYTHONSAFEPATH"] == "1"  # ranks never import from the working directory
    assert "launching:" in capsys.readouterr().out
    assert signal.getsignal(signal.SIGTERM) is before  # the forwarding handler lives only while it waits

    args = parser.parse_args(["train", cfg, "training.bogus=1"])
    assert args.func(args) == 2 and len(calls) == 1
    assert "bogus" in capsys.readouterr().err


def test_cpu_ranks_share_the_cores_and_build_into_the_environment(monkeypatch):
    from train import cpu_ops

    monkeypatch.setattr(cpu_ops, "usable_cores", lambda: 8)
    env = cpu_ops.rank_environment({"PATH": "/bin"}, gpus=False, nproc=2)
    assert env["OMP_NUM_THREADS"] == "4" and env["DS_ACCELERATOR"] == "cpu"
    assert env["TORCH_EXTENSIONS_DIR"] == os.path.join(sys.prefix, "torch_extensions")  # once per environment
    assert cpu_ops.rank_environment({}, gpus=False, nproc=16)["OMP_NUM_THREADS"] == "1"
    kept = cpu_ops.rank_environment({"OMP_NUM_THREADS": "3", "TORCH_EXTENSIONS_DIR": "/x"}, gpus=False, nproc=2)
    assert kept["OMP_NUM_THREADS"] == "3" and kept["TORCH_EXTENSIONS_DIR"] == "/x"  # the user's choice wins
    on_gpus = cpu_ops.rank_environment({}, gpus=True, nproc=2)
    assert "OMP_NUM_THREADS" not in on_gpus and "DS_ACCELERATOR" not in on_gpus


def test_cpu_ranks_do_not_build_deepspeeds_shm_op(monkeypatch):
    """DeepSpeed's CPU backend asks for its shm all-reduce op (a C++ JIT build); after
    skip_shm_comm_build it gets none and uses gloo."""
    import importlib

    import deepspeed.ops
    from deepspeed.accelerator import get_accelerator

    from train.cpu_ops import SHM_COMM_OP, skip_shm_comm_build

    if get_accelerator().device_name() != "cpu":
        pytest.skip("DeepSpeed's accelerator here is not the CPU")
    monkeypatch.setitem(deepspeed.ops.__compatible_ops__, SHM_COMM_OP, True)  # restored afterwards
    skip_shm_comm_build()
    assert importlib.import_module("deepspeed.comm.torch").build_shm_op() is None


def test_under_launcher(monkeypatch):
    from train.launch import under_launcher

    for var in ("RANK", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    assert not under_launcher()
    monkeypatch.setenv("LOCAL_RANK", "0")
    assert under_launcher()


# --- checkpoints, resume, adapters, preemption -------------------------------------------------------


def test_complete_checkpoints_are_ordered_by_step(tmp_path):
    from train.checkpoints import complete_checkpoints

    for name in ("checkpoint-10", "checkpoint-9", "checkpoint-100", "checkpoint-2", "checkpoint-x",
                 "checkpoint-3-old", ".staging/checkpoint-500", "other"):
        (tmp_path / name).mkdir(parents=True)
    (tmp_path / "checkpoint-7").write_text("a file, not a checkpoint")
    assert [p.name for p in complete_checkpoints(tmp_path)] == ["checkpoint-2", "checkpoint-9", "checkpoint-10",
                                                                "checkpoint-100"]
    assert complete_checkpoints(tmp_path / "absent") == []


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o027, 0o640)])
def test_published_checkpoint_files_get_the_usual_mode(tmp_path, umask, mode):
    """safetensors writes 0600 whatever the umask; a published checkpoint's files follow the umask
    (executables keep their x bits)."""
    from train.checkpoints import publish_checkpoint

    previous = os.umask(umask)
    try:
        staged = tmp_path / ".staging" / "checkpoint-4"
        staged.mkdir(parents=True)
        save_file({"w": torch.zeros(2)}, str(staged / "model.safetensors"))
        (staged / "zero_to_fp32.py").write_text("")
        (staged / "zero_to_fp32.py").chmod(0o700)
        final = publish_checkpoint(staged, tmp_path, keep_last=1)
    finally:
        os.umask(previous)
    assert (final / "model.safetensors").stat().st_mode & 0o777 == mode
    assert (final / "zero_to_fp32.py").stat().st_mode & 0o777 == 0o777 & ~umask


def test_the_umask_is_read_without_being_changed(monkeypatch):
    """Setting the umask to read it would, for a moment, give another thread's new files mode 0666."""
    from train.checkpoints import process_umask

    previous = os.umask(0o027)
    try:
        monkeypatch.setattr(os, "umask", lambda mask: pytest.fail(f"umask set to {mask:o}"))
        assert process_umask() == 0o027
    finally:
        monkeypatch.undo()
        os.umask(previous)


def test_resolve_resume(tmp_path):
    from train.checkpoints import resolve_resume as resolve

    def resolve_resume(config):
        return resolve(config.training.resume, config.training.output_dir)

    def config(resume):
        return load_run_config(_yaml(tmp_path, _minimal(training={"output_dir": str(tmp_path / "out"), "resume": resume})))

    assert resolve_resume(config("auto")) is None  # nothing saved yet: start fresh
    assert resolve_resume(config(None)) is None and resolve_resume(config("none")) is None
    for step in (5, 40, 300):
        (tmp_path / "out" / f"checkpoint-{step}").mkdir(parents=True)
    (tmp_path / "out" / ".staging" / "checkpoint-400").mkdir(parents=True)  # interrupted save: ignored
    assert resolve_resume(config("auto")) == str(tmp_path / "out" / "checkpoint-300")
    with pytest.raises(ValueError, match="trainer_state.json"):
        resolve_resume(config(str(tmp_path / "out" / "checkpoint-40")))
    (tmp_path / "out" / "checkpoint-40" / "trainer_state.json").write_text("{}")
    assert resolve_resume(config(str(tmp_path / "out" / "checkpoint-40"))) == str(tmp_path / "out" / "checkpoint-40")


def _adapter_dir(tmp_path, adapter: dict, connector: dict) -> Path:
    from train.checkpoints import CONNECTOR_FILE

    tmp_path.mkdir(parents=True, exist_ok=True)
    save_file(adapter, str(tmp_path / "adapter_model.safetensors"))
    save_file(connector, str(tmp_path / CONNECTOR_FILE))
    return tmp_path


def test_verify_adapter(tmp_path):
    from train.checkpoints import verify_adapter

    a = {"base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": torch.randn(4, 64),
         "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight": torch.randn(64, 4)}
    c = {"model.mm_projector.0.weight": torch.randn(64, 32)}
    verify_adapter(_adapter_dir(tmp_path / "good", a, c))

    empty = {**a, "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight": torch.empty(0)}
    with pytest.raises(RuntimeError, match="empty tensors.*lora_B"):
        verify_adapter(_adapter_dir(tmp_path / "empty_adapter", empty, c))
    with pytest.raises(RuntimeError, match="non_lora_trainables.*empty tensors"):
        verify_adapter(_adapter_dir(tmp_path / "empty_connector", a, {"model.mm_projector.0.weight": torch.empty(0)}))
    (tmp_path / "none").mkdir()
    with pytest.raises(RuntimeError, match="no adapter_model.safetensors"):
        verify_adapter(tmp_path / "none")


def test_preemption_callback_stops_and_saves_after_sigterm():
    import os
    import signal

    from transformers import TrainerControl, TrainerState

    from train.signals import SigtermGuard
    from train.trainer import PreemptionCallback

    callback = PreemptionCallback(SigtermGuard())
    args, state = SimpleNamespace(device=torch.device("cpu")), TrainerState(global_step=3)
    control = callback.on_step_end(args, state, TrainerControl())
    assert not control.should_save and not control.should_training_stop and not callback.triggered
    previous = signal.getsignal(signal.SIGTERM)
    try:
        callback.guard.install()
        callback.on_train_begin(args, state, TrainerControl())
        os.kill(os.getpid(), signal.SIGTERM)  # handled: sets the flag, the process carries on
        assert callback.requested
    finally:
        signal.signal(signal.SIGTERM, previous)
    control = callback.on_step_end(args, state, TrainerControl())
    assert control.should_save and control.should_training_stop and callback.triggered


def test_train_subcommand_arguments():
    from train.launch import add_parser

    parser = argparse.ArgumentParser()
    add_parser(parser.add_subparsers())
    args = parser.parse_args(["train", "c.yaml", "x=1", "--hostfile", "h"])
    assert args.config == "c.yaml" and args.overrides == ["x=1"] and args.hostfile == "h"


_SIGNAL_LOGGER = """
import os, signal, subprocess, sys, time
role, log = sys.argv[1], sys.argv[2]
def on_term(signum, frame):
    with open(log, "a") as f:
        f.write(role + "\\n")
    sys.exit(0)
signal.signal(signal.SIGTERM, on_term)
child = None
if role == "launcher":
    child = subprocess.Popen([sys.executable, __file__, "rank", log], env={**os.environ, "LOCAL_RANK": "0"})
elif role == "rank":
    child = subprocess.Popen([sys.executable, __file__, "worker", log])  # inherits LOCAL_RANK
with open(log + "." + role, "w"):
    pass
if role == "launcher":
    sys.exit(child.wait())
if role == "rank":
    try:
        time.sleep(60)
    finally:
        child.kill()
time.sleep(60)
"""


def test_preempt_ranks_signals_only_the_outermost_rank_processes(tmp_path, monkeypatch):
    """`longvu train` forwards SIGTERM to the ranks (LOCAL_RANK set), not to the launcher in between
    nor to the ranks' own children (DataLoader workers)."""
    import subprocess
    import time

    from train.launch import preempt_ranks

    monkeypatch.delenv("LOCAL_RANK", raising=False)
    script, log = tmp_path / "proc.py", tmp_path / "signals.log"
    script.write_text(_SIGNAL_LOGGER)
    launcher = subprocess.Popen([sys.executable, str(script), "launcher", str(log)])
    try:
        deadline = time.time() + 30
        while not all(Path(f"{log}.{r}").exists() for r in ("launcher", "rank", "worker")):
            assert time.time() < deadline, "process tree did not start"
            time.sleep(0.05)
        preempt_ranks(launcher.pid)
        assert launcher.wait(timeout=30) == 0  # the rank exited 0 on SIGTERM, the launcher passed it on
    finally:
        launcher.kill()
    assert log.read_text().split() == ["rank"]


def test_misspelled_model_override_is_a_config_error(tmp_path):
    values = _minimal(model={"overrides": {"drop_treshold": 0.7}})
    with pytest.raises(ConfigError, match=r"model.overrides: 'drop_treshold' is not a LongVU model field; "
                                          r"did you mean drop_threshold"):
        load_run_config(_yaml(tmp_path, values))


def test_config_init_applies_the_stage_overrides_to_the_query_grid(tmp_path):
    """`model.init: config:PATH` (random weights, benchmarks) with the image stage's overrides
    (image_token_len 576, highres off) over a 144-query config gets the 576-query grid: the SVA then
    gives one query per tower cell and a square image 24 x 24 tokens plus a newline per row, as
    `longvu:` and `qwen2:` inits do; the same config without overrides keeps 144."""
    from longvu.tiny import tiny_model
    from train.model_setup import load_model

    tiny_model("video").config.save_pretrained(tmp_path / "cfg")
    manifest = tmp_path / "m.jsonl"
    manifest.write_text("")
    image = load_model(load_run_config(None, ["stage=image_pretrain", f"model.init=config:{tmp_path / 'cfg'}",
                                              f"data.train_manifest={manifest}"]))
    assert (image.config.image_token_len, image.config.query_num_list, image.config.highres) == (576, [576], False)
    assert (image.config.query_side, image.config.cell_side) == (24, 1)
    video = load_model(load_run_config(None, [f"model.init=config:{tmp_path / 'cfg'}", f"data.train_manifest={manifest}"]))
    assert (video.config.query_num_list, video.config.query_side) == ([144], 12)
