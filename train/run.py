"""Train in this process (one rank of a distributed launch, or a single process)."""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

import torch

from train.config import RunConfig, config_to_dict
from train.preflight import load_deepspeed_json

logger = logging.getLogger(__name__)
BAD_DATA_EXIT = 65  # EX_DATAERR: more bad samples than data.max_bad_fraction


def _rank() -> int:
    return int(os.environ.get("RANK", "0"))


def setup_logging() -> None:
    level = logging.INFO if _rank() == 0 else logging.WARNING
    logging.basicConfig(level=level, format=f"[%(asctime)s rank{_rank()}] %(levelname)s %(name)s: %(message)s")


def deepspeed_config(config: RunConfig) -> dict | None:
    """The run's DeepSpeed JSON as a dict ("auto" values are resolved by the Trainer from the run config);
    a relative path is looked up in the working directory, then in this project (train.preflight).
    ZeRO-3 always gathers 16-bit weights on save, so saved models and LoRA adapters hold real tensors."""
    if not config.deepspeed:
        return None
    ds = load_deepspeed_json(config.deepspeed)
    zero = ds.setdefault("zero_optimization", {})
    if zero.get("stage") == 3:
        zero["stage3_gather_16bit_weights_on_model_save"] = True
    return ds


def _barrier():
    """torch.distributed's barrier when the ranks are connected, else None (one process)."""
    import torch.distributed as dist

    return dist.barrier if dist.is_available() and dist.is_initialized() else None


def build_dataset(config: RunConfig, tokenizer, model_config):
    """The dataset (one manifest or a mixture), its batch sampler, the records per source and the
    most frames and images one of its batches can hold (`data.sampler.batch_media_bound`).

    Media are probed, and conversations counted with the tokenizer, before step 1 once per run:
    each rank takes its share, the ranks merge their results in the run folder's
    ``media_metadata.json``, which a resumed run reuses; records whose manifest holds their probe
    open no file. The sampler's lengths are those exact text tokens plus the visual-token bound of
    each record's media.
    """
    from data.dataset import DataConfig, LongVUDataset
    from data.metadata import MetadataCache, estimate_lengths, probe_shared
    from data.mixture import load_mixture
    from data.sampler import ModalityLengthBatchSampler, PackingBatchSampler, batch_media_bound, sampler_inputs
    from data.video import SamplingConfig

    d = config.data
    mixture = load_mixture(d.train_manifest, config.training.seed, d.media_root)
    sampling = SamplingConfig(video_fps=d.video_fps, max_frames=d.max_frames, backend=d.decode_backend,
                              max_side=d.decode_max_side)
    data_cfg = DataConfig(manifest=str(d.train_manifest), media_root=d.media_root,
                          model_max_length=model_config.tokenizer_model_max_length, sampling=sampling,
                          siglip_size=model_config.siglip_image_size, dino_size=model_config.dino_image_size,
                          decode_timeout_s=d.decode_timeout_s)
    dataset = LongVUDataset(data_cfg, tokenizer, mixture.records, mixture.roots)
    counts = mixture.counts()
    logger.info("training records per source: %s (%d in all)", counts, len(dataset))
    cache = MetadataCache(Path(config.training.output_dir) / "media_metadata.json", timeout_s=d.decode_timeout_s)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    probe_shared(dataset.records, mixture.roots, sampling, cache, _rank(), world, _barrier(), tokenizer)
    estimates = estimate_lengths(dataset.records, mixture.roots, sampling, model_config, cache,
                                 progress=_rank() == 0, tokenizer=tokenizer)
    lengths, modalities = sampler_inputs(estimates)
    media_bound = batch_media_bound(lengths, [e.media_items if e is not None else 0 for e in estimates],
                                    d.max_tokens_per_batch, None if d.packing else d.per_device_batch_size)
    if d.packing:
        sampler = PackingBatchSampler(lengths, d.max_tokens_per_batch, seed=config.training.seed, rank=_rank(),
                                      world_size=world)
    else:
        sampler = ModalityLengthBatchSampler(lengths, modalities, d.max_tokens_per_batch, d.per_device_batch_size,
                                             seed=config.training.seed, rank=_rank(), world_size=world)
    return dataset, sampler, counts, media_bound


