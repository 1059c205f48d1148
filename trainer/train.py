"""Train CLIP with the DisCo loss on DeepSpeed: `python -m trainer.train --config FILE [k=v ...]`.

Works under `deepspeed`, `torchrun`, `accelerate launch`, `srun` and as a plain process.
Exit codes: 0 finished, 2 bad config or input, 75 preempted (checkpoint written, resume with
checkpoint.resume=auto), 1 anything else.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import sys
import time
import traceback
from pathlib import Path
from typing import NoReturn

import torch
import torch.distributed as dist

from trainer.config import Config, load_config
from trainer.config_io import ConfigError, dump_yaml
from trainer.dist import DistInfo, read_dist_info

EXIT_CONFIG = 2
EXIT_PREEMPTED = 75  # EX_TEMPFAIL: "try again", which is what a requeue does
LOST_PEER_LINGER_S = 3.0  # see _train_and_report


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

    def signals(self, skipped_samples: int):
        """This rank's stop request and skip count (trainer.step.RankSignals), sent with the
        step's one collective; the step returns what all ranks agreed (they stop together)."""
        from trainer.step import RankSignals

        return RankSignals(self.requested, skipped_samples)


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


@contextlib.contextmanager
def _setup_errors_as_config_errors():
    """Bad input that only shows while setting up (a tokenizer that does not parse, a loader
    state saved with other data settings) is the same on every rank: one line, exit 2."""
    try:
        yield
    except ValueError as err:
        raise ConfigError(str(err).strip().splitlines()[0]) from err


def train(cfg: Config, info: DistInfo, run_dir: Path) -> int:
    from trainer import checkpoint
    from trainer.build import build_components

    ckpt_dir = run_dir / "checkpoints"
    # Before the loader's workers fork (build_components starts them): they inherit this
    # handler, so a SIGUSR1/SIGTERM sent to the whole job (Slurm signals every process of the
    # step) only sets a flag in them, where the default action would kill them and fail the
    # training process before it can write its checkpoint.
    stop = StopRequest()
    with _setup_errors_as_config_errors():
        # One decision for all ranks, on storage all ranks share (trainer/checkpoint.py).
        checkpoint.check_shared_run_dir(run_dir)
        resume_dir, notes = checkpoint.choose_resume(cfg.checkpoint, ckpt_dir)
        data_states = None  # every saved rank's data position, when resuming
        if resume_dir is not None:
            saved_world = checkpoint.saved_world_size(resume_dir)
            data_states = checkpoint.load_data_states(resume_dir, saved_world)
        # Model, engine, loader, tokenizer (build.py); the loader's workers start first.
        parts = build_components(cfg, info, data_states=data_states, start_loader=True)
    try:
        return _resume_and_train(cfg, info, parts, stop, run_dir, resume_dir, notes)
    finally:
        parts.loader.close()  # worker processes end before the process does


def _resume_and_train(
    cfg, info, parts, stop: StopRequest, run_dir: Path, resume_dir, notes: list[str]
) -> int:
    from trainer import checkpoint
    from trainer.losses import make_objective
    from trainer.metrics import MetricsLogger

    ckpt_dir = run_dir / "checkpoints"
    check_free_space(parts.engine, ckpt_dir)
    start_step = 0
    if resume_dir is not None:
        with _setup_errors_as_config_errors():
            resumed = checkpoint.load(parts.engine, resume_dir, rank=info.rank)
        start_step = resumed.step
        if info.is_main and (notes or resumed.notes):
            print("\n".join([*notes, *resumed.notes]), flush=True)
        print(f"[rank {info.rank}] resumed from {resume_dir} at step {start_step}", flush=True)

    metrics = MetricsLogger(
        cfg.log, run_dir, enabled=info.is_main, total_steps=cfg.train.steps, start_step=start_step
    )
    objective = make_objective(cfg.loss)
    objective_at = debug_nan_injection(objective, cfg.train.inject_nan_at_step)
    try:
        return _loop(
            cfg, info, parts, metrics, objective_at, stop, step=start_step, ckpt_dir=ckpt_dir
        )
    finally:
        metrics.close()


