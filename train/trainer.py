"""`LongVUTrainer`: the HF Trainer (and its DeepSpeed integration) with what LongVU training needs.

- the modality/length-grouped batch sampler, rank-aware, resumable without decoding skipped samples;
- per-module learning rates and decay rules (`train.model_setup.param_groups`);
- bad samples counted across ranks and the run aborted past the configured fraction;
- per-step metrics: tokens/s, frames in/kept, visual tokens per sample, bad samples, MFU, and
  `data_wait_s`: how long each step waited for its batch(es) from the loader;
- checkpoints that appear only once complete (written under `.staging/`, then renamed), the last K
  kept; LoRA checkpoints also hold the fully trained connector/projector and are verified non-empty;
- SIGTERM (preemption) saves a checkpoint at the end of the current step and stops cleanly.
"""

from __future__ import annotations

import logging
import signal
import time
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import save_file
from torch.utils.data import DataLoader
from transformers import Trainer, TrainerCallback

from data.bad_samples import BadSampleTracker, TooManyBadSamples
from data.collate import NON_MODEL_KEYS
from longvu.constants import IGNORE_INDEX, QWEN_ENDOFTEXT_ID
from longvu.modeling import param_group
from train.checkpoints import (CONNECTOR_FILE, abandon_save, checkpoint_name, publish_checkpoint, staging_dir,
                               verify_adapter, warn_if_low_space)
from train.safe_load import safe_loading
from train.metrics import FlopModel, peak_flops
from train.model_setup import param_groups

logger = logging.getLogger(__name__)

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


class PreemptionCallback(TrainerCallback):
    """On SIGTERM (on any rank): save at the end of the current step, then stop."""

    def __init__(self):
        self.requested = False
        self.triggered = False

    def install(self) -> None:
        signal.signal(signal.SIGTERM, self._on_signal)

    def _on_signal(self, signum, frame) -> None:
        self.requested = True

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

    def get_batch_samples(self, epoch_iterator, *args, **kwargs):
        """The Trainer's batch fetch for one optimiser step, with the time spent waiting on the loader
        added to the log window (the token count and its all-reduce are not counted)."""
        timed = _TimedIterator(epoch_iterator)
        batches = super().get_batch_samples(timed, *args, **kwargs)
        self._window["data_wait"] += timed.waited
        return batches

    # ---- optimisation --------------------------------------------------------------------------

    def create_optimizer(self, model=None):
        if self.optimizer is None:
            groups = param_groups(self.model, self.run_config)
            for g in groups:
                logger.info("param group %-20s lr %.2e wd %.2g: %d tensors, %d params", g.name, g.lr,
                            g.weight_decay, len(g.params), sum(p.numel() for p in g.params))
            specs = [{"params": g.params, "lr": g.lr, "weight_decay": g.weight_decay, "name": g.name} for g in groups]
            optim_cls, optim_kwargs = Trainer.get_optimizer_cls_and_kwargs(self.args, self.model)
            if self._offloads_optimizer():
                from deepspeed.ops.adam import DeepSpeedCPUAdam

                optim_cls, optim_kwargs = DeepSpeedCPUAdam, {"betas": (self.args.adam_beta1, self.args.adam_beta2),
                                                            "eps": self.args.adam_epsilon}
            optim_kwargs.pop("lr", None)
            self.optimizer = optim_cls(specs, **optim_kwargs)
        return self.optimizer

    def _offloads_optimizer(self) -> bool:
        hf_ds = getattr(self.args, "hf_deepspeed_config", None)  # set only when DeepSpeed is configured
        ds = hf_ds.config if hf_ds else {}
        device = ds.get("zero_optimization", {}).get("offload_optimizer", {}).get("device", "none")
        return device not in (None, "none")

    # ---- forward and metrics ------------------------------------------------------------------

    def _prepare_inputs(self, inputs: dict) -> dict:
        """Move tensors to the device; frame sizes (named tuples) and skipped-sample records pass as they are."""
        kept = {k: inputs.pop(k) for k in ("media_sizes", "skipped") if k in inputs}
        return super()._prepare_inputs(inputs) | kept

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        skipped = inputs.pop("skipped", [])
        for key in NON_MODEL_KEYS:
            inputs.pop(key, None)
        n_good = int(inputs["input_ids"].shape[0])
        if model.training:  # eval batches count neither as training samples nor in the step metrics
            self.bad_tracker.update(n_good, skipped)
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
        no-decay half shares its rate), as the scheduler has set them."""
        rates: dict[str, float] = {}
        for i, group in enumerate(self.optimizer.param_groups):
            name = str(group.get("name", f"group{i}")).removesuffix("_no_decay")
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
        peak = peak_flops(self.args.device)
        if peak:
            metrics["mfu"] = total["flops"] / elapsed / (peak * self.args.world_size)
        self._window = dict.fromkeys(keys, 0) | {"start": time.perf_counter()}
        if total["seen"] >= self.bad_tracker.min_samples and total["bad"] > self.bad_tracker.max_bad_fraction * total["seen"]:
            raise TooManyBadSamples(
                f"{int(total['bad'])} of {int(total['seen'])} samples could not be loaded (limit "
                f"{self.bad_tracker.max_bad_fraction:.1%}); run `longvu data validate` on the manifest")
        return metrics

    # ---- evaluation ----------------------------------------------------------------------------

    def evaluation_loop(self, *args, **kwargs):
        """The Trainer's eval loss, plus `<prefix>_mcq_accuracy` over the eval manifest's MCQ records
        (train.evaluation.train_eval; all ranks) when `training.eval.mcq`."""
        output = super().evaluation_loop(*args, **kwargs)
        if self.run_config.training.eval.mcq and self.eval_dataset is not None:
            from train.evaluation.train_eval import mcq_accuracy, mcq_indices

            if mcq_indices(self.eval_dataset.records):
                prefix = kwargs.get("metric_key_prefix", args[3] if len(args) > 3 else "eval")
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
        """Write `checkpoint-N` under `.staging/`, then rename it into place and keep the last K."""
        staged = staging_dir(self.args.output_dir) / checkpoint_name(self.state.global_step)
        if self.args.should_save:
            warn_if_low_space(self.args.output_dir)
        self._staging = True
        try:
            super()._save_checkpoint(model, trial)
            if self.run_config.lora.enabled:
                self._save_connector(staged)
            self._barrier()
            if self.args.should_save:
                if self.run_config.lora.enabled:
                    verify_adapter(staged)
                best = f"checkpoint-{self.state.best_global_step}" if self.state.best_global_step else None
                publish_checkpoint(staged, self.args.output_dir, self.run_config.training.keep_last, keep=best)
        except OSError as err:  # e.g. ENOSPC: the staged files go, the previous checkpoints stay
            raise abandon_save(staged, self.args.output_dir, err) from err
        finally:
            self._staging = False
        self._barrier()

    # resume: every pickle of the checkpoint (DeepSpeed's shards, optimizer, scheduler, rng states)
    # loads weights-only (train.safe_load), whatever DeepSpeed or the Trainer asks torch.load for

    def _prepare_for_training(self, *args, **kwargs):
        with safe_loading():
            return super()._prepare_for_training(*args, **kwargs)

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