def training_arguments(config: RunConfig, use_cpu: bool):
    """The HF TrainingArguments of a run (the DeepSpeed config's "auto" values are filled from them)."""
    from transformers import TrainingArguments

    from train.model_setup import DTYPES

    t, dtype = config.training, DTYPES[config.model.dtype]
    return TrainingArguments(
        output_dir=str(Path(t.output_dir)), per_device_train_batch_size=1,
        gradient_accumulation_steps=t.gradient_accumulation_steps,
        learning_rate=t.learning_rate, weight_decay=t.weight_decay, lr_scheduler_type=t.lr_scheduler,
        warmup_steps=t.warmup_ratio, num_train_epochs=t.num_train_epochs, max_steps=t.max_steps,
        max_grad_norm=t.max_grad_norm, bf16=dtype is torch.bfloat16, fp16=dtype is torch.float16,
        logging_steps=t.logging_steps, save_strategy="steps", save_steps=t.save_steps, save_total_limit=None,
        report_to=t.report_to, run_name=t.run_name, seed=t.seed, deepspeed=deepspeed_config(config),
        use_cpu=use_cpu, ddp_backend="gloo" if use_cpu else None, remove_unused_columns=False,
        dataloader_num_workers=config.data.num_workers, **eval_arguments(config, bool(t.eval.manifest)),
    )


def build_eval_dataset(config: RunConfig, tokenizer, model_config):
    """The held-out manifest of `training.eval` as a LongVUDataset (media next to it), or None."""
    from data.dataset import DataConfig, LongVUDataset
    from data.video import SamplingConfig

    manifest, d = config.training.eval.manifest, config.data
    if not manifest:
        return None
    sampling = SamplingConfig(video_fps=d.video_fps, max_frames=d.max_frames, backend=d.decode_backend,
                              max_side=d.decode_max_side)
    return LongVUDataset(DataConfig(manifest=manifest, media_root=str(Path(manifest).resolve().parent),
                                    model_max_length=model_config.tokenizer_model_max_length, sampling=sampling,
                                    siglip_size=model_config.siglip_image_size, dino_size=model_config.dino_image_size,
                                    decode_timeout_s=d.decode_timeout_s), tokenizer)


def eval_arguments(config: RunConfig, has_eval: bool) -> dict:
    """TrainingArguments for `training.eval`: eval every eval_steps, loss only (the MCQ accuracy is
    added by LongVUTrainer.evaluation_loop), the best-metric settings."""
    e = config.training.eval
    if not has_eval:
        return {"eval_strategy": "no"}
    best = {"loss": ("eval_loss", False), "mcq_accuracy": ("eval_mcq_accuracy", True)}.get(e.best_metric)
    return {"eval_strategy": "steps", "eval_steps": e.eval_steps, "per_device_eval_batch_size": 1,
            "prediction_loss_only": True, "metric_for_best_model": best[0] if best else None,
            "greater_is_better": best[1] if best else None}


def train_in_process(config: RunConfig) -> int:
    """Train, resuming if asked, and save -> exit code (143 when SIGTERM stops start-up)."""
    from data.bad_samples import TooManyBadSamples
    from train.lineage import RunFolderRefused
    from train.run_lock import RunFolderLocked
    from train.signals import SIGTERM_EXIT, StoppedBeforeTraining

    setup_logging()
    try:
        return _train(config)
    except (RunFolderLocked, RunFolderRefused) as err:
        logger.error("%s", err)
        return 2
    except TooManyBadSamples as err:  # raised on every rank at the same step (the counts are the run's)
        logger.error("stopped: %s", err)
        return BAD_DATA_EXIT
    except StoppedBeforeTraining:
        logger.warning("SIGTERM during start-up (before step 1): stopping; nothing trained, nothing saved "
                       "(exit status %d)", SIGTERM_EXIT)
        return SIGTERM_EXIT