def _loop(cfg, info, parts, metrics, objective_at, stop, *, step: int, ckpt_dir: Path) -> int:
    """The training loop proper: step, agree, log, eval, checkpoint, until done or stopped."""
    from trainer import checkpoint
    from trainer.step import train_step

    engine, loader = parts.engine, parts.loader
    batches = iter(loader)
    skipped_steps = 0
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[
        cfg.train.precision
    ]
    while step < cfg.train.steps:
        lr = engine.get_lr()[0]
        started = time.perf_counter()
        batch = next(batches)
        out = train_step(
            engine, batch, objective_at(step + 1), chunks=cfg.train.grad_cache_chunks,
            dtype=dtype, signals=stop.signals(loader.skipped_samples),
        )  # fmt: skip
        step += 1
        if not out.applied:
            checkpoint.advance_schedule(engine)  # a skipped step counts in the schedule too
            skipped_steps += 1
            if cfg.train.nonfinite == "stop":
                print(
                    f"disco-clip: error: non-finite loss at step {step}; stopping "
                    "(train.nonfinite=stop); no checkpoint of it was written",
                    file=sys.stderr,
                )
                return 1
        seconds = time.perf_counter() - started
        preempted = out.stop
        metrics.log("train", step, {
            "loss": out.loss, "lr": lr, "logit_scale": out.logit_scale,
            "samples_per_s": cfg.train.global_batch_size / seconds,
            "skipped_samples": out.skipped_samples, "skipped_steps": skipped_steps,
        })  # fmt: skip

        if due(step, cfg.eval.every) or (step == cfg.train.steps and cfg.eval.every > 0):
            from trainer.eval.evaluate import run_periodic_eval

            metrics.log("eval", step, run_periodic_eval(engine.module, cfg.eval, parts, info))
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
            return EXIT_PREEMPTED
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
    """Validate, start the process group, train. Errors before the process group return an exit
    code; once the group is up this never returns: the process ends in `_end_process`."""
    info = read_dist_info()
    try:
        cfg = load_config(args.config, args.overrides, info.world_size)
        run_dir = prepare_run_dir(cfg, info)
    except ConfigError as err:
        print(f"disco-clip: error: {err}", file=sys.stderr)
        return EXIT_CONFIG

    from trainer.dist import init_distributed

    try:
        init_distributed(info, cfg.dist)
    except ValueError as err:  # a launch that gives this rank no usable GPU (trainer/dist.py)
        print(f"disco-clip: error: {err}", file=sys.stderr)
        return EXIT_CONFIG
    try:
        code = _train_and_report(cfg, info, run_dir)
    except BaseException:  # whatever it is, the process still ends the way _end_process says
        traceback.print_exc()
        code = 1
    _end_process(code, healthy=code in (0, EXIT_PREEMPTED))


def _train_and_report(cfg: Config, info: DistInfo, run_dir: Path) -> int:
    """train(), with every foreseen failure turned into one line and an exit code."""
    from trainer.checkpoint import CheckpointError

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
            key = "data.hf_path" if cfg.data.source == "hf" else "data.train_shards"
            print(f"disco-clip: error: {key}: {data_error[0].strip()}", file=sys.stderr)
            return EXIT_CONFIG
        why = lost_peer(err)
        if not why:
            raise
        print(
            f"disco-clip: error: rank {info.rank}: lost contact with another rank ({why}); "
            "it died or hung: see the other ranks' logs and the launcher's for the first failure",
            file=sys.stderr,
        )
        # Leave after the rank that failed first has been reaped: launchers report the first
        # failed child they poll (DeepSpeed's polls in rank order, once a second), and the
        # root cause (a SIGKILL, an OOM) is what the user needs to see, not this exit.
        time.sleep(LOST_PEER_LINGER_S)
        return 1
    except OSError as err:  # disk full or run dir gone mid-run: say which file, not a traceback
        print(
            f"disco-clip: error: rank {info.rank}: {err.strerror or err}: "
            f"{err.filename or run_dir}; the newest complete checkpoint is intact: fix that "
            "and resume with checkpoint.resume=auto",
            file=sys.stderr,
        )
        return 1


def _end_process(code: int, *, healthy: bool) -> NoReturn:
    """End a training process that started a process group, without interpreter finalization.

    Why: gloo's worker threads (ProcessGroupGloo::runLoop) drop finished work items, and with
    them the last reference to tensors that own Python objects, after the main thread moved on.
    DeepSpeed keeps references to its process groups, so destroy_process_group does not destroy
    them: they die during interpreter finalization, where a worker thread that needs the GIL to
    drop such a tensor is unwound by pthread_exit inside a noexcept destructor, and the process
    aborts ("terminate called without an active exception", SIGABRT; caught with a backtrace in
    c10::TensorImpl::decref_pyobject under ProcessGroupGloo::runLoop, about 1 run in 7 of the
    ZeRO-3 gradient-caching test on a loaded machine). So: every rank reaches the barrier (which
    on gloo also waits for every earlier collective), the group is taken down, the streams are
    flushed, and the process leaves with os._exit before any C++ destructor can run. Everything
    the run writes is closed (metrics, loader workers) or atomically renamed by then.
    """
    if dist.is_initialized():
        if healthy:  # a dead peer would make the barrier wait for the timeout
            with contextlib.suppress(RuntimeError, dist.DistBackendError):
                dist.barrier()  # a peer that failed after all: nothing left to wait for
        dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


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
