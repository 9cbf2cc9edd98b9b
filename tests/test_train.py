"""End-to-end training runs: real 2-process DeepSpeed (ZeRO-2 / ZeRO-3) on CPU through `longvu train`,
on a tiny LongVU with the real Qwen2 tokenizer and media written at test time.

Each run is a subprocess (`longvu train CFG key=value...`, which starts `deepspeed --num_gpus 2`)
with a hard timeout that kills the whole process group, so a ZeRO-3 hang fails the test instead of
hanging the suite. Runs are module-scoped fixtures shared between assertions; all are marked slow.

Which rank trains which batch is not read from the logs (they are summed over ranks) but recomputed
with the run's own `ModalityLengthBatchSampler` (per-device batch size 1: every record is a batch of
its own, so the modality each rank gets at each step depends only on the seed and the modalities).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
LONGVU = Path(sys.executable).parent / "longvu"
ZERO2 = str(REPO / "configs" / "deepspeed" / "zero2.json")
ZERO3 = str(REPO / "configs" / "deepspeed" / "zero3.json")
RUN_TIMEOUT_S = 300
WORLD = 2

TEXT_RECORD = {"id": "text_0", "conversations": [
    {"from": "human", "value": "Say hello to the new user."},
    {"from": "gpt", "value": "Hello, and welcome!"}]}


# --- helpers -----------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


def _config(manifest: Path, out: Path, *, zero: str = ZERO3, stage: str = "custom", init: str = "tiny:video",
            model: dict | None = None, training: dict | None = None, data: dict | None = None,
            lora: dict | None = None) -> dict:
    cfg = {
        "stage": stage,
        "model": {"init": init, "dtype": "fp32", "overrides": {"tokenizer_model_max_length": 1024}, **(model or {})},
        "data": {"train_manifest": str(manifest), "per_device_batch_size": 1, "max_tokens_per_batch": 4096,
                 "num_workers": 0, **(data or {})},
        "training": {"output_dir": str(out), "learning_rate": 1.0e-3, "max_steps": 2, "save_steps": 2,
                     "logging_steps": 1, "report_to": [], "activation_checkpointing": "full", **(training or {})},
        "deepspeed": zero,
    }
    if lora:
        cfg["lora"] = lora
    return cfg


class Run:
    """One `longvu train` subprocess: its config, output folder, console log, exit code and wall time."""

    def __init__(self, cfg: dict, workdir: Path, overrides: tuple[str, ...] = ()):
        workdir.mkdir(parents=True, exist_ok=True)
        self.cfg, self.workdir = cfg, workdir
        self.out = Path(cfg["training"]["output_dir"])
        self.config_path = workdir / "run.yaml"
        self.config_path.write_text(yaml.safe_dump(cfg))
        self.log_path = workdir / "console.log"
        self.cmd = [str(LONGVU), "train", str(self.config_path), f"launch.master_port={_free_port()}", *overrides]
        self.returncode: int | None = None
        self.seconds = 0.0

    def start(self) -> subprocess.Popen:
        self._log = open(self.log_path, "w")
        self._start = time.perf_counter()
        self.proc = subprocess.Popen(self.cmd, cwd=REPO, stdout=self._log, stderr=subprocess.STDOUT,
                                     start_new_session=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        return self.proc

    def wait(self, timeout: float = RUN_TIMEOUT_S) -> "Run":
        try:
            self.returncode = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            _kill_group(self.proc)
            self._log.close()
            pytest.fail(f"`longvu train` did not finish in {timeout} s (hang?); log tail:\n{self.log[-4000:]}")
        finally:
            self.seconds = time.perf_counter() - self._start
            self._log.close()
            try:  # nothing of the run may outlive it (e.g. ranks orphaned by a launcher that died)
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        return self

    def run(self, timeout: float = RUN_TIMEOUT_S) -> "Run":
        self.start()
        return self.wait(timeout)

    @property
    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def check_ok(self) -> "Run":
        assert self.returncode == 0, f"exit {self.returncode}; log tail:\n{self.log[-6000:]}"
        return self

    @property
    def summary(self) -> dict:
        return json.loads((self.out / "run_summary.json").read_text())

    def losses(self) -> dict[int, float]:
        return {h["step"]: float(h["loss"]) for h in self.summary["log_history"] if "loss" in h}


def _records(media: Path) -> dict[str, dict]:
    return {r["id"]: r for r in map(json.loads, (media / "manifest.jsonl").read_text().splitlines())}


def _write_manifest(media: Path, name: str, records: list[dict]) -> Path:
    path = media / f"{name}.jsonl"  # next to the media: relative paths resolve against it
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def _modality(record: dict) -> str:
    return "video" if "video" in record else "image" if "image" in record else "text"


def rank_modalities(records: list[dict], seed: int, epochs: int) -> list[tuple[str, ...]]:
    """Per optimizer step, the modality of each rank's batch (per-device batch size 1), recomputed with
    the sampler the trainer uses (lengths do not matter: every record is its own batch)."""
    from data.sampler import ModalityLengthBatchSampler

    mods = [_modality(r) for r in records]
    steps = []
    for epoch in range(epochs):
        per_rank = []
        for rank in range(WORLD):
            sampler = ModalityLengthBatchSampler([100] * len(mods), mods, 4096, 1, seed=seed, rank=rank, world_size=WORLD)
            sampler.set_epoch(epoch)
            per_rank.append([mods[b[0]] for b in sampler])
        steps += list(zip(*per_rank))
    return steps


def _check_checkpoint_dir(ckpt: Path, zero3: bool) -> None:
    names = {p.name for p in ckpt.iterdir()}
    step = int(ckpt.name.split("-")[1])
    expected = {"config.json", "model.safetensors", "trainer_state.json", "scheduler.pt", "latest",
                f"global_step{step}", "training_args.bin"} | {f"rng_state_{r}.pth" for r in range(WORLD)}
    assert expected <= names, f"{ckpt}: missing {sorted(expected - names)}"
    shards = sorted(p.name for p in (ckpt / f"global_step{step}").iterdir())
    for rank in range(WORLD):
        assert any(f"rank_{rank}" in s and "optim_states" in s for s in shards), (ckpt, shards)
    if zero3:
        assert sum("model_states" in s for s in shards) == WORLD, shards
    state = json.loads((ckpt / "trainer_state.json").read_text())
    assert state["global_step"] == step
    tensors = load_file(str(ckpt / "model.safetensors"))
    assert tensors and all(t.numel() > 0 for t in tensors.values())  # ZeRO-3: gathered, not placeholders
    assert all(torch.isfinite(t).all() for t in tensors.values())
    assert not any("vision_tower_aux_list" in k for k in tensors)  # frozen towers are not saved


def _assert_run_complete(run: Run, steps: int, zero3: bool) -> None:
    run.check_ok()
    out = run.out
    assert not (out / ".staging").exists()
    summary = run.summary
    assert summary["global_step"] == steps and not summary["preempted"]
    losses = run.losses()
    assert sorted(losses) == list(range(1, steps + 1))
    assert all(math.isfinite(v) and v > 0 for v in losses.values()), losses
    ckpts = sorted((p for p in out.glob("checkpoint-*")), key=lambda p: int(p.name.split("-")[1]))
    assert ckpts and ckpts[-1].name == f"checkpoint-{steps}"
    for ckpt in ckpts:
        _check_checkpoint_dir(ckpt, zero3)


def _tower_dirs(model, root: Path) -> tuple[Path, Path]:
    siglip, dino = model.model.towers
    siglip.vision_tower.save_pretrained(root / "siglip")
    dino.vision_tower.save_pretrained(root / "dino")
    return root / "siglip", root / "dino"


# --- shared data and runs ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def media(tmp_path_factory) -> Path:
    """2 images (48x64 PNG) and 2 clips (4 s, 10 fps, 48x64) with manifest.jsonl, under one folder."""
    from data.synthetic import write_synthetic_dataset

    root = tmp_path_factory.mktemp("media")
    write_synthetic_dataset(root, n_images=2, n_videos=2, video_seconds=4)
    return root


@pytest.fixture(scope="module")
def towers(tmp_path_factory):
    """The frozen towers of `tiny_model("video")` (seed 0, what tiny:video trains with) as HF folders."""
    from longvu.tiny import tiny_model

    return _tower_dirs(tiny_model("video"), tmp_path_factory.mktemp("towers"))


# ZeRO-3 main run: image, video and text-only records, batch size 1: 3 steps per epoch; 4 steps, saves
# at 2 (mid-epoch, for the resume test) and 4.
MAIN_IDS = ["image_0", "video_0", "video_1", "text_0", "text_1", "image_1"]
MAIN_STEPS = 4
MAIN_EPOCHS = -(-MAIN_STEPS * WORLD // len(MAIN_IDS))


def _main_seed(records: list[dict]) -> int:
    """The first seed for which some step gives one rank text only and the other a video, and some
    step has an image batch (so one run covers all three requirements)."""
    for seed in range(200):
        steps = rank_modalities(records, seed, epochs=MAIN_EPOCHS)[:MAIN_STEPS]
        if any(set(s) == {"text", "video"} for s in steps) and any("image" in s for s in steps):
            return seed
    raise AssertionError("no seed gives a text/video step")


def train_zero3_main(media: Path, tmp_path_factory, optimizer: str) -> Run:
    """The main ZeRO-3 run: 2 ranks, MAIN_STEPS steps of images, videos and text (a seed giving a step
    with one rank text-only beside a video), checkpoints at the half and the end."""
    text_1 = {**TEXT_RECORD, "id": "text_1", "conversations": [
        {"from": "human", "value": "What is two plus two?"}, {"from": "gpt", "value": "Four."}]}
    records = [{**_records(media), "text_0": TEXT_RECORD, "text_1": text_1}[i] for i in MAIN_IDS]
    manifest = _write_manifest(media, "main", records)
    seed = _main_seed(records)
    work = tmp_path_factory.mktemp("zero3_main")
    cfg = _config(manifest, work / "out", zero=ZERO3, training={
        "max_steps": MAIN_STEPS, "save_steps": MAIN_STEPS // 2, "seed": seed, "optimizer": optimizer})
    run = Run(cfg, work).run()
    run.schedule = rank_modalities(records, seed, epochs=MAIN_EPOCHS)[:MAIN_STEPS]
    return run


@pytest.fixture(scope="module")
def zero3_main(media, tmp_path_factory):
    """With 8-bit AdamW: this run also carries test_adamw_8bit_under_zero3_trains_and_saves_its_8bit_moments,
    and the resume test resumes 8-bit moments (fp32 AdamW under ZeRO-3: test_export, test_train_reliability)."""
    return train_zero3_main(media, tmp_path_factory, "adamw_8bit")


OVERFIT_STEPS = 12


@pytest.fixture(scope="module")
def zero2_overfit(media, tmp_path_factory):
    """ZeRO-2, one image and one clip (so every step has an image batch on one rank and a video batch
    on the other), repeated for OVERFIT_STEPS steps at a constant lr 1e-2 (the 64-wide model over a
    152k vocabulary learns slowly: 11.9 -> 10.3 in 20 cosine steps at 1e-3, -> 7.5 in 16 at 5e-3)."""
    recs = _records(media)
    manifest = _write_manifest(media, "overfit", [recs["image_0"], recs["video_0"]])
    work = tmp_path_factory.mktemp("zero2_overfit")
    cfg = _config(manifest, work / "out", zero=ZERO2, training={
        "max_steps": OVERFIT_STEPS, "save_steps": OVERFIT_STEPS // 2, "learning_rate": 1.0e-2, "warmup_ratio": 0.0,
        "lr_scheduler": "constant"})
    return Run(cfg, work).run()


# --- 1. ZeRO-2 / ZeRO-3 with image and video batches -----------------------------------------------


def test_zero2_image_and_video_steps_write_checkpoints(zero2_overfit):
    _assert_run_complete(zero2_overfit, OVERFIT_STEPS, zero3=False)
    # every step: one rank has an image batch, the other a video batch
    steps = rank_modalities([{"image": "x"}, {"video": "x"}], seed=42, epochs=OVERFIT_STEPS)
    assert all(set(s) == {"image", "video"} for s in steps)
    # summed over both ranks: (1 image frame + the clip's frames) / 2 samples
    first = next(h for h in zero2_overfit.summary["log_history"] if "loss" in h)
    assert first["frames_in_per_sample"] == pytest.approx((1 + 4) / 2)
    assert first["visual_tokens_per_sample"] > 0


def test_zero3_image_and_video_steps_write_checkpoints(zero3_main):
    _assert_run_complete(zero3_main, MAIN_STEPS, zero3=True)
    flat = [m for step in zero3_main.schedule for m in step]
    assert {"image", "video", "text"} <= set(flat)
    assert [p.name for p in sorted(zero3_main.out.glob("checkpoint-*"))] == ["checkpoint-2", "checkpoint-4"]


# --- 2. ZeRO-3: one rank text-only while the other has a video ----------------------------------------


def test_zero3_text_only_rank_beside_video_rank_completes(zero3_main):
    """A rank whose batch has no media runs the vision path on a blank frame (contributing 0), so the
    ZeRO-3 parameter gathers stay in step with the rank that has a video: the run ends (no hang: the
    run's timeout) and the mixed step has a finite loss."""
    zero3_main.check_ok()
    mixed = [i + 1 for i, s in enumerate(zero3_main.schedule) if set(s) == {"text", "video"}]
    assert mixed, zero3_main.schedule
    history = {h["step"]: h for h in zero3_main.summary["log_history"] if "loss" in h}
    for step in mixed:
        assert math.isfinite(history[step]["loss"])
        # frames summed over ranks / 2 samples: the text rank adds 0 frames, the video rank 4
        assert history[step]["frames_in_per_sample"] == pytest.approx(4 / 2)


# --- 3. overfitting ----------------------------------------------------------------------------


def test_overfit_loss_falls_by_half(zero2_overfit):
    losses = zero2_overfit.losses()
    first, last = losses[1], losses[max(losses)]
    assert first > 5.0, losses  # a random tiny model over a 152k vocabulary starts near ln(151936) = 11.9
    assert last <= 0.5 * first, losses


# --- 4. video_finetune from an original-layout _img checkpoint: the 576 -> 144 switch -----------


@pytest.fixture(scope="module")
def video_finetune(media, tmp_path_factory):
    from longvu.checkpoint import save_original_layout
    from longvu.tiny import tiny_model

    work = tmp_path_factory.mktemp("video_finetune")
    img = tiny_model("image", seed=1)
    assert img.config.image_token_len == 576 and not img.config.highres
    save_original_layout(img, work / "LongVU_tiny_img")
    siglip, dino = _tower_dirs(img, work / "towers")
    recs = _records(media)
    manifest = _write_manifest(media, "video_finetune", [recs["video_0"], recs["image_1"]])
    cfg = _config(manifest, work / "out", zero=ZERO3, stage="video_finetune",
                  init=f"longvu:{work / 'LongVU_tiny_img'}",
                  model={"siglip_path": str(siglip), "dino_path": str(dino)},
                  training={"max_steps": 2, "save_steps": 2, "learning_rate": 5.0e-6})
    # only the file's own override: the stage adds 144 queries, highres, 8x8 low-res and drop 0.8; the
    # towers' input sizes (55 / 54 px here; not in the original config.json) come from the tower configs
    cfg["model"]["overrides"] = {"tokenizer_model_max_length": 1024}
    run = Run(cfg, work).run()
    run.img_state = {k: v.clone() for k, v in img.state_dict().items() if "vision_tower_aux_list" not in k}
    return run


def test_video_finetune_switches_576_to_144(video_finetune):
    from longvu.tiny import TINY_DINO_PIXELS, TINY_SIGLIP_PIXELS

    run = video_finetune
    _assert_run_complete(run, 2, zero3=True)
    assert "switched to 144 SVA queries" in run.log
    assert run.summary["data_sources"] == {"video_finetune": 2}  # records per source, also logged at start
    assert "training records per source: {'video_finetune': 2}" in run.log
    assert "SVA queries: 576 -> 144" in run.log
    saved = json.loads((run.out / "run_config.json").read_text())
    assert saved["model"]["overrides"]["image_token_len"] == 144
    config = json.loads((run.out / "checkpoint-2" / "config.json").read_text())
    assert config["image_token_len"] == 144
    assert config["highres"] is True and config["lowres_token"] == 8 and config["drop_threshold"] == 0.8
    assert (config["siglip_image_size"], config["dino_image_size"]) == (TINY_SIGLIP_PIXELS, TINY_DINO_PIXELS)
    tensors = load_file(str(run.out / "checkpoint-2" / "model.safetensors"))
    pos = sorted(k for k in tensors if "pos_embed_" in k)
    assert pos and {k.rsplit(".", 1)[-1] for k in pos} == {"pos_embed_0", "pos_embed_1"}, pos
    assert all(tensors[k].shape[0] == 4 for k in pos)  # 144 queries on a 24x24 grid: a 2x2 cell per query
    # everything else continued from the _img weights (2 Adam steps at lr 5e-6 move it by ~1e-5)
    assert set(tensors) - set(pos) == set(run.img_state)
    drift = max((tensors[k].float() - v.float()).abs().max().item() for k, v in run.img_state.items())
    assert drift < 1e-4


# --- 5. resume ----------------------------------------------------------------------------------


def test_resume_reaches_the_same_weights(zero3_main, tmp_path):
    """Straight run: 4 steps (same learning-rate schedule), checkpoints at 2 and 4. Resumed run: an
    output folder holding only the straight run's checkpoint-2 and `resume: auto`: it continues at
    step 3, mid-epoch (3 steps per epoch: the sampler's first 2 batches of each rank are skipped),
    and writes checkpoint-4, whose model.safetensors must equal the straight run's bit for bit
    (torch.equal: CPU, fp32, deterministic kernels)."""
    straight = zero3_main.check_ok()
    out = tmp_path / "out"
    out.mkdir()
    shutil.copytree(straight.out / "checkpoint-2", out / "checkpoint-2")
    cfg = json.loads(json.dumps(straight.cfg))
    cfg["training"]["output_dir"] = str(out)
    cfg["training"]["resume"] = "auto"
    resumed = Run(cfg, tmp_path).run().check_ok()
    assert f"resuming from {out / 'checkpoint-2'}" in resumed.log
    assert resumed.summary["global_step"] == MAIN_STEPS
    a = load_file(str(straight.out / "checkpoint-4" / "model.safetensors"))
    b = load_file(str(out / "checkpoint-4" / "model.safetensors"))
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), f"{key}: max diff {(a[key] - b[key]).abs().max().item()}"
    # steps 1-2 come back from trainer_state.json; the resumed steps 3-4 saw the same data (frames,
    # visual tokens) and learning rates as the straight run's, and gave the same loss
    history = {h["step"]: h for h in straight.summary["log_history"] if "loss" in h}
    resumed_history = {h["step"]: h for h in resumed.summary["log_history"] if "loss" in h}
    assert sorted(resumed_history) == [1, 2, 3, 4]
    for step in (1, 2, 3, 4):
        rates = [k for k in history[step] if k.startswith("lr/")]  # one learning rate per parameter group
        assert {"lr/connector", "lr/llm", "lr/projector"} <= set(rates), history[step]
        for key in ("loss", *rates, "frames_in_per_sample", "visual_tokens_per_sample"):
            assert resumed_history[step][key] == history[step][key], (step, key)


