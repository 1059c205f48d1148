"""On resume, the settings follow this run's config (LR schedule, AdamW hyperparameters,
clipping); the checkpoint supplies only the state."""

from __future__ import annotations

import copy
import warnings
from typing import Any

# ---- resume follows this run's settings -----------------------------------------------------

HYPERPARAMS = ("weight_decay", "betas", "eps")


def run_settings(engine) -> dict:
    """The settings the engine holds now (after build: this run's config): LR lambda, base lrs
    and each param group's AdamW hyperparameters. Copies: DeepSpeed's load_checkpoint updates
    the lambda object in place (LambdaLR.load_state_dict)."""
    scheduler = engine.lr_scheduler
    return {
        "lambdas": [copy.copy(fn) for fn in scheduler.lr_lambdas],
        "base_lrs": list(scheduler.base_lrs),
        "groups": [
            {k: copy.copy(g[k]) for k in HYPERPARAMS if k in g}
            for g in engine.optimizer.param_groups
        ],
        # ZeRO-1/2 keep the clipping norm in the optimizer, and their load takes the saved one.
        "clip_grad": getattr(engine.optimizer, "clip_grad", None),
    }


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, (tuple, list)):
        return "[" + ", ".join(_fmt(v) for v in value) + "]"
    return str(value)


def _schedule_keys(settings: dict) -> dict[str, Any]:
    fn = settings["lambdas"][0]
    keys = {
        "train.steps": getattr(fn, "total_steps", None),
        "schedule.warmup_steps": getattr(fn, "warmup_steps", None),
        "schedule.min_lr_ratio": getattr(fn, "min_ratio", None),
        "optim.lr": settings["base_lrs"][0],
    }
    groups = settings["groups"]
    keys["optim.grad_clip"] = settings.get("clip_grad")
    if groups:
        keys["optim.weight_decay"] = max(g.get("weight_decay", 0.0) for g in groups)
        keys["optim.betas"] = tuple(groups[0].get("betas", ()))
        keys["optim.eps"] = groups[0].get("eps")
    return keys


def restore_run_settings(engine, current: dict, saved: dict, step: int) -> str:
    """After a checkpoint load: this run's LR lambda, base lrs, AdamW hyperparameters and
    gradient clipping (`current`, from run_settings before the load) replace what the checkpoint
    brought
    (`saved`); the schedule's position is `step`, the checkpoint's. Returns the one line that
    says what changed, or "" when nothing did."""
    scheduler = engine.lr_scheduler
    groups = engine.optimizer.param_groups
    scheduler.lr_lambdas = list(current["lambdas"])
    scheduler.base_lrs = list(current["base_lrs"])
    scheduler.last_epoch = step
    lrs = [
        base * fn(step) for base, fn in zip(scheduler.base_lrs, scheduler.lr_lambdas, strict=True)
    ]
    for group, lr, base, hyper in zip(
        groups, lrs, scheduler.base_lrs, current["groups"], strict=True
    ):
        group.update(copy.deepcopy(hyper))
        group["lr"] = lr
        group["initial_lr"] = base
    scheduler._last_lr = lrs
    if current.get("clip_grad") is not None:
        engine.optimizer.clip_grad = current["clip_grad"]
    before, now = _schedule_keys(saved), _schedule_keys(current)
    changed = [
        f"{key} {_fmt(before[key])} -> {_fmt(now[key])}"
        for key in now
        if before.get(key) is not None and before[key] != now[key]
    ]
    return "resume: schedule follows this run's config: " + ", ".join(changed) if changed else ""


def advance_schedule(engine) -> None:
    """One LR-schedule step without an optimizer step (a step skipped for a non-finite loss):
    the schedule counts training steps, applied or not. DeepSpeed steps the scheduler only
    inside engine.step()."""
    with warnings.catch_warnings():  # "lr_scheduler.step() before optimizer.step()": on purpose
        warnings.simplefilter("ignore", UserWarning)
        engine.lr_scheduler.step()
