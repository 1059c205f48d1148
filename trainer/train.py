"""Train CLIP with the DisCo loss on DeepSpeed: `python -m trainer.train --config FILE [k=v ...]`.

Works under `deepspeed`, `torchrun`, `accelerate launch`, `srun` and as a plain process.
Exit codes: 0 finished, 2 bad config or input, 75 preempted (checkpoint written, resume with
checkpoint.resume=auto), 1 anything else.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

from trainer.config import Config, load_config
from trainer.config_io import ConfigError, dump_yaml
from trainer.dist import DistInfo, collective_device, read_dist_info

EXIT_CONFIG = 2
EXIT_PREEMPTED = 75  # EX_TEMPFAIL: "try again", which is what a requeue does


def due(step: int, every: int) -> bool:
    """Is a periodic action (eval, checkpoint) due after `step`? every=0 means never."""
    return every > 0 and step % every == 0


class StopRequest:
    """SIGUSR1 / SIGTERM ask every rank to stop at the next step boundary, after a checkpoint."""

    def __init__(self) -> None:
        self.requested = False
        for sig in (signal.SIGUSR1, signal.SIGTERM):
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        self.requested = True

    def agreed(self) -> bool:
        """True on every rank as soon as any rank got a signal (ranks must stop together)."""
        flag = torch.tensor([float(self.requested)], device=collective_device())
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())


def prepare_run_dir(cfg: Config, info: DistInfo) -> Path:
    """Refuse to clobber a previous run; check we can write; save the resolved config."""
    from trainer.checkpoint import complete_tags

    run_dir = Path(cfg.run.dir)
    ckpt_dir = run_dir / "checkpoints"
    if not cfg.checkpoint.resume and complete_tags(ckpt_dir):
        raise ConfigError(
            f"run.dir: {run_dir} already holds checkpoints; pass checkpoint.resume=auto to "
            "continue that run or choose a new run.dir"
        )
    if info.is_main:
        try:
            ckpt_dir.mkdir(parents=True, exist_ok=True)
            tmp = run_dir / f".config.yaml.tmp{os.getpid()}"
            tmp.write_text(dump_yaml(cfg))
            os.replace(tmp, run_dir / "config.yaml")
        except OSError as err:
            raise ConfigError(
                f"run.dir: cannot write to {run_dir} ({err.strerror}); choose a writable run.dir"
            ) from None
    return run_dir


def debug_nan_injection(objective, at_step: int):
    """step -> objective; at `at_step` (train.inject_nan_at_step, 0 = never) the loss is NaN,
    the way the non-finite policy is exercised by tests without waiting for a real blow-up."""
    poisoned = lambda *args: objective(*args) * float("nan")  # noqa: E731
    return lambda step: poisoned if step == at_step else objective


def check_free_space(engine, ckpt_dir: Path) -> None:
    """Refuse to start when the disk cannot hold one more checkpoint (about 16 bytes per
    parameter: weights, ZeRO's fp32 master copy, two Adam moments): better now than at the
    first save."""
    import shutil

    numel = sum(getattr(p, "ds_numel", p.numel()) for p in engine.module.parameters())
    need = numel * 16
    where = next(p for p in (ckpt_dir, *ckpt_dir.parents) if p.exists())  # rank 0 makes it
    free = shutil.disk_usage(where).free
    if free < need:
        raise ConfigError(
            f"run.dir: {free / 2**20:.1f} MiB free at {ckpt_dir}, a checkpoint needs about "
            f"{need / 2**20:.1f} MiB; free some space or choose another run.dir"
        )


def train(cfg: Config, info: DistInfo, run_dir: Path) -> int:
    from trainer import checkpoint
    from trainer.build import build_components
    from trainer.losses import make_objective
    from trainer.metrics import MetricsLogger
    from trainer.step import train_step

    ckpt_dir = run_dir / "checkpoints"
    # Bad input that only shows while setting up (a tokenizer that does not parse, a loader
    # state saved with other data settings) is the same on every rank: one line, exit 2.
    try:
        parts = build_components(cfg, info)  # model, engine, loader, tokenizer (see build.py)
        engine, loader = parts.engine, parts.loader
        check_free_space(engine, ckpt_dir)
        start_step = 0
        resume_dir = checkpoint.find_resume_dir(cfg.checkpoint, ckpt_dir)
        if resume_dir is not None:
            client = checkpoint.load(engine, resume_dir, rank=info.rank)
            start_step = client["step"]
            loader.load_state_dict(client["data"])
            print(f"[rank {info.rank}] resumed from {resume_dir} at step {start_step}", flush=True)
    except ValueError as err:
        raise ConfigError(str(err).strip().splitlines()[0]) from err

    metrics = MetricsLogger(
        cfg.log, run_dir, enabled=info.is_main, total_steps=cfg.train.steps, start_step=start_step
    )
    objective = make_objective(cfg.loss)
    objective_at = debug_nan_injection(objective, cfg.train.inject_nan_at_step)
    stop = StopRequest()
    batches = iter(loader)
    skipped_steps, step = 0, start_step
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[
        cfg.train.precision
    ]

    while step < cfg.train.steps:
        lr = engine.get_lr()[0]
        started = time.perf_counter()
        batch = next(batches)
        out = train_step(
            engine, batch, objective_at(step + 1), chunks=cfg.train.grad_cache_chunks, dtype=dtype
        )
        step += 1
        if not out.applied:
            skipped_steps += 1
            if cfg.train.nonfinite == "stop":
                print(
                    f"disco-clip: error: non-finite loss at step {step}; stopping "
                    "(train.nonfinite=stop); no checkpoint of it was written",
                    file=sys.stderr,
                )
                return 1
        seconds = time.perf_counter() - started
        metrics.log("train", step, {
            "loss": out.loss, "lr": lr, "logit_scale": out.logit_scale,
            "samples_per_s": cfg.train.global_batch_size / seconds,
            "skipped_samples": loader.skipped_samples, "skipped_steps": skipped_steps,
        })  # fmt: skip

        if due(step, cfg.eval.every) or (step == cfg.train.steps and cfg.eval.every > 0):
            from trainer.eval.evaluate import run_periodic_eval

            metrics.log("eval", step, run_periodic_eval(engine.module, cfg.eval, parts, info))
        preempted = stop.agreed()
        at_end = step == cfg.train.steps and cfg.checkpoint.at_end
        if due(step, cfg.checkpoint.every) or preempted or at_end:
            checkpoint.save(
                engine, ckpt_dir, step=step, data_state=loader.state_dict(),
                keep_last=cfg.checkpoint.keep_last, rank=info.rank,
            )  # fmt: skip
        if preempted:
            print(
                f"[rank {info.rank}] stop requested: checkpoint at step {step} written", flush=True
            )
            metrics.close()
            return EXIT_PREEMPTED
    metrics.close()
    return 0


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="disco-clip train", description=__doc__.splitlines()[0])
    add_arguments(parser)
    return parser.parse_args(argv)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="run config YAML (e.g. trainer/configs/demo.yaml)")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. optim.lr=1e-3")
    # The deepspeed launcher appends --local_rank=N; LOCAL_RANK in the environment says the same.
    parser.add_argument("--local_rank", "--local-rank", type=int, help=argparse.SUPPRESS)


def run(args: argparse.Namespace) -> int:
    info = read_dist_info()
    try:
        cfg = load_config(args.config, args.overrides, info.world_size)
        run_dir = prepare_run_dir(cfg, info)
    except ConfigError as err:
        print(f"disco-clip: error: {err}", file=sys.stderr)
        return EXIT_CONFIG

    from trainer.checkpoint import CheckpointError
    from trainer.dist import init_distributed

    try:
        init_distributed(info, cfg.dist)
    except ValueError as err:  # a launch that gives this rank no usable GPU (trainer/dist.py)
        print(f"disco-clip: error: {err}", file=sys.stderr)
        return EXIT_CONFIG
    try:
        return train(cfg, info, run_dir)
    except ConfigError as err:
        print(f"disco-clip: error: {err}", file=sys.stderr)
        return EXIT_CONFIG
    except CheckpointError as err:
        print(f"disco-clip: error: rank {info.rank}: {err}", file=sys.stderr)
        return 1
    except (RuntimeError, dist.DistBackendError) as err:
        data_error = [line for line in str(err).splitlines() if "no usable sample" in line]
        if data_error:  # data/stream.py: not one readable image-caption pair in the shards
            print(f"disco-clip: error: data.train_shards: {data_error[0].strip()}", file=sys.stderr)
            return EXIT_CONFIG
        why = lost_peer(err)
        if not why:
            raise
        print(
            f"disco-clip: error: rank {info.rank}: lost contact with another rank ({why}); "
            "it died or hung: see the other ranks' logs and the launcher's for the first failure",
            file=sys.stderr,
        )
        return 1
    except OSError as err:  # disk full or run dir gone mid-run: say which file, not a traceback
        print(
            f"disco-clip: error: rank {info.rank}: {err.strerror or err}: "
            f"{err.filename or run_dir}; the newest complete checkpoint is intact: fix that "
            "and resume with checkpoint.resume=auto",
            file=sys.stderr,
        )
        return 1
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


# What "another rank died or hung" looks like, by backend: gloo and the TCP store see a closed
# or reset socket or a timeout; NCCL reports a remote error, and its watchdog a timed-out or
# aborted collective.
LOST_PEER_WORDS = (
    "Connection closed by peer",
    "Connection reset by peer",
    "Broken pipe",
    "Timed out",
    "remote process exiting",  # ncclRemoteError
    "ncclRemoteError",
    "Watchdog caught collective operation timeout",
    "NCCL communicator was aborted",
    "Heartbeat monitor timed out",
)


def lost_peer(err: BaseException) -> str:
    """The wording of "another rank died" found in `err` (gloo's, the store's, NCCL's and its
    watchdog's), or "" for any other error."""
    found = [w for w in LOST_PEER_WORDS if w in str(err)]
    if found:
        return found[0]
    return type(err).__name__ if isinstance(err, dist.DistBackendError) else ""


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser("train", help="train a CLIP model (DeepSpeed + DisCo loss)")
    add_arguments(parser)
    parser.set_defaults(func=run)


def main(argv: list[str] | None = None) -> int:
    return run(parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