# --- 6. SIGTERM ---------------------------------------------------------------------------------


def _rank_processes(root_pid: int, timeout: float = 60.0):
    import psutil

    deadline = time.time() + timeout
    while time.time() < deadline:
        ranks = [p for p in psutil.Process(root_pid).children(recursive=True)
                 if any(a.startswith("--local_rank") for a in p.cmdline())]
        if len(ranks) == WORLD:
            return ranks
        time.sleep(0.5)
    raise AssertionError("rank processes not found")


@pytest.fixture(scope="module", params=["ranks", "launcher"])
def preempted(request, media, tmp_path_factory):
    """A 200-step ZeRO-3 run; once step 1 is logged, SIGTERM goes either to both rank processes (as a
    cluster scheduler's preemption delivers it to every task) or only to the `longvu train` process
    that started the launcher (a container's main process being stopped)."""
    recs = _records(media)
    manifest = _write_manifest(media, "sigterm", [recs["image_0"], TEXT_RECORD])
    work = tmp_path_factory.mktemp(f"sigterm_{request.param}")
    cfg = _config(manifest, work / "out", zero=ZERO3, training={"max_steps": 200, "save_steps": 1000})
    run = Run(cfg, work)
    proc = run.start()
    ranks = _rank_processes(proc.pid)
    deadline = time.time() + RUN_TIMEOUT_S
    while "'loss'" not in run.log:
        if proc.poll() is not None or time.time() > deadline:
            _kill_group(proc)
            pytest.fail(f"no training step logged; log tail:\n{run.log[-4000:]}")
        time.sleep(0.2)
    for p in ranks if request.param == "ranks" else [proc]:
        p.send_signal(signal.SIGTERM)
    return run.wait(timeout=120)


