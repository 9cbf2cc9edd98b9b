"""No code runs from a checkpoint file: every pickle load is weights-only (train.safe_load).

The malicious pickle is an object whose `__reduce__` calls `os.system("touch MARKER")`: if any load
unpickles it, MARKER appears. Each loader that reads checkpoints (DeepSpeed's checkpoint engine and
zero_to_fp32, which ask for weights_only=False; peft's adapter loading; HF's weights loading) is run
on it under `safe_loading()` and must refuse it with one line naming the file and the global, while
the states those loaders really meet (DeepSpeed loss scaler, stage enum, fragment addresses; numpy
rng states) load.
"""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest
import torch

from pickle_helpers import Payload, write_malicious
from train.safe_load import UnsafeCheckpointError, check_pickles, safe_loading, safe_torch_load


@pytest.fixture
def marker(tmp_path) -> Path:
    return tmp_path / "CODE_RAN"


def _assert_refused(err: pytest.ExceptionInfo, file: Path, marker: Path) -> None:
    message = str(err.value)
    assert str(file) in message and "posix.system" in message, message
    assert "\n" not in message  # one line, not torch's multi-paragraph UnpicklingError
    assert not marker.exists()


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
def test_safe_torch_load_refuses_code(tmp_path, marker, legacy):
    file = write_malicious(tmp_path / "x.pt", marker, legacy)
    with pytest.raises(UnsafeCheckpointError) as err:
        safe_torch_load(file, mmap=True)
    _assert_refused(err, file, marker)


def test_torch_load_with_weights_only_false_is_guarded(tmp_path, marker):
    """Inside safe_loading, even an explicit weights_only=False (what DeepSpeed passes) is weights-only;
    outside, torch.load is torch's again."""
    file = write_malicious(tmp_path / "x.pt", marker)
    with safe_loading(), pytest.raises(UnsafeCheckpointError) as err:
        torch.load(file, map_location="cpu", weights_only=False)
    _assert_refused(err, file, marker)
    assert not getattr(torch.load, "_weights_only_guard", False)


def test_deepspeed_checkpoint_engine_refuses_a_tampered_shard(tmp_path, marker):
    """DeepSpeed's resume path (engine.load_checkpoint -> TorchCheckpointEngine.load, weights_only=False)."""
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

    file = write_malicious(tmp_path / "global_step2" / "zero_pp_rank_0_mp_rank_00_optim_states.pt", marker)
    with safe_loading(), pytest.raises(UnsafeCheckpointError) as err:
        TorchCheckpointEngine().load(str(file), map_location="cpu")
    _assert_refused(err, file, marker)


def test_zero_to_fp32_refuses_tampered_model_states(tmp_path, marker):
    """Export's path to the fp32 masters (zero_to_fp32 loads the model states with weights_only=False)."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    (tmp_path / "latest").write_text("global_step2")
    file = write_malicious(tmp_path / "global_step2" / "mp_rank_00_model_states.pt", marker)
    write_malicious(tmp_path / "global_step2" / "zero_pp_rank_0_mp_rank_00_optim_states.pt", marker)
    with safe_loading(), pytest.raises(UnsafeCheckpointError) as err:
        get_fp32_state_dict_from_zero_checkpoint(str(tmp_path))
    assert "posix.system" in str(err.value) and not marker.exists()
    assert str(file.parent) in str(err.value)


def test_peft_adapter_bin_is_refused(tmp_path, marker):
    from peft.utils.save_and_load import load_peft_weights

    file = write_malicious(tmp_path / "adapter_model.bin", marker)
    with safe_loading(), pytest.raises(UnsafeCheckpointError) as err:
        load_peft_weights(str(tmp_path), device="cpu")
    _assert_refused(err, file, marker)


def test_hf_pytorch_model_bin_is_refused(tmp_path, marker):
    from transformers.modeling_utils import load_state_dict

    file = write_malicious(tmp_path / "pytorch_model.bin", marker)
    with safe_loading(), pytest.raises(UnsafeCheckpointError) as err:
        load_state_dict(str(file))
    _assert_refused(err, file, marker)


def test_deepspeed_and_trainer_states_load(tmp_path):
    """What the allow-list is for: a ZeRO optimizer state's classes and the Trainer's numpy rng state."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    state = {"loss_scaler": LossScaler(1.0), "dynamic": DynamicLossScaler(2.0**16, 1000, 1.0, False, False),
             "zero_stage": ZeroStageEnum.gradients, "slices": {"w": fragment_address(numel=4, start=0)},
             "fp32": [torch.arange(4.0)]}
    torch.save(state, tmp_path / "optim_states.pt")
    rng = {"python": random.getstate(), "numpy": np.random.get_state(), "cpu": torch.random.get_rng_state()}
    torch.save(rng, tmp_path / "rng_state.pth")
    check_pickles(tmp_path)
    loaded = safe_torch_load(tmp_path / "optim_states.pt")
    assert loaded["loss_scaler"].cur_scale == 1.0 and loaded["dynamic"].cur_scale == 2.0**16
    assert loaded["zero_stage"] is ZeroStageEnum.gradients and loaded["slices"]["w"].numel == 4
    assert np.array_equal(safe_torch_load(tmp_path / "rng_state.pth")["numpy"][1], rng["numpy"][1])


def test_check_pickles_names_the_tampered_file(tmp_path, marker):
    torch.save({"w": torch.zeros(1)}, tmp_path / "scheduler.pt")
    bad = write_malicious(tmp_path / "rng_state_1.pth", marker)
    torch.save({"not": Payload(marker)}, tmp_path / "training_args.bin")  # never loaded by anything: skipped
    with pytest.raises(UnsafeCheckpointError) as err:
        check_pickles(tmp_path)
    _assert_refused(err, bad, marker)
