"""`longvu train` checks the whole run before any rank starts: one line per problem (key, value, what
was expected), exit 2, no launcher started; models are only ever local folders."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from train import cli, launch

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    """A user's folder (the working directory) with a manifest, media, two tower folders and a LoRA
    run config that passes every check; relative paths throughout."""
    monkeypatch.chdir(tmp_path)
    for var in ("RANK", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    (tmp_path / "media").mkdir()
    (tmp_path / "my.jsonl").write_text('{"id": "a", "conversations": []}\n')
    for tower in ("siglip", "dino"):
        (tmp_path / "towers" / tower).mkdir(parents=True)
        (tmp_path / "towers" / tower / "config.json").write_text("{}")
    (tmp_path / "run.yaml").write_text(yaml.safe_dump({
        "stage": "lora_video",
        "model": {"init": "tiny:video", "siglip_path": "towers/siglip", "dino_path": "towers/dino", "dtype": "fp32"},
        "data": {"train_manifest": "my.jsonl", "media_root": "media"},
        "training": {"output_dir": "runs/lora", "max_steps": 4},
        "deepspeed": "configs/deepspeed/zero2.json",  # the shipped one, found from any directory
    }))
    return tmp_path


@pytest.fixture
def launches(monkeypatch):
    """Every launcher `longvu train` starts (none may start when the check fails)."""
    started = []

    class FakeLauncher:
        pid = -1

        def __init__(self, cmd, env, **popen_kwargs):
            started.append(cmd)

        def wait(self, timeout=None):
            return 0

    monkeypatch.setattr(launch.subprocess, "Popen", FakeLauncher)
    return started


def _train(*args: str) -> int:
    return cli.main(["train", "run.yaml", *args])


def _problems(capsys) -> list[str]:
    err = capsys.readouterr().err
    lines = err.splitlines()
    assert lines and all(line.startswith("longvu train: ") for line in lines), err
    return [line.removeprefix("longvu train: ") for line in lines]


def test_a_valid_run_starts_the_launcher(workdir, launches, capsys):
    assert _train() == 0
    assert len(launches) == 1 and capsys.readouterr().err == ""


# kind of mistake -> (arguments, the one line expected)
MISTAKES = {
    "missing_model_folder": (["model.init=longvu:checkpoints/LongVU_Qwen2_7B"],
                             "model.init='longvu:checkpoints/LongVU_Qwen2_7B': checkpoints/LongVU_Qwen2_7B is not "
                             "a local folder (looked in {cwd}); expected a local model folder with a config.json "
                             "(models are never downloaded: give a local folder, or tiny:FAMILY)"),
    "hub_model_name": (["model.init=qwen2:Qwen/Qwen2-7B-Instruct"],
                       "model.init='qwen2:Qwen/Qwen2-7B-Instruct': Qwen/Qwen2-7B-Instruct is not a local folder "
                       "(looked in {cwd}); expected a local model folder with a config.json (models are never "
                       "downloaded: give a local folder, or tiny:FAMILY)"),
    "model_folder_without_config": (["model.init=longvu:media"],
                                    "model.init='longvu:media': media has no config.json; expected a local model "
                                    "folder with a config.json"),
    "unknown_model_kind": (["model.init=Qwen/Qwen2-7B"],
                           "model.init='Qwen/Qwen2-7B': expected tiny:FAMILY (video, image, video_highres_off), "
                           "config:PATH, qwen2:PATH or longvu:PATH (models are never downloaded: give a local "
                           "folder, or tiny:FAMILY)"),
    "unknown_tiny_family": (["model.init=tiny:huge"],
                            "model.init='tiny:huge': unknown tiny family; expected one of video, image, "
                            "video_highres_off"),
    "missing_tower_folder": (["model.dino_path=towers/dinov2-giant"],
                             "model.dino_path='towers/dinov2-giant': towers/dinov2-giant is not a local folder "
                             "(looked in {cwd}); expected a tower folder (config.json + weights) (models are never "
                             "downloaded: give a local folder, or tiny:FAMILY)"),
    "wrong_type_int": (["training.max_steps=four"], "training.max_steps='four': expected an integer"),
    "wrong_type_float": (["data.video_fps=abc"], "data.video_fps='abc': expected a number"),
    "wrong_type_list": (["training.report_to=tensorboard"], "training.report_to='tensorboard': expected a list"),
    "out_of_range": (["training.learning_rate=-1e-4"], "training.learning_rate=-0.0001: expected a value > 0"),
    "bad_choice": (["training.lr_scheduler=cosin"], "training.lr_scheduler='cosin': expected one of linear, cosine, "
                   "cosine_with_restarts, polynomial, constant, constant_with_warmup, inverse_sqrt, "
                   "reduce_lr_on_plateau, cosine_with_min_lr, cosine_warmup_with_min_lr, warmup_stable_decay, greedy"),
    "nproc_zero": (["--nproc", "0"], "launch.nproc=0: expected a process count >= 1 (--nproc N)"),
    "nproc_negative": (["--nproc", "-2"], "launch.nproc=-2: expected a process count >= 1 (--nproc N)"),
    "missing_manifest": (["data.train_manifest=my.jsnl"],
                         "data.train_manifest='my.jsnl': no such file; expected a JSON or JSONL manifest"),
    "missing_mixture_manifest": (["data.train_manifest=[my.jsonl, other.jsonl]"],
                                 "data.train_manifest[1]='other.jsonl': no such file; expected a JSON or JSONL manifest"),
    "missing_data_yaml": (["data.train_manifest=mix.yaml"],
                          "mix.yaml: cannot read the data YAML: [Errno 2] No such file or directory: 'mix.yaml'"),
    "missing_media_root": (["data.media_root=videos"],
                           "data.media_root='videos': no such folder; expected the folder that relative media paths "
                           "start from"),
    "missing_deepspeed_config": (["deepspeed=configs/deepspeed/zero4.json"],
                                 "deepspeed='configs/deepspeed/zero4.json': no such file; expected a DeepSpeed JSON "
                                 "config such as configs/deepspeed/zero2.json, zero3.json or zero3_offload.json"),
    "resume_not_a_checkpoint": (["training.resume=runs/old"],
                                "training.resume='runs/old': not a complete checkpoint (no trainer_state.json); "
                                "expected auto, null or a checkpoint-N folder"),
    "missing_eval_manifest": (["training.eval.manifest=heldout.jsonl"],
                              "training.eval.manifest='heldout.jsonl': no such file; expected the held-out JSON or "
                              "JSONL manifest (its media next to it)"),
    "best_metric_without_eval": (["training.eval.best_metric=loss"],
                                 "training.eval.best_metric='loss': needs training.eval.manifest"),
    "best_metric_mcq_with_mcq_off": (["training.eval.manifest=my.jsonl", "training.eval.best_metric=mcq_accuracy",
                                      "training.eval.mcq=false"],
                                     "training.eval.best_metric='mcq_accuracy': needs training.eval.mcq=true (with mcq "
                                     "off no eval_mcq_accuracy is computed); set mcq=true or best_metric=loss"),
    "best_eval_step_not_saved": (["training.eval.manifest=my.jsonl", "training.eval.best_metric=loss",
                                  "training.eval.eval_steps=500", "training.save_steps=1000"],
                                 "training.eval.best_metric='loss': every evaluation must also save a checkpoint, but "
                                 "training.eval.eval_steps=500 is not a multiple of training.save_steps=1000; set "
                                 "training.save_steps to a divisor of 500 or training.eval.eval_steps to a multiple "
                                 "of 1000"),
    "best_metric_mcq_without_mcq_records": (["training.eval.manifest=my.jsonl", "training.eval.best_metric=mcq_accuracy"],
                                            "training.eval.manifest='my.jsonl': no multiple-choice records (\"options\": "
                                            "[...] and an \"answer\" letter), which training.eval.best_metric="
                                            "'mcq_accuracy' needs; add some or set best_metric=loss"),
    "checkpointed_layers_zero": (["training.activation_checkpointing=selective", "training.checkpointed_layers=0"],
                                 "training.checkpointed_layers=0: expected a value >= 1"),
    "optimizer_choice": (["training.optimizer=adam8"], "training.optimizer='adam8': expected one of adamw, adamw_8bit"),
    "optimizer_8bit_with_offload": (["training.optimizer=adamw_8bit", "deepspeed=configs/deepspeed/zero3_offload.json"],
                                    "training.optimizer='adamw_8bit': deepspeed='configs/deepspeed/zero3_offload.json' "
                                    "offloads the optimizer to the CPU, where DeepSpeed's own CPU Adam runs instead; "
                                    "use one or the other"),
    "missing_hostfile": (["--hostfile", "hosts.txt"],
                         "launch.hostfile='hosts.txt': no such file; expected a DeepSpeed hostfile (HOST slots=N per line)"),
}


@pytest.mark.parametrize("kind", sorted(MISTAKES))
def test_each_mistake_is_one_line_and_no_rank_starts(kind, workdir, launches, capsys):
    args, expected = MISTAKES[kind]
    assert _train(*args) == 2
    assert _problems(capsys) == [expected.format(cwd=workdir)]
    assert launches == []


def test_best_metric_passes_when_every_evaluation_saves(workdir, launches):
    """Evaluations at 1000, 2000, ... are saves when save_steps divides eval_steps (500: also between)."""
    assert _train("training.eval.manifest=my.jsonl", "training.eval.best_metric=loss",
                  "training.eval.eval_steps=1000", "training.save_steps=500") == 0
    assert _train("training.eval.manifest=my.jsonl", "training.eval.best_metric=loss", "training.eval.mcq=false",
                  "training.eval.eval_steps=700", "training.save_steps=700") == 0
    assert len(launches) == 2


def test_mcq_records_are_found_without_torch(workdir, launches, capsys):
    """An eval manifest with one MCQ record (JSONL after a bad line, or a JSON list) passes; a JSON list
    whose `answer` names no option does not."""
    mcq = {"id": "q", "conversations": [], "options": ["a", "b"], "answer": "B"}
    (workdir / "held.jsonl").write_text("not json\n" + json.dumps(mcq) + "\n")
    (workdir / "held.json").write_text(json.dumps([{"id": "t", "conversations": []}, mcq]))
    (workdir / "wrong.json").write_text(json.dumps([{**mcq, "answer": "C"}]))
    for held in ("held.jsonl", "held.json"):
        assert _train(f"training.eval.manifest={held}", "training.eval.best_metric=mcq_accuracy") == 0
    assert _train("training.eval.manifest=wrong.json", "training.eval.best_metric=mcq_accuracy") == 2
    (line,) = _problems(capsys)
    assert line.startswith("training.eval.manifest='wrong.json': no multiple-choice records")
    assert len(launches) == 2


def test_mcq_record_check_imports_no_torch(tmp_path):
    (tmp_path / "held.jsonl").write_text(json.dumps({"options": ["a"], "answer": "A"}) + "\n")
    probe = ("import sys; from train.evaluation.mcq_records import has_mcq_record; "
             f"assert has_mcq_record({str(tmp_path / 'held.jsonl')!r}); print('torch' in sys.modules)")
    assert subprocess.run([sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True,
                          check=True).stdout.strip() == "False"


def test_qwen2_init_needs_both_towers(workdir, launches, capsys):
    (workdir / "qwen").mkdir()
    (workdir / "qwen" / "config.json").write_text("{}")
    assert _train("model.init=qwen2:qwen", "model.siglip_path=null", "model.dino_path=null") == 2
    assert _problems(capsys) == [f"model.{k} is not set: model.init=qwen2:PATH needs both tower folders"
                                 for k in ("siglip_path", "dino_path")]
    assert launches == []


def test_longvu_dir_naming_a_missing_tower(workdir, launches, capsys):
    """A LongVU directory whose config.json names tower folders that are not here (e.g. hub names)."""
    (workdir / "ckpt").mkdir()
    (workdir / "ckpt" / "config.json").write_text(json.dumps({"siglip_path": "google/siglip-so400m-patch14-384",
                                                              "dino_path": "towers/dino"}))
    assert _train("model.init=longvu:ckpt", "model.siglip_path=null", "model.dino_path=null") == 2
    (line,) = _problems(capsys)
    assert line.startswith("model.siglip_path is not set and ckpt/config.json names "
                           "'google/siglip-so400m-patch14-384', which is not a local folder")
    assert launches == []


def test_original_longvu_dir_needs_the_towers(workdir, launches, capsys):
    (workdir / "orig").mkdir()
    (workdir / "orig" / "config.json").write_text(json.dumps({"model_type": "cambrian_qwen"}))
    assert _train("model.init=longvu:orig", "model.siglip_path=null") == 2
    (line,) = _problems(capsys)
    assert line.startswith("model.siglip_path is not set: an original LongVU directory (orig) does not hold")
    assert launches == []


def test_longvu_dirs_whose_towers_are_found(workdir, launches):
    """Towers beside the weights (a `--format longvu --include-towers` export), or inside them (an hf
    export with towers: tower configs and no paths), pass."""
    (workdir / "export" / "siglip").mkdir(parents=True)
    (workdir / "export" / "dino").mkdir()
    (workdir / "export" / "config.json").write_text(json.dumps({"model_type": "cambrian_qwen", "siglip_path": "siglip",
                                                                "dino_path": "dino"}))
    (workdir / "hf").mkdir()
    (workdir / "hf" / "config.json").write_text(json.dumps({"siglip_config": {"a": 1}, "dino_config": {"a": 1}}))
    for init in ("longvu:export", "longvu:hf"):
        assert _train(f"model.init={init}", "model.siglip_path=null", "model.dino_path=null") == 0
    assert len(launches) == 2


def test_deepspeed_config_with_an_optimizer_section(workdir, launches, capsys):
    (workdir / "ds.json").write_text(json.dumps({"optimizer": {"type": "AdamW"}}))
    assert _train("deepspeed=ds.json") == 2
    (line,) = _problems(capsys)
    assert line.startswith("deepspeed='ds.json': ") and "remove the 'optimizer' section" in line
    assert launches == []


def test_output_dir_that_is_a_file(workdir, launches, capsys):
    (workdir / "out.txt").write_text("")
    assert _train("training.output_dir=out.txt") == 2
    assert _problems(capsys) == ["training.output_dir='out.txt': exists and is not a folder"]


def test_every_problem_is_reported_at_once(workdir, launches, capsys):
    """Wrong types are all listed together; so are wrong values and missing paths (checked once the
    types are right)."""
    assert _train("training.max_steps=four", "data.video_fps=abc") == 2
    assert _problems(capsys) == ["data.video_fps='abc': expected a number", "training.max_steps='four': expected an integer"]
    assert _train("training.warmup_ratio=1.5", "data.train_manifest=nope.jsonl", "model.siglip_path=nope") == 2
    assert [p.split(":")[0] for p in _problems(capsys)] == [
        "training.warmup_ratio=1.5", "model.siglip_path='nope'", "data.train_manifest='nope.jsonl'"]
    assert launches == []


def test_ranks_get_absolute_paths(workdir, monkeypatch):
    """Under a launcher the run trains with every path absolute (what run_config.json records)."""
    import train.run

    got = []
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setattr(launch, "skip_shm_comm_build", lambda: None)
    monkeypatch.setattr(train.run, "train_in_process", lambda config: got.append(config) or 0)
    assert _train("training.resume=null") == 0
    (config,) = got
    assert config.model.siglip_path == str(workdir / "towers" / "siglip")
    assert config.model.dino_path == str(workdir / "towers" / "dino")
    assert config.data.train_manifest == str(workdir / "my.jsonl")
    assert config.data.media_root == str(workdir / "media")
    assert config.training.output_dir == str(workdir / "runs" / "lora")
    assert config.deepspeed == str(REPO / "configs" / "deepspeed" / "zero2.json")
    assert config.model.init == "tiny:video"


def test_scheduler_names_match_transformers():
    from transformers.trainer_utils import SchedulerType

    from train.config import LR_SCHEDULERS

    assert set(LR_SCHEDULERS) == {s.value for s in SchedulerType}


def test_console_script_reports_in_seconds_without_starting_a_rank(workdir):
    """The real `longvu train`: a fake `deepspeed` first on PATH would leave a mark if it were started."""
    fake_bin = workdir / "bin"
    fake_bin.mkdir()
    mark = workdir / "launched"
    for name in ("deepspeed", "torchrun"):
        (fake_bin / name).write_text(f"#!/bin/sh\ntouch {mark}\n")
        (fake_bin / name).chmod(0o755)
    env = {**os.environ, "PATH": f"{fake_bin}{os.pathsep}{os.environ['PATH']}"}
    exe = Path(sys.executable).parent / "longvu"
    start = time.perf_counter()
    done = subprocess.run([str(exe), "train", "run.yaml", "model.dino_path=towers/nope", "--nproc", "0"],
                          cwd=workdir, env=env, capture_output=True, text=True, timeout=60)
    seconds = time.perf_counter() - start
    assert done.returncode == 2, done.stderr
    lines = done.stderr.splitlines()
    assert len(lines) == 2 and lines[0].startswith("longvu train: launch.nproc=0: ")
    assert lines[1].startswith("longvu train: model.dino_path='towers/nope': towers/nope is not a local folder")
    assert "Traceback" not in done.stderr and not mark.exists()
    assert seconds < 5, f"the pre-launch check took {seconds:.1f} s"
    # and the good config does reach the launcher (so the mark above can be trusted)
    assert subprocess.run([str(exe), "train", "run.yaml"], cwd=workdir, env=env, capture_output=True,
                          timeout=120).returncode == 0
    assert mark.exists()
