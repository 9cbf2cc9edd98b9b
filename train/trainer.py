"""`LongVUTrainer`: the HF Trainer (and its DeepSpeed integration) with what LongVU training needs.

- the modality/length-grouped batch sampler, rank-aware, resumable without decoding skipped samples;
- per-module learning rates and decay rules (`train.model_setup.param_groups`);
- bad samples counted across ranks and resumes, the run aborted past the configured fraction, no
  update from a step whose samples were all bad;
- the data position (epoch, batches consumed by all ranks) saved and mapped onto any process count;
- per-step metrics: tokens/s, frames in/kept, visual tokens per sample, bad samples, MFU, and
  `data_wait_s`: how long each step waited for its batch(es) from the loader;
- checkpoints that appear only once complete (written under `.staging/`, then renamed), the last K
  kept; LoRA checkpoints also hold the fully trained connector/projector and are verified non-empty;
- SIGTERM (preemption) saves a checkpoint at the end of the current step and stops cleanly.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import save_file
from torch.utils.data import DataLoader
from transformers import Trainer, TrainerCallback

from data.bad_samples import BadSampleTracker
from data.collate import NON_MODEL_KEYS
from longvu.constants import IGNORE_INDEX, QWEN_ENDOFTEXT_ID
from longvu.modeling import param_group
from train.checkpoints import (BAD_SAMPLES_FILE, CONNECTOR_FILE, DATA_POSITION_FILE, abandon_save, checkpoint_name,
                               staging_dir, verify_adapter, warn_if_low_space)
from train.lineage import publish_in_lineage
from train.safe_load import safe_loading
from train.metrics import FlopModel, peak_flops
from train.signals import GUARD, SigtermGuard
from train import optimizers
from train.model_setup import param_groups

logger = logging.getLogger(__name__)


def to_device(data: torch.Tensor, device: torch.device, dtype: torch.dtype | None) -> torch.Tensor:
    """`data` on `device`, a floating tensor cast to `dtype` (when given) there, after the copy: the copy
    goes in the tensor's own dtype, without blocking, from the loader's pinned memory. (`tensor.to(device,
    dtype)` casts on the host into unpinned memory and copies from that, blocking: a 240-frame video's
    fp32 pixels took ~55 ms of pageable copies a step on an H200.)"""
    moved = data.to(device, non_blocking=True)
    return moved.to(dtype) if dtype is not None and torch.is_floating_point(moved) else moved


class EpochLoader(DataLoader):
    """A DataLoader over a batch sampler that forwards `set_epoch` (the Trainer calls it per epoch)."""

    def set_epoch(self, epoch: int) -> None:
        self.batch_sampler.set_epoch(epoch)


class SkipFinalSaveCallback(TrainerCallback):
    """For `training.save_at_end: false`: undo the Trainer's own save at the last step (benchmarks)."""

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step >= state.max_steps and state.global_step % args.save_steps:
            control.should_save = False
        return control


class LowBitStateCheck(TrainerCallback):
    """For `training.optimizer: adamw_8bit`: after the first step (when the states exist), check that
    they are 8-bit (train.optimizers.check_low_bit_states)."""

    def on_step_end(self, args, state, control, optimizer=None, **kwargs):
        if state.global_step == 1 and optimizer is not None:
            optimizers.check_low_bit_states(optimizer)
        return control


class PreemptionCallback(TrainerCallback):
    """On SIGTERM (on any rank) once training runs: save at the end of the current step, then stop.
    Before that, `train.signals` stops the rank at once (nothing to save)."""

    def __init__(self, guard: SigtermGuard = GUARD):
        self.guard = guard
        self.triggered = False

    @property
    def requested(self) -> bool:
        return self.guard.requested

    def on_train_begin(self, args, state, control, **kwargs):
        self.guard.start_training()
        return control

    def on_step_end(self, args, state, control, **kwargs):
        flag = torch.tensor([1.0 if self.requested else 0.0])
        if dist.is_available() and dist.is_initialized():
            flag = flag.to(args.device)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)  # every rank stops at the same step
        if flag.item() > 0:
            logger.warning("SIGTERM received: saving a checkpoint at step %d and stopping", state.global_step)
            self.triggered = True
            control.should_save = True
            control.should_training_stop = True
        return control


class _TimedIterator:
    """Wraps the epoch iterator; `waited` accumulates the seconds spent in `next()`."""

    def __init__(self, iterator):
        self.iterator, self.waited = iterator, 0.0

    def __iter__(self):
        return self

    def __next__(self):
        start = time.perf_counter()
        try:
            return next(self.iterator)
        finally:
            self.waited += time.perf_counter() - start


