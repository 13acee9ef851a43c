"""The training loop of one worker: forward, hard-mining loss, backward, clip, StableAdamW, schedule.

Plain PyTorch: Ray Train (dinomaly/distributed/train/worker.py) hands it a DDP-wrapped model and batches.
Reference: guojiajeremy/Dinomaly dinomaly_mvtec_uni.py train() loop @c5c76d0.
"""

from __future__ import annotations

import contextlib
import logging
import math
import random
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch.optim.lr_scheduler import LambdaLR

from dinomaly.config import Config
from dinomaly.loss import hard_mining_cosine_loss, hard_mining_p
from dinomaly.optim import StableAdamW, build_optimizer, build_scheduler

logger = logging.getLogger(__name__)


def seed_everything(seed: int) -> None:
    """Seed Python, numpy and torch (all devices) and make cuDNN deterministic, as the reference's setup_seed."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    return getattr(model, "module", model)  # DDP keeps the Dinomaly in .module


def _model_device(model: torch.nn.Module) -> torch.device:
    return next(iter(_unwrap(model).trainable_parameters())).device


def _capture_rng(device: torch.device) -> dict[str, torch.Tensor]:
    rng = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        rng["cuda"] = torch.cuda.get_rng_state(device)
    return rng


def _restore_rng(rng: dict[str, torch.Tensor], device: torch.device) -> None:
    torch.set_rng_state(rng["torch"].cpu())
    if "cuda" in rng and device.type == "cuda":
        torch.cuda.set_rng_state(rng["cuda"].cpu(), device)


@dataclass
class TrainState:
    """Everything a resumed run needs besides the weights: optimiser moments, schedule position, step, RNG.

    step is the 0-based iteration of the next optimiser step (= steps done). rng_state is the torch RNG
    (dropout) as it was after the last train_steps call; from_state_dict puts it back.
    """

    optimizer: StableAdamW
    scheduler: LambdaLR
    step: int = 0
    rng_state: dict[str, torch.Tensor] = field(default_factory=dict)

    @classmethod
    def create(cls, model: torch.nn.Module, config: Config) -> TrainState:
        """A fresh optimiser over model.trainable_parameters() and the warm-cosine schedule at step 0."""
        optimizer = build_optimizer(_unwrap(model), config.train)
        scheduler = build_scheduler(optimizer, config.train)
        return cls(optimizer=optimizer, scheduler=scheduler, step=0, rng_state=_capture_rng(_model_device(model)))

    def state_dict(self) -> dict[str, Any]:
        """Nested dict of tensors and plain values for dinomaly.checkpoint.save(train_state=...)."""
        scheduler = {k: v for k, v in self.scheduler.state_dict().items() if k != "lr_lambdas"}  # functions
        return {"step": self.step, "optimizer": self.optimizer.state_dict(), "scheduler": scheduler,
                "rng": dict(self.rng_state)}

    @classmethod
    def from_state_dict(cls, model: torch.nn.Module, config: Config, state_dict: dict[str, Any]) -> TrainState:
        """Rebuild the state for `model` (already holding the checkpoint's weights) and restore the torch RNG."""
        missing = {"step", "optimizer", "scheduler", "rng"} - set(state_dict)
        if missing:
            raise ValueError(f"train state is missing {sorted(missing)}; pass TrainState.state_dict() output "
                             "(dinomaly.checkpoint.load(...).train_state)")
        state = cls.create(model, config)
        state.optimizer.load_state_dict(state_dict["optimizer"])
        scheduler = dict(state_dict["scheduler"], lr_lambdas=[None] * len(state.optimizer.param_groups))
        state.scheduler.load_state_dict(scheduler)
        state.step = int(state_dict["step"])
        state.rng_state = dict(state_dict["rng"])
        _restore_rng(state.rng_state, _model_device(model))
        return state


class TrainingDiverged(ValueError):
    """The loss, the gradient norm or a trainable weight stopped being finite: no later step can recover."""


def divergence(records: list[dict], parameters: Iterable[torch.Tensor] = ()) -> dict | None:
    """The first record whose loss or gradient norm is not finite; else, when a weight in `parameters` is not
    finite (a NaN update leaves the loss of its own step finite), the last record with weights_finite False.
    None while everything is finite."""
    for record in records:
        if not (math.isfinite(record["loss"]) and math.isfinite(record["grad_norm"])):
            return dict(record, weights_finite=True)
    flags = [torch.isfinite(p).all() for p in parameters]
    if records and flags and not bool(torch.stack(flags).all()):  # one sync for all tensors
        return dict(records[-1], weights_finite=False)
    return None


def diverged_message(found: dict) -> str:
    """One line for divergence()'s finding, with the fix."""
    what = f"loss {found['loss']:.4g}, gradient norm {found['grad_norm']:.4g}"
    if not found.get("weights_finite", True):
        what += ", weights not finite"
    return f"training diverged at step {found['step']} ({what}); lower train.lr or raise train.warmup_steps"


def _autocast(precision: str, device: torch.device) -> contextlib.AbstractContextManager:
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def train_steps(model: torch.nn.Module, batches: Iterable[torch.Tensor], config: Config,
                state: TrainState | None = None, *, check_finite: bool = True
                ) -> tuple[list[dict[str, float]], TrainState]:
    """One optimiser step per batch ([B, 3, H, W], normalised); returns per-step records and the state.

    Order per step, as the reference: train mode (the encoder stays eval) -> p from the 0-based step ->
    forward (bf16 autocast if train.precision says so) -> loss in fp32 -> zero_grad -> backward ->
    clip_grad_norm_ (the pre-clip norm is recorded; under DDP the gradients are already all-reduced, so
    this is the global norm) -> optimizer.step() at the current lr -> scheduler.step() -> step += 1.
    Records: {step (1-based count after the step), loss, grad_norm (pre-clip), lr (used), p (used)}.
    `model` may be a DDP wrapper of a Dinomaly.

    check_finite: raise TrainingDiverged at the first step whose loss or gradient norm is not finite, or at the
    end when a weight is not. Under DDP pass False and call divergence() where every rank does: the loss is a
    rank's own, and a rank that raised alone would leave the others waiting in the next all-reduce.
    """
    tc = config.train
    if state is None:
        state = TrainState.create(model, config)
    trainable = list(_unwrap(model).trainable_parameters())
    device = trainable[0].device
    records = []
    for images in batches:
        model.train()
        p = hard_mining_p(state.step, tc.hard_mining_final_p, tc.hard_mining_ramp_steps)
        lr = state.optimizer.param_groups[0]["lr"]
        with _autocast(tc.precision, device):
            enc, dec = model(images.to(device, non_blocking=True))
        loss = hard_mining_cosine_loss([e.float() for e in enc], [d.float() for d in dec], p,
                                       factor=tc.hard_mining_factor, global_batch=tc.global_hard_mining)
        state.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(trainable, tc.clip_grad_norm)
        state.optimizer.step()
        state.scheduler.step()
        state.step += 1
        records.append({"step": state.step, "loss": loss.item(), "grad_norm": grad_norm.item(), "lr": lr, "p": p})
        if check_finite and (found := divergence(records[-1:])):
            raise TrainingDiverged(diverged_message(found))
    state.rng_state = _capture_rng(device)
    if check_finite and (found := divergence(records[-1:], trainable)):
        raise TrainingDiverged(diverged_message(found))
    return records, state