def test_sigterm_saves_a_loadable_checkpoint_and_exits_0(preempted, towers):
    from longvu.modeling import LongVUForCausalLM

    run = preempted.check_ok()
    summary = run.summary
    assert summary["preempted"] is True
    step = summary["global_step"]
    assert 1 <= step < 200
    assert "SIGTERM received: saving a checkpoint" in run.log
    assert not (run.out / ".staging").exists()
    ckpts = list(run.out.glob("checkpoint-*"))
    assert [p.name for p in ckpts] == [f"checkpoint-{step}"]
    _check_checkpoint_dir(ckpts[0], zero3=True)
    # The towers are not in the checkpoint and a tiny:* config names no tower folders: loading needs them.
    with pytest.raises(ValueError, match="siglip_path"):
        LongVUForCausalLM.from_pretrained(ckpts[0])
    model = LongVUForCausalLM.from_pretrained(ckpts[0], siglip_path=towers[0], dino_path=towers[1]).eval()
    saved = load_file(str(ckpts[0] / "model.safetensors"))
    state = model.state_dict()
    assert all(torch.equal(state[k], v) for k, v in saved.items())
    ids = torch.tensor([[151644, 872, 198, 9707, 151645, 198, 151644, 77091, 198]])
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    assert torch.isfinite(logits).all()