def _hold_run_folder(config: RunConfig):
    """Run directly under torchrun/deepspeed (not via `longvu train`): rank 0 locks the run folder for
    this process's life and decides where the run starts. -> the lock (None when not taken here)."""
    from train.lineage import plan_run
    from train.run_lock import HELD_ENV, RunLock

    if os.environ.get(HELD_ENV) or _rank() != 0:
        return None
    lock = RunLock(config.training.output_dir).acquire()
    plan_run(config, apply=True)
    return lock


def _restore(checkpoint: str, trainer, tracker, args, out: Path) -> str:
    """What the Trainer does not restore itself: the run's bad-sample counts (so data.max_bad_fraction
    applies to the whole run) and the data position (on any process count). -> the folder to load."""
    from train.checkpoints import BAD_SAMPLES_FILE, DATA_POSITION_FILE

    logger.info("resuming from %s", checkpoint)
    if (counts := Path(checkpoint, BAD_SAMPLES_FILE)).is_file():
        tracker.restore(json.loads(counts.read_text()))
    if (position := Path(checkpoint, DATA_POSITION_FILE)).is_file():
        trainer.resume_data_at(json.loads(position.read_text()))
    return _loadable(checkpoint, args, out, trainer.run_config.training.optimizer)


def _loadable(checkpoint: str, args, out: Path, optimizer: str) -> str:
    """The folder the Trainer resumes from: the checkpoint, or, when another number of DeepSpeed
    processes saved it, its universal view (`train.reshard`), which the engine re-partitions
    (refused for `optimizer` adamw_8bit: CheckpointError)."""
    from train.reshard import RESHARD_DIR, saved_world_size, universal_view
    from train.safe_load import CheckpointError

    saved = saved_world_size(checkpoint)
    if not args.deepspeed or saved is None or saved == args.world_size:
        return checkpoint
    if optimizer == "adamw_8bit":
        raise CheckpointError(f"{checkpoint}: saved by {saved} processes with training.optimizer=adamw_8bit; "
                              "re-partitioning covers fp32 Adam moments only, so resume it on "
                              f"{saved} processes (--nproc {saved}), not {args.world_size}")
    logger.info("%s was saved by %d processes; resuming on %d: re-partitioning its DeepSpeed states", checkpoint,
                saved, args.world_size)
    if _rank() == 0:
        from train.safe_load import safe_loading

        with safe_loading():  # DeepSpeed's conversion reads the shards: weights-only here too
            universal_view(checkpoint, out)
    if (barrier := _barrier()) is not None:
        barrier()
    args.hf_deepspeed_config.config.setdefault("checkpoint", {})["load_universal"] = True
    return str(out / RESHARD_DIR / Path(checkpoint).name)