class LongVUTrainer(Trainer):
    def __init__(self, *args, run_config, batch_sampler, bad_tracker: BadSampleTracker, **kwargs):
        super().__init__(*args, **kwargs)
        self.run_config = run_config
        self.batch_sampler = batch_sampler
        self.bad_tracker = bad_tracker
        longvu = self.model.get_base_model() if run_config.lora.enabled else self.model  # under the PeftModel
        self.flop_model = FlopModel.from_model(longvu, lora=run_config.lora.enabled)
        self._staging = False
        self._fetched = (0, 0)  # (epoch, batches this rank fetched in it)
        self._resume_epoch: int | None = None
        self._window = {"tokens": 0, "flops": 0.0, "samples": 0, "frames_in": 0, "frames_kept": 0,
                        "visual_tokens": 0, "media": 0, "data_wait": 0.0, "start": time.perf_counter()}

    # ---- data ----------------------------------------------------------------------------------

    def get_train_dataloader(self) -> DataLoader:
        d = self.run_config.data
        workers = d.num_workers
        return EpochLoader(
            self.train_dataset, batch_sampler=self.batch_sampler, collate_fn=self.data_collator,
            num_workers=workers, prefetch_factor=d.prefetch_factor if workers else None,
            persistent_workers=workers > 0, pin_memory=torch.cuda.is_available(),
        )

    def resume_data_at(self, position: dict) -> None:
        """Continue the data where a checkpoint's `data_position()` left it, on any number of ranks."""
        self._resume_epoch = self.batch_sampler.resume_at(int(position["epoch"]), int(position["consumed"]))

    def data_position(self) -> dict:
        """Where the data stands: the epoch and how many of its batches every rank together consumed."""
        epoch = self.batch_sampler.epoch
        fetched = self._fetched[1] if self._fetched[0] == epoch else 0
        return {"epoch": epoch, "consumed": self.batch_sampler.consumed + fetched * self.args.world_size,
                "world_size": self.args.world_size}

    def _sync_learning_rates(self) -> None:
        """After a resume, set the optimizer's rates to the schedule at the restored step: the loaded
        optimizer holds the rate of the old schedule, which a changed max_steps would otherwise keep
        for the first resumed step."""
        sched = getattr(self.lr_scheduler, "scheduler", self.lr_scheduler)  # under the DeepSpeed wrapper
        if not isinstance(sched, torch.optim.lr_scheduler.LambdaLR):
            return
        rates = [base * f(sched.last_epoch) for base, f in zip(sched.base_lrs, sched.lr_lambdas)]
        for group, rate in zip(sched.optimizer.param_groups, rates):
            if isinstance(group["lr"], torch.Tensor):  # torchao's optimizers keep it a tensor (compiled step)
                group["lr"].fill_(rate)
            else:
                group["lr"] = rate
        sched._last_lr = rates

    def _prepare_for_training(self, max_steps, train_dataloader, resume_from_checkpoint):
        with safe_loading():  # DeepSpeed loads the checkpoint's states here: weights-only (train.safe_load)
            prepared = super()._prepare_for_training(max_steps, train_dataloader, resume_from_checkpoint)
        if resume_from_checkpoint:  # the optimizer and schedule are loaded by now
            self._sync_learning_rates()
        return prepared

    def set_initial_training_values(self, args, dataloader):
        values = list(super().set_initial_training_values(args, dataloader))
        if self._resume_epoch is not None and args.max_steps > 0:
            # epochs are counted from the data's; each gives >= 1 step, the run stops at max_steps
            values[0] = max(values[0], self._resume_epoch + args.max_steps)
        return tuple(values)

    def _init_training_state(self, *args, **kwargs):
        """With a data position, the sampler resumes mid-epoch itself: the Trainer skips no batches and
        starts at the data's epoch (its own arithmetic assumes the process count that saved)."""
        epochs_trained, steps_trained = super()._init_training_state(*args, **kwargs)
        if self._resume_epoch is None:
            return epochs_trained, steps_trained
        return self._resume_epoch, 0

    # ---- optimisation --------------------------------------------------------------------------

    def create_optimizer(self, model=None):
        if self.optimizer is None:
            groups = param_groups(self.model, self.run_config)
            for g in groups:
                logger.info("param group %-20s lr %.2e wd %.2g: %d tensors, %d params", g.name, g.lr,
                            g.weight_decay, len(g.params), sum(p.numel() for p in g.params))
            specs = [{"params": g.params, "lr": g.lr, "weight_decay": g.weight_decay, "name": g.name} for g in groups]
            self._group_names = [g.name.removesuffix("_no_decay") for g in groups]
            betas, eps = (self.args.adam_beta1, self.args.adam_beta2), self.args.adam_epsilon
            self.optimizer = optimizers.build(self.run_config.training.optimizer, specs, betas, eps)
            if self.optimizer is None:
                optim_cls, optim_kwargs = Trainer.get_optimizer_cls_and_kwargs(self.args, self.model)
                if self._offloads_optimizer():
                    from deepspeed.ops.adam import DeepSpeedCPUAdam

                    optim_cls, optim_kwargs = DeepSpeedCPUAdam, {"betas": betas, "eps": eps}
                optim_kwargs.pop("lr", None)
                self.optimizer = optim_cls(specs, **optim_kwargs)
        return self.optimizer

    def _offloads_optimizer(self) -> bool:
        hf_ds = getattr(self.args, "hf_deepspeed_config", None)  # set only when DeepSpeed is configured
        ds = hf_ds.config if hf_ds else {}
        return optimizers.offloads_optimizer(ds.get("zero_optimization", {}))

    # ---- forward and metrics ------------------------------------------------------------------

    def _prepare_input(self, data):
        """Tensors to the device (see `to_device`), floating ones in DeepSpeed's dtype as the Trainer's own."""
        if not isinstance(data, torch.Tensor):
            return super()._prepare_input(data)  # containers: each element comes back here
        ds_dtype = self.accelerator.state.deepspeed_plugin.hf_ds_config.dtype() if self.is_deepspeed_enabled else None
        return to_device(data, self.args.device, ds_dtype)

    def _prepare_inputs(self, inputs: dict) -> dict:
        """Move tensors to the device; frame sizes (named tuples) and skipped-sample records pass as they are."""
        kept = {k: inputs.pop(k) for k in ("media_sizes", "skipped") if k in inputs}
        return super()._prepare_inputs(inputs) | kept

    def get_batch_samples(self, epoch_iterator, num_batches, device):
        """One optimizer step's micro-batches, with the time spent waiting on the loader added to the log
        window (`data_wait_s`; the token count and its all-reduce are not counted); when no rank has a
        single good sample in them, the step is marked to make no update (no forward or backward, so no
        parameter changes; the step still counts towards global_step)."""
        timed = _TimedIterator(epoch_iterator)
        batches, num_items = super().get_batch_samples(timed, num_batches, device)
        self._window["data_wait"] += timed.waited
        epoch = self.batch_sampler.epoch
        fetched = self._fetched[1] if self._fetched[0] == epoch else 0
        self._fetched = (epoch, fetched + len(batches))
        good = torch.tensor([float(sum(int(b["input_ids"].shape[0]) for b in batches))])
        if dist.is_available() and dist.is_initialized():
            good = good.to(self.args.device)
            dist.all_reduce(good)
        self._no_update = bool(batches) and good.item() == 0
        if self._no_update:
            self.bad_tracker.steps_without_update += 1
            logger.warning("step %d: every sample of the batch was bad on every rank: no optimizer step",
                           self.state.global_step + 1)
        return batches, num_items

    def training_step(self, model, inputs, num_items_in_batch=None):
        if getattr(self, "_no_update", False):
            self.bad_tracker.update(0, inputs.get("skipped", []), check=False)
            return torch.zeros((), device=self.args.device)
        return super().training_step(model, inputs, num_items_in_batch)

    def bad_sample_totals(self) -> dict:
        """The run's bad-sample counts, summed over ranks (a collective: every rank calls it)."""
        mine = self.bad_tracker.summary()
        if not (dist.is_available() and dist.is_initialized()):
            return self.bad_tracker.totals([mine])
        every: list = [None] * dist.get_world_size()
        dist.all_gather_object(every, mine)
        return self.bad_tracker.totals(every)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        skipped = inputs.pop("skipped", [])
        for key in NON_MODEL_KEYS:
            inputs.pop(key, None)
        n_good = int(inputs["input_ids"].shape[0])
        if model.training:  # eval batches count neither as training samples nor in the step metrics
            self.bad_tracker.update(n_good, skipped, check=False)  # the run's counts: _window_metrics
        if n_good == 0:  # every sample of this batch was bad: a no-op step keeps the ranks in step
            inputs = self._empty_batch(inputs["input_ids"].device)
        outputs = model(**inputs, num_items_in_batch=num_items_in_batch)
        if model.training:
            self._record(inputs, outputs.media, n_good)
        loss = outputs.loss
        if self.args.average_tokens_across_devices and num_items_in_batch is not None:
            # num_items_in_batch counts every rank's tokens and the gradients are averaged over ranks:
            # scale back up, as Trainer.compute_loss does, so the loss (and its gradient) is the global mean
            loss = loss * self.accelerator.num_processes
        return (loss, outputs) if return_outputs else loss

    @staticmethod
    def _empty_batch(device) -> dict:
        ids = torch.full((1, 1), QWEN_ENDOFTEXT_ID, dtype=torch.long, device=device)
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": torch.full_like(ids, IGNORE_INDEX)}

    def _record(self, inputs: dict, stats, n_good: int) -> None:
        """Add one forward's tokens, frames and FLOPs (`stats`: its output's MediaStats) to the log window."""
        if stats is None or n_good == 0:
            return
        scored = int((inputs["labels"] != IGNORE_INDEX).sum()) if "labels" in inputs else 0
        w = self._window
        w["tokens"] += sum(stats.sequence_lengths)
        w["samples"] += n_good
        w["frames_in"] += sum(stats.frames_in)
        w["frames_kept"] += sum(stats.frames_kept)
        w["visual_tokens"] += sum(stats.visual_tokens)
        w["media"] += len(stats.visual_tokens)
        w["flops"] += self.flop_model.step_flops(stats.sequence_lengths, scored, sum(stats.frames_in),
                                                 sum(stats.frames_kept))

    def log(self, logs: dict, start_time: float | None = None) -> None:
        if "learning_rate" in logs and self.optimizer is not None:  # HF's: the first group's only
            del logs["learning_rate"]
            logs.update(self._group_learning_rates())
        if "loss" in logs:
            logs.update(self._window_metrics())
        super().log(logs, start_time)

    def _group_learning_rates(self) -> dict[str, float]:
        """`lr/GROUP` for each parameter group (connector, projector, llm, lora, towers; a group's
        no-decay half shares its rate), as the scheduler has set them. Names go by position: a universal
        checkpoint's optimizer state comes back with its groups in order but unnamed."""
        rates: dict[str, float] = {}
        for name, group in zip(self._group_names, self.optimizer.param_groups, strict=True):
            rates.setdefault(f"lr/{name}", float(group["lr"]))
        return rates

    def _window_metrics(self) -> dict:
        """Metrics since the last log, summed over ranks (one small all-reduce per logging step)."""
        w = self._window
        keys = ("tokens", "flops", "samples", "frames_in", "frames_kept", "visual_tokens", "media", "data_wait")
        values = torch.tensor([float(w[k]) for k in keys] + [float(self.bad_tracker.bad), float(self.bad_tracker.seen)],
                              dtype=torch.float64)
        if dist.is_available() and dist.is_initialized():
            values = values.to(self.args.device)
            dist.all_reduce(values)
        total = dict(zip(keys + ("bad", "seen"), values.tolist()))
        before = self.bad_tracker.before
        total["bad"], total["seen"] = total["bad"] + before["bad"], total["seen"] + before["seen"]
        elapsed = max(time.perf_counter() - w["start"], 1e-9)
        samples = max(total["samples"], 1.0)
        metrics = {
            "tokens_per_s": total["tokens"] / elapsed,
            "frames_in_per_sample": total["frames_in"] / samples,
            "frames_kept_per_sample": total["frames_kept"] / samples,
            "visual_tokens_per_sample": total["visual_tokens"] / samples,
            "bad_samples_skipped": total["bad"],
            "step_time_s": elapsed / self.args.logging_steps,
            "data_wait_s": total["data_wait"] / self.args.world_size / self.args.logging_steps,  # per step, rank mean
        }
        if self.args.device.type == "cuda":
            metrics["peak_memory_gib"] = torch.cuda.max_memory_allocated(self.args.device) / 2**30
            metrics["peak_reserved_gib"] = torch.cuda.max_memory_reserved(self.args.device) / 2**30  # what the card needs
        peak = peak_flops(self.args.device)
        if peak:
            metrics["mfu"] = total["flops"] / elapsed / (peak * self.args.world_size)
        self._window = dict.fromkeys(keys, 0) | {"start": time.perf_counter()}
        # seen/bad summed over ranks; the breakdown by error code is this rank's
        self.bad_tracker.check({"seen": int(total["seen"]), "bad": int(total["bad"]),
                                "by_code": self.bad_tracker.totals()["by_code"]})
        return metrics

    # ---- evaluation ----------------------------------------------------------------------------

    def evaluation_loop(self, *args, **kwargs):
        """The Trainer's eval loss, plus `<prefix>_mcq_accuracy` over the eval manifest's MCQ records
        (train.evaluation.train_eval; all ranks) when `training.eval.mcq`."""
        output = super().evaluation_loop(*args, **kwargs)
        if self.run_config.training.eval.mcq and self.eval_dataset is not None:
            from train.evaluation.train_eval import mcq_accuracy, mcq_indices

            if mcq_indices(self.eval_dataset.records):
                # evaluation_loop(dataloader, description, prediction_loss_only, ignore_keys, metric_key_prefix)
                prefix = kwargs.get("metric_key_prefix", args[4] if len(args) > 4 else "eval")
                acc, n = mcq_accuracy(self.model, self.eval_dataset, self.processing_class, self.args.device,
                                      self.args.process_index, self.args.world_size)
                output.metrics[f"{prefix}_mcq_accuracy"] = acc
                output.metrics[f"{prefix}_mcq_n"] = n
        return output

    # ---- checkpoints ---------------------------------------------------------------------------

    def _get_output_dir(self, trial):
        if self._staging:
            return str(staging_dir(self.args.output_dir))
        return super()._get_output_dir(trial)

    def _save_checkpoint(self, model, trial):
        """Write `checkpoint-N` under `.staging/` (with the run's bad-sample counts and data position),
        then record it in the run's lineage, rename it into place and keep the last K."""
        staged = staging_dir(self.args.output_dir) / checkpoint_name(self.state.global_step)
        if self.args.should_save:
            warn_if_low_space(self.args.output_dir)
        self._staging = True
        try:
            super()._save_checkpoint(model, trial)
            if self.run_config.lora.enabled:
                self._save_connector(staged)
            bad = self.bad_sample_totals()  # over all ranks
            if self.args.should_save:
                (staged / BAD_SAMPLES_FILE).write_text(json.dumps(bad))  # restored on resume (run-level limit)
                (staged / DATA_POSITION_FILE).write_text(json.dumps(self.data_position()))
            self._barrier()
            if self.args.should_save:
                if self.run_config.lora.enabled:
                    verify_adapter(staged)
                best = f"checkpoint-{self.state.best_global_step}" if self.state.best_global_step else None
                publish_in_lineage(staged, self.args.output_dir, self.run_config.training.keep_last, keep=best)
        except OSError as err:  # e.g. ENOSPC: the staged files go, the previous checkpoints stay
            raise abandon_save(staged, self.args.output_dir, err) from err
        finally:
            self._staging = False
        self._barrier()

    # resume: every pickle of the checkpoint (DeepSpeed's shards, optimizer, scheduler, rng states)
    # loads weights-only (train.safe_load), whatever DeepSpeed or the Trainer asks torch.load for

    def _load_from_checkpoint(self, *args, **kwargs):
        with safe_loading():
            return super()._load_from_checkpoint(*args, **kwargs)

    def _load_rng_state(self, *args, **kwargs):
        with safe_loading():
            return super()._load_rng_state(*args, **kwargs)

    def _save_connector(self, out_dir: Path) -> None:
        """The fully trained non-LoRA parameters (connector, projector), gathered under ZeRO-3."""
        named = [(n, p) for n, p in self.model.named_parameters()
                 if p.requires_grad and "lora_" not in n and param_group(n).trains_beside_lora]
        params = [p for _, p in named]
        if self.is_deepspeed_enabled and any(hasattr(p, "ds_id") for p in params):
            import deepspeed

            with deepspeed.zero.GatheredParameters(params):
                state = {_plain_name(n): p.detach().cpu().clone() for n, p in named}
        else:
            state = {_plain_name(n): p.detach().cpu().clone() for n, p in named}
        if self.args.should_save:
            out_dir.mkdir(parents=True, exist_ok=True)
            save_file(state, str(out_dir / CONNECTOR_FILE))

    def _barrier(self) -> None:
        if dist.is_available() and dist.is_initialized():
            dist.barrier()


def _plain_name(name: str) -> str:
    """A parameter name under PEFT wrappers -> the LongVU state-dict key."""
    return name.removeprefix("base_model.model.")
