"""training.optimizer: torchao's 8-bit AdamW as the trainer builds it, the check that its moments really
are 8-bit, and its states through a weights-only checkpoint load (train/optimizers.py)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("torchao")

from train import optimizers  # noqa: E402
from train.config import RunConfig  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def _params(*shapes, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(*s, generator=g)) for s in shapes]


def _step(opt, params) -> None:
    sum((p * p).sum() for p in params).backward()
    opt.step()
    opt.zero_grad()


def test_8bit_moments_for_large_tensors_and_the_check_passes(caplog):
    from torchao.optim import AdamW8bit

    big, bias = _params((64, 256), (100,))
    opt = optimizers.build("adamw_8bit", [{"params": [big], "lr": 1e-3}, {"params": [bias], "lr": 1e-4}], (0.9, 0.99), 1e-8)
    assert isinstance(opt, AdamW8bit) and [float(g["lr"]) for g in opt.param_groups] == pytest.approx([1e-3, 1e-4])
    assert optimizers.build("adamw", [{"params": [big]}], (0.9, 0.99), 1e-8) is None  # the Trainer's own AdamW
    _step(opt, [big, bias])
    assert optimizers.low_bit_counts(opt) == (64 * 256, 100)  # torchao keeps tensors under 4,096 values in fp32
    with caplog.at_level("INFO", logger="train.optimizers"):
        optimizers.check_low_bit_states(opt)  # 100 of 16,484 values in fp32: under 1 %
    assert "moments of 16384 of 16484 trained values in 8 bits" in caplog.text


def test_the_check_stops_a_run_whose_partitions_do_not_divide_by_256():
    """A flat partition of 4,100 values (as ZeRO makes of a group) gets fp32 moments from torchao."""
    (flat,) = _params((4100,))
    opt = optimizers.build("adamw_8bit", [{"params": [flat], "lr": 1e-3}], (0.9, 0.99), 1e-8)
    _step(opt, [flat])
    with pytest.raises(RuntimeError, match=r"4100 of 4100 trained values stayed in fp32.*\(4100,\).*divisible by 256"):
        optimizers.check_low_bit_states(opt)


def test_state_bytes_per_param_and_the_memory_model_of_a_run():
    from longvu.tiny import tiny_model
    from train.activation_checkpointing import memory_model
    from train.model_setup import set_trainable

    assert optimizers.state_bytes_per_param("adamw") == 12
    assert optimizers.state_bytes_per_param("adamw_8bit") == pytest.approx(6.03125)
    config = RunConfig()
    model = tiny_model("video")
    set_trainable(model, config)
    plain = memory_model(model, config, None, world_size=1).footprint()
    config.training.optimizer = "adamw_8bit"
    low = memory_model(model, config, None, world_size=1).footprint()
    trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert plain.fixed - low.fixed == pytest.approx((12 - 6.03125) * trained, abs=2)


def test_saved_8bit_states_load_weights_only_in_a_fresh_process_and_continue_the_same(tmp_path):
    """The Trainer/DeepSpeed save the optimizer's state_dict; a resume loads it through train.safe_load
    before anything imports torchao. Loaded back, the next step equals the uninterrupted one's."""
    params = _params((32, 256))
    opt = optimizers.build("adamw_8bit", [{"params": params, "lr": 1e-2}], (0.9, 0.99), 1e-8)
    _step(opt, params)
    torch.save(opt.state_dict(), tmp_path / "optimizer.pt")
    torch.save({"w": params[0].detach().clone()}, tmp_path / "weights.pt")
    _step(opt, params)
    torch.save({"w": params[0].detach().clone()}, tmp_path / "expected.pt")
    script = f"""
import sys, torch
from train.safe_load import safe_torch_load
assert "torchao" not in sys.modules
state = safe_torch_load({str(tmp_path / "optimizer.pt")!r})
from train import optimizers
w = torch.nn.Parameter(torch.load({str(tmp_path / "weights.pt")!r}, weights_only=True)["w"])
opt = optimizers.build("adamw_8bit", [{{"params": [w], "lr": 1e-2}}], (0.9, 0.99), 1e-8)
opt.load_state_dict(state)
(w * w).sum().backward(); opt.step()
assert type(opt.state[w]["exp_avg"]).__name__ == "OptimState8bit"
torch.save({{"w": w.detach()}}, {str(tmp_path / "resumed.pt")!r})
"""
    done = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    expected = torch.load(tmp_path / "expected.pt", weights_only=True)["w"]
    resumed = torch.load(tmp_path / "resumed.pt", weights_only=True)["w"]
    assert torch.equal(expected, resumed)
    assert not torch.equal(expected, torch.load(tmp_path / "weights.pt", weights_only=True)["w"])