def _train(config: RunConfig) -> int:
    from transformers import set_seed

    from data.bad_samples import BadSampleTracker
    from data.collate import Collator
    from longvu.tokenizer import load_tokenizer
    from train.lineage import plan_run
    from train.model_setup import (DTYPES, apply_lora, apply_speed_options, count_parameters, fp8_lora_base, load_model,
                                   set_trainable)
    from train.checkpoints import staging_dir, verify_on_ranks
    from train.gpu_memory import cap_gpu_memory
    from train.profiling import StepProfiler
    from train.safe_load import safe_loading
    from train.trainer import LongVUTrainer, LowBitStateCheck, PreemptionCallback, SkipFinalSaveCallback

    t = config.training
    set_seed(t.seed)
    out = Path(t.output_dir)
    lock = _hold_run_folder(config)  # noqa: F841 (held until this process exits)
    if _rank() == 0:
        out.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(staging_dir(out), ignore_errors=True)  # an interrupted save is never resumed from
        (out / "run_config.json").write_text(json.dumps(config_to_dict(config), indent=2))

    os.environ.setdefault("TENSORBOARD_LOGGING_DIR", str(out / "logs"))
    os.environ.setdefault("WANDB_DIR", str(out))
    if "wandb" in t.report_to and not os.environ.get("WANDB_API_KEY"):
        os.environ.setdefault("WANDB_MODE", "offline")  # no credentials: log locally (`wandb sync` later)
    preemption = PreemptionCallback()
    use_cpu = not torch.cuda.is_available()
    dtype = DTYPES[config.model.dtype]
    tokenizer = load_tokenizer(config.model.tokenizer)
    # loaded before TrainingArguments exists: with ZeRO-3 configured, HF would otherwise partition the
    # model at load time (zero.Init), towers included, and the towers must stay whole on every rank
    with safe_loading():  # model.init's weights (e.g. a released pytorch_model.bin) load weights-only
        model = load_model(config)
    longvu_model = model
    set_trainable(model, config)
    args = training_arguments(config, use_cpu)
    if args.device.type == "cuda":
        cap_gpu_memory(args.device, t.gpu_memory_gib)  # before anything of this run is on the GPU
    model.model.towers.to(args.device, dtype)  # frozen, outside DeepSpeed: a full copy per rank
    if (barrier := _barrier()) is not None:
        barrier()  # the run folder is prepared (rank 0 or `longvu train`) before anyone reads it
    plan = plan_run(config, apply=False)
    if plan.finished:
        logger.info("%s is at step %d, the configured end: nothing to train", plan.resume, plan.step)
        return 0
    model_config = model.config
    eval_dataset = build_eval_dataset(config, tokenizer, model_config)
    if config.lora.enabled:
        if config.lora.quantize == "4bit":  # QLoRA: quantized on the run's device, one layer at a time
            from longvu.quantize import quantize_llm_nf4

            logger.info("lora.quantize 4bit: %d decoder linear layers in NF4", quantize_llm_nf4(model, args.device))
        model = apply_lora(model, config)
        if config.lora.quantize == "fp8":  # after peft, which wraps nn.Linear layers: their base layers go FP8
            fp8_lora_base(longvu_model, args.device)
    dataset, sampler, source_counts, media_per_batch = build_dataset(config, tokenizer, model_config)
    apply_speed_options(longvu_model, model, config, args, media_per_batch)
    logger.info("trainable parameters: %s", count_parameters(model))

    tracker = BadSampleTracker(config.data.max_bad_fraction, config.data.bad_min_samples)
    trainer = LongVUTrainer(
        model=model, args=args, train_dataset=dataset, eval_dataset=eval_dataset,
        data_collator=Collator(pack=config.data.packing),
        processing_class=tokenizer,
        callbacks=([] if t.save_at_end else [SkipFinalSaveCallback()]) + [preemption]
        + ([LowBitStateCheck()] if t.optimizer == "adamw_8bit" else []) + (
            [StepProfiler(out / "profile", _rank(), t.profile_from_step, t.profile_steps)] if t.profile_steps else []),
        run_config=config, batch_sampler=sampler, bad_tracker=tracker,
    )
    if plan.resume:
        verify_on_ranks(plan.resume)  # its files match its manifest, its pickles load weights-only
    load_from = _restore(plan.resume, trainer, tracker, args, out) if plan.resume else None
    trainer.train(resume_from_checkpoint=load_from)
    if load_from != plan.resume and _rank() == 0:  # a universal view (train.reshard)
        shutil.rmtree(Path(load_from).parent, ignore_errors=True)
    bad = trainer.bad_sample_totals()
    if _rank() == 0:
        saved = [str(p) for p in sorted(out.glob("checkpoint-*"))]
        logger.info("done: step %d, checkpoints %s, logs %s, bad samples %s", trainer.state.global_step, saved,
                    out / "logs", bad)
        (out / "run_summary.json").write_text(json.dumps({
            "global_step": trainer.state.global_step, "checkpoints": saved, "preempted": preemption.triggered,
            "bad_samples": bad, "data_sources": source_counts, "log_history": trainer.state.log_history,
        }, indent=2, default=str))
    _leave_process_group()
    return 0


def _leave_process_group() -> None:
    """Every rank done: leave torch.distributed before the interpreter exits (gloo's worker threads,
    left to the interpreter's teardown, can abort a finished rank: "terminate called without an
    active exception")."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