# --- 7. LoRA under ZeRO-3 -------------------------------------------------------------------------

LORA = {"enabled": True, "r": 8, "alpha": 16, "dropout": 0.05}


@pytest.fixture(scope="module")
def lora_run(media, tmp_path_factory):
    recs = _records(media)
    manifest = _write_manifest(media, "lora", [recs["video_1"], recs["image_1"]])
    work = tmp_path_factory.mktemp("lora")
    cfg = _config(manifest, work / "out", zero=ZERO3, lora=LORA,
                  training={"max_steps": 3, "save_steps": 3, "learning_rate": 1.0e-2})
    return Run(cfg, work).run()


def _fixed_batch(seed: int = 0) -> dict:
    """A chat-formatted sample with a 3-frame video placeholder and a supervised answer."""
    from longvu.constants import IGNORE_INDEX, IMAGE_TOKEN_INDEX
    from longvu.tiny import TINY_DINO_PIXELS, TINY_SIGLIP_PIXELS

    g = torch.Generator().manual_seed(seed)
    ids = torch.tensor([[151644, 872, 198, IMAGE_TOKEN_INDEX, 198, 3838, 374, 419, 30, 151645, 198,
                         151644, 77091, 198, 9707, 11, 1879, 0, 151645, 198]])
    labels = ids.clone()
    labels[:, :14] = IGNORE_INDEX
    return dict(input_ids=ids, labels=labels,
                pixel_values_siglip=[torch.rand(3, 3, TINY_SIGLIP_PIXELS, TINY_SIGLIP_PIXELS, generator=g)],
                pixel_values_dino=[torch.rand(3, 3, TINY_DINO_PIXELS, TINY_DINO_PIXELS, generator=g)],
                media_sizes=[(48, 64)], media_kinds=["video"])