def test_the_trainer_builds_the_8bit_optimizer_with_each_group_rate_and_resyncs_tensor_rates():
    """create_optimizer gives torchao's AdamW8bit the trainer's parameter groups (their own rates, as
    0-d tensors); the resume's rate resync fills those tensors instead of replacing them (torchao's
    compiled step refuses a float rate)."""
    from types import SimpleNamespace

    from torchao.optim import AdamW8bit

    from longvu.tiny import tiny_model
    from train.model_setup import param_groups, set_trainable
    from train.trainer import LongVUTrainer

    config = RunConfig()
    config.training.optimizer = "adamw_8bit"
    config.training.lr.connector = 2e-5
    model = tiny_model("video")
    set_trainable(model, config)
    trainer = LongVUTrainer.__new__(LongVUTrainer)
    trainer.optimizer, trainer.model, trainer.run_config = None, model, config
    trainer.args = SimpleNamespace(adam_beta1=0.9, adam_beta2=0.999, adam_epsilon=1e-8)
    opt = trainer.create_optimizer()
    assert isinstance(opt, AdamW8bit)
    expected = {g.name: g.lr for g in param_groups(model, config)}
    got = {g["name"]: g["lr"] for g in opt.param_groups}
    assert set(got) == set(expected) and all(isinstance(v, torch.Tensor) for v in got.values())
    assert {k: float(v) for k, v in got.items()} == pytest.approx(expected)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 0.5 ** step)
    sched.last_epoch = 2
    trainer.lr_scheduler = sched
    trainer._sync_learning_rates()
    assert all(isinstance(g["lr"], torch.Tensor) for g in opt.param_groups)
    assert {g["name"]: float(g["lr"]) for g in opt.param_groups} == pytest.approx({k: v / 4 for k, v in expected.items()})


def test_a_resume_on_another_process_count_is_refused_for_8bit_moments(tmp_path):
    """DeepSpeed's universal re-partitioning converts fp32 moments only: an 8-bit checkpoint saved by
    2 processes resumed on 1 is a CheckpointError naming the checkpoint and the process count to use;
    on 2 it loads as it is."""
    import json
    from types import SimpleNamespace

    from train.checkpoints import DATA_POSITION_FILE
    from train.run import _loadable
    from train.safe_load import CheckpointError

    ckpt = tmp_path / "checkpoint-4"
    ckpt.mkdir()
    (ckpt / DATA_POSITION_FILE).write_text(json.dumps({"epoch": 0, "consumed": 8, "world_size": 2}))
    with pytest.raises(CheckpointError, match=r"checkpoint-4: saved by 2 processes with training.optimizer="
                                              r"adamw_8bit.*resume it on 2 processes \(--nproc 2\), not 1"):
        _loadable(str(ckpt), SimpleNamespace(deepspeed={"zero_optimization": {}}, world_size=1), tmp_path, "adamw_8bit")
    same = SimpleNamespace(deepspeed={"zero_optimization": {}}, world_size=2)
    assert _loadable(str(ckpt), same, tmp_path, "adamw_8bit") == str(ckpt)


def test_8bit_states_without_torchao_are_refused_naming_the_package(tmp_path, monkeypatch):
    """A checkpoint with 8-bit moments loaded where torchao is missing: a CheckpointError that says what
    to install, not the 'tampered with' refusal of an unknown global."""
    from train import safe_load

    (p,) = _params((16, 256))
    opt = optimizers.build("adamw_8bit", [{"params": [p], "lr": 1e-3}], (0.9, 0.99), 1e-8)
    _step(opt, [p])
    torch.save(opt.state_dict(), tmp_path / "optimizer.pt")
    monkeypatch.setattr(safe_load, "_resolve", lambda name: None)  # as if torchao were not installed
    monkeypatch.setattr(torch._weights_only_unpickler, "_marked_safe_globals_set", set())  # torchao's own allow-list
    with pytest.raises(safe_load.CheckpointError, match=r"optimizer.pt: holds torchao.optim.subclass_8bit."
                                                        r"OptimState8bit .*pip install 'longvu-train\[quant\]'"):
        safe_load.safe_torch_load(tmp_path / "optimizer.pt")
