"""Training-throughput features: the loader wait per step (`data_wait_s`), activation checkpointing
policies, fused-kernel selection and multimodal sequence packing (issue 14). In-process, CPU, tiny model."""

from __future__ import annotations

import time

import pytest
import torch

from data.collate import Collator
from data.dataset import Sample
from data.sampler import ModalityLengthBatchSampler
from longvu.tiny import tiny_model


class _SlowTextDataset(torch.utils.data.Dataset):
    """Text-only samples that take `delay` seconds each to load."""

    def __init__(self, n: int, delay: float):
        self.n, self.delay = n, delay

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        time.sleep(self.delay)
        ids = torch.randint(0, 1000, (24,), generator=torch.Generator().manual_seed(i))
        return Sample(i, f"t{i}", ids, ids.clone(), [])


def test_trainer_logs_the_time_each_step_waits_for_its_batch(tmp_path):
    from data.bad_samples import BadSampleTracker
    from train.config import RunConfig
    from transformers import TrainingArguments
    from train.trainer import LongVUTrainer

    delay, steps = 0.3, 3
    config = RunConfig()
    config.data.num_workers = 0
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=steps, logging_steps=1, report_to=[],
                             save_strategy="no", use_cpu=True, remove_unused_columns=False)
    model = tiny_model("video").train()
    dataset = _SlowTextDataset(steps, delay)
    sampler = ModalityLengthBatchSampler([24] * steps, ["text"] * steps, max_tokens=24, max_batch_size=1)
    trainer = LongVUTrainer(model=model, args=args, train_dataset=dataset, data_collator=Collator(),
                            run_config=config, batch_sampler=sampler, bad_tracker=BadSampleTracker(0.5, 100))
    trainer.train()
    logged = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logged) == steps
    for h in logged:
        assert delay <= h["data_wait_s"] <= h["step_time_s"], h