@torch.no_grad()
def _loss(model) -> float:
    return model(**_fixed_batch()).loss.item()


def test_lora_zero3_adapter_is_real_and_reloads_to_the_same_loss(lora_run):
    """Reference: the checkpoint's DeepSpeed ZeRO-3 shards consolidated with zero_to_fp32 (the
    optimizer's fp32 master copy of every trained tensor: LoRA A/B, connector, projectors) loaded into
    the PEFT-wrapped model the run built (same seed, same LoRA config; the frozen base is that seeded
    tiny model). Reloaded: a fresh tiny model (same seed) + non_lora_trainables.safetensors +
    `PeftModel.from_pretrained(checkpoint)`, i.e. only the files a user ships. The two come from
    independent save paths (optimizer partitions vs gathered module weights) and must give the same
    loss on a fixed video sample, which must differ from the untrained base model's."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    from peft import PeftModel

    from longvu.tiny import tiny_model
    from train.config import load_run_config
    from train.model_setup import apply_lora, set_trainable
    from train.checkpoints import CONNECTOR_FILE

    run = lora_run
    _assert_run_complete_lora(run)
    ckpt = run.out / "checkpoint-3"
    adapter = load_file(str(ckpt / "adapter_model.safetensors"))
    assert adapter and all(t.numel() > 0 for t in adapter.values())
    lora_b = {k: v for k, v in adapter.items() if "lora_B" in k}
    lora_a = {k: v for k, v in adapter.items() if "lora_A" in k}
    assert len(lora_b) == len(lora_a) == 2 * 7  # 2 layers x 7 target modules
    assert all(v.abs().max() > 0 for v in lora_b.values()), [k for k, v in lora_b.items() if not v.abs().max() > 0]
    connector = load_file(str(ckpt / CONNECTOR_FILE))
    assert connector and all(t.numel() > 0 for t in connector.values())
    assert any("mm_projector" in k for k in connector) and any("vision_sampler_0" in k for k in connector)

    base = tiny_model("video", tokenizer_model_max_length=1024)
    base_loss = _loss(base)
    base_state = {k: v.clone() for k, v in base.state_dict().items()}

    # reloaded: base + connector file + adapter
    missing, unexpected = base.load_state_dict(connector, strict=False)
    assert not unexpected
    assert any(not torch.equal(base_state[k], v) for k, v in connector.items())  # the connector trained
    reloaded = PeftModel.from_pretrained(base, ckpt).eval()
    reloaded_loss = _loss(reloaded)

    # reference: the consolidated ZeRO-3 training state in the model the run built
    config = load_run_config(run.config_path)
    ref = tiny_model("video", tokenizer_model_max_length=1024)
    set_trainable(ref, config)
    ref = apply_lora(ref, config)
    # the Trainer saves PEFT models' DeepSpeed checkpoints without the frozen parameters: the trained
    # ones come from there, the frozen base is the same seeded tiny model the run started from
    consolidated = get_fp32_state_dict_from_zero_checkpoint(str(ckpt))
    trainable = {n for n, p in ref.named_parameters() if p.requires_grad}
    assert set(consolidated) == trainable
    missing, unexpected = ref.load_state_dict(consolidated, strict=False)
    assert not unexpected and set(missing) == set(ref.state_dict()) - trainable
    ref.eval()
    ref_loss = _loss(ref)

    assert math.isfinite(reloaded_loss)
    assert abs(reloaded_loss - ref_loss) <= 1e-6 * max(1.0, abs(ref_loss)), (reloaded_loss, ref_loss)
    assert abs(reloaded_loss - base_loss) > 1e-3, (reloaded_loss, base_loss)


def _assert_run_complete_lora(run: Run) -> None:
    run.check_ok()
    assert not (run.out / ".staging").exists()
    losses = run.losses()
    assert sorted(losses) == [1, 2, 3] and all(math.isfinite(v) for v in losses.values())
    ckpt = run.out / "checkpoint-3"
    names = {p.name for p in ckpt.iterdir()}
    assert {"adapter_model.safetensors", "adapter_config.json", "non_lora_trainables.safetensors",
            "trainer_state.json", "global_step3"} <= names, names


# --- 8. the 8-bit optimizer under ZeRO-3 ------------------------------------------------------------


def test_adamw_8bit_under_zero3_trains_and_saves_its_8bit_moments(zero3_main):
    """`training.optimizer: adamw_8bit` on two ZeRO-3 ranks (the main run): after step 1 the run logs how
    many trained values have 8-bit moments (ZeRO's flat partitions are what torchao's AdamW8bit sees;
    > 99 % must be quantized, or the run stops), the loss is finite, the weights move, and each rank's
    saved optimizer state holds the 8-bit moments and loads weights-only (test_resume_reaches_the_same_weights
    continues from them)."""
    pytest.importorskip("torchao")
    import re

    from torchao.optim.subclass_8bit import OptimState8bit

    from train.safe_load import safe_torch_load

    run = zero3_main.check_ok()
    counts = re.search(r"moments of (\d+) of (\d+) trained values in 8 bits", run.log)
    assert counts, run.log[-3000:]
    quantized, total = map(int, counts.groups())
    assert total > 0 and quantized >= 0.99 * total, counts.group(0)
    assert all(math.isfinite(v) for v in run.losses().values()) and sorted(run.losses()) == list(range(1, MAIN_STEPS + 1))
    half = MAIN_STEPS // 2
    first, second = (load_file(str(run.out / f"checkpoint-{n}" / "model.safetensors")) for n in (half, MAIN_STEPS))
    assert any(not torch.equal(first[k], second[k]) for k in first)
    shards = sorted((run.out / f"checkpoint-{MAIN_STEPS}").glob(f"global_step{MAIN_STEPS}/*optim_states.pt"))
    assert len(shards) == WORLD
    for shard in shards:
        states = safe_torch_load(shard)["optimizer_state_dict"]["optimizer_state_dict"]["state"]
        moments = [s["exp_avg"] for s in states.values()]
        assert moments and sum(m.numel() for m in moments if isinstance(m, OptimState8bit)) >= 0.99 * sum(
            m.numel() for m in moments), shard
