"""DeepSpeed checkpoints that a crash can never leave looking complete, that say when they are
damaged, and that resume on another number of ranks.

Layout under RUN/checkpoints/:
    step_00000120/              DeepSpeed's files (model, optimizer shards per rank)
    step_00000120/rank_00001.pt this rank's client state: data position, RNG states
    step_00000120/MANIFEST.json size and sha256 of every file above, world size (rank 0 writes
                                it after every rank's files are on disk)
    step_00000120/COMPLETE      written by rank 0 after the manifest
    latest                      the newest complete tag, replaced atomically (temp + rename)

`resume=auto` takes the newest tag that has COMPLETE, whatever `latest` says: a kill during a
write leaves a tag without the marker, which is ignored (and removed by the next cleanup).
A write that fails (disk full) removes its tag dir; weights that are not finite are never saved.
Every file of the checkpoint is checked against MANIFEST.json before it is resumed from; a
damaged one is named and skipped for the next intact one (`choose_resume`). Checkpoints from
before manifests (no MANIFEST.json) are taken with a warning.

One decision for all ranks: rank 0 lists the checkpoints and broadcasts the list; the ranks hash
their share of the files and gather the verdicts, so every rank resumes the same tag. That needs
RUN/ on storage every rank sees, which `check_shared_run_dir` proves before step 1.

Resume follows this run's config, not the checkpoint's, for everything that is a setting: the LR
schedule (lr, warmup, total steps, floor), AdamW's betas, eps and weight decay, and gradient
clipping; the
checkpoint supplies the state (weights, moments, step count, data position, RNG).

Elastic resume (docs/elastic_resume.md): a checkpoint written on N ranks resumes on M != N at
ZeRO-1/2/3. DeepSpeed's own load_checkpoint refuses that, so `load_elastic` reads every
parameter's fp32 master weights and Adam moments from the N-rank files (`ZeroCheckpoint`) and
writes them into the fresh M-rank engine through DeepSpeed's tensor-fragment API.

Trust boundary: our client state is read with `torch.load(weights_only=True)` (tensors and
plain containers only) before DeepSpeed's `load_checkpoint`, which unpickles its own files in
full: resume only from checkpoints your runs wrote. The elastic path reads DeepSpeed's files
with weights_only=True too, allowing only three DeepSpeed classes (DEEPSPEED_SAFE_GLOBALS).
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import os
import random
import re
import secrets
import shutil
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
import torch.distributed as dist

from trainer.dist import collective_device

COMPLETE = "COMPLETE"
LATEST = "latest"
MANIFEST = "MANIFEST.json"
MANIFEST_VERSION = 1
TAG_RE = re.compile(r"^step_(\d{8})$")
CLIENT_RE = re.compile(r"^rank_(\d{5})\.pt$")
HASH_CHUNK = 1 << 20  # files are hashed in 1 MiB reads, never loaded whole
PROBE_PREFIX = ".shared-storage-probe-"


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be written or trusted: the message is one line."""


class StorageError(ValueError):
    """A run that must not start: RUN/ not shared by every rank, or no intact checkpoint to
    resume. The message is one line; train.py prints it on every rank and exits 2."""


@dataclass
class CheckpointConfig:
    every: int = 0
    """Save every this many steps (0: only at the end and on preemption signals)."""
    keep_last: int = 2
    """Complete checkpoints kept; older ones are deleted after a newer one is complete."""
    resume: str = ""
    """"" starts fresh (refused if the run dir already has checkpoints), "auto" resumes from
    the newest complete checkpoint if there is one, or a path to a checkpoint tag dir."""
    at_end: bool = True
    """Save when training finishes."""

    def validate(self) -> None:
        if self.every < 0:
            raise ValueError(f"every must be >= 0 steps (0 = only at the end), got {self.every}")
        if self.keep_last < 1:
            raise ValueError(f"keep_last must be >= 1, got {self.keep_last}")
        if self.resume not in ("", "auto") and not (Path(self.resume) / COMPLETE).is_file():
            raise ValueError(
                f"resume: {self.resume} is not a complete checkpoint (no {COMPLETE} marker); "
                "pass a RUN/checkpoints/step_XXXXXXXX dir or 'auto'"
            )


def tag_for(step: int) -> str:
    return f"step_{step:08d}"


def complete_tags(ckpt_dir: Path) -> list[str]:
    """Complete checkpoint tags, oldest first."""
    if not ckpt_dir.is_dir():
        return []
    tags = [p.name for p in ckpt_dir.iterdir() if TAG_RE.match(p.name) and (p / COMPLETE).is_file()]
    return sorted(tags)


def find_resume_dir(cfg: CheckpointConfig, ckpt_dir: Path) -> Path | None:
    """The tag dir `cfg.resume` names, as this process sees it (no verification, no
    collective): the newest complete one for "auto". Training uses `choose_resume`."""
    if cfg.resume == "auto":
        tags = complete_tags(ckpt_dir)
        return ckpt_dir / tags[-1] if tags else None
    return Path(cfg.resume) if cfg.resume else None


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


# ---- collectives that work on any backend (object collectives, or the group's device) ------


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _rank() -> int:
    return dist.get_rank() if _distributed() else 0


def _world() -> int:
    return dist.get_world_size() if _distributed() else 1


def _broadcast(obj: Any) -> Any:
    """Rank 0's `obj` on every rank."""
    if not _distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _all_gather(obj: Any) -> list[Any]:
    """Every rank's `obj`, in rank order, on every rank."""
    if not _distributed():
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


# ---- RUN/ must be one directory for every rank ---------------------------------------------


def check_shared_run_dir(run_dir: Path) -> None:
    """Collective, before step 1: rank 0 writes a file with a random token into RUN/, and every
    rank must read that token back. Rank 0 alone decides which checkpoint to resume and every
    rank reads the others' checkpoint files, so RUN/ must be storage all ranks share; a
    node-local disk would make ranks resume different steps, or none. Raises StorageError on
    every rank when any rank cannot see the file."""
    if not _distributed():
        return
    rank = dist.get_rank()
    token = _broadcast(secrets.token_hex(16) if rank == 0 else None)
    probe = Path(run_dir) / f"{PROBE_PREFIX}{token[:12]}"
    if rank == 0:
        with contextlib.suppress(OSError):  # reported below like any rank that cannot see it
            _atomic_write_text(probe, token)
    dist.barrier()
    try:
        seen = probe.read_text() == token
    except OSError:
        seen = False
    views = _all_gather(seen)  # after this every rank has read: the probe can go
    if rank == 0:
        probe.unlink(missing_ok=True)
    blind = [r for r, ok in enumerate(views) if not ok]
    if blind:
        shown = ", ".join(map(str, blind[:8])) + (", ..." if len(blind) > 8 else "")
        raise StorageError(
            f"run.dir: {run_dir} is not the same directory on every rank (rank(s) {shown} of "
            f"{len(views)} cannot see the file rank 0 wrote there); it must be on storage "
            "shared by all ranks (a network or parallel filesystem, not a node-local disk)"
        )


# ---- manifests: every file's size and sha256 ----------------------------------------------


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _checkpoint_files(tag_dir: Path) -> dict[str, int]:
    """{name: size} of the files a manifest covers: everything in the tag dir except the
    marker, the manifest itself and hidden temporaries."""
    files = {}
    for path in tag_dir.iterdir():
        name = path.name
        if name in (COMPLETE, MANIFEST) or name.startswith(".") or not path.is_file():
            continue
        files[name] = path.stat().st_size
    return files


def _share(sizes: dict[str, int], seen_by: dict[str, list[int]], world: int) -> list[list[str]]:
    """Which rank hashes which file: largest first, each to the least-loaded rank that sees it
    (deterministic, so every rank computes the same plan)."""
    load, plan = [0] * world, [[] for _ in range(world)]
    for name in sorted(sizes, key=lambda n: (-sizes[n], n)):
        rank = min(seen_by[name], key=lambda r: (load[r], r))
        plan[rank].append(name)
        load[rank] += max(sizes[name], 1)
    return plan


def write_manifest(tag_dir: Path, *, step: int) -> None:
    """Collective, once every rank's files are on disk: MANIFEST.json with each file's size
    and sha256, written atomically by rank 0.

    Each rank lists the tag dir (so a file is covered even if another node's directory cache
    has not shown it yet) and hashes its share of the files (`_share`: balanced by size, among
    the ranks that listed it); rank 0 gathers the digests. Hashing costs one read of the
    checkpoint spread over all ranks, mostly from the page cache right after the write."""
    listings = _all_gather(_checkpoint_files(tag_dir))
    sizes: dict[str, int] = {}
    seen_by: dict[str, list[int]] = {}
    for rank, listing in enumerate(listings):
        for name, size in listing.items():
            sizes.setdefault(name, size)
            seen_by.setdefault(name, []).append(rank)
    mine = {}
    for name in _share(sizes, seen_by, len(listings))[_rank()]:
        try:
            path = tag_dir / name
            mine[name] = {"size": path.stat().st_size, "sha256": sha256_file(path)}
        except OSError as err:
            mine[name] = {"error": err.strerror or str(err)}
    entries = {k: v for part in _all_gather(mine) for k, v in part.items()}
    failed = sorted(name for name, entry in entries.items() if "error" in entry)
    if failed:
        raise CheckpointError(
            f"checkpoint {tag_dir.name}: cannot read back {failed[0]} to hash it "
            f"({entries[failed[0]]['error']}); no {COMPLETE} marker written"
        )
    if _rank() == 0:
        manifest = {
            "version": MANIFEST_VERSION,
            "step": step,
            "world_size": _world(),
            "files": {name: entries[name] for name in sorted(entries)},
        }
        _atomic_write_text(tag_dir / MANIFEST, json.dumps(manifest, indent=1) + "\n")


@dataclass(frozen=True)
class Verdict:
    status: str  # "intact", "unverified" (no manifest: written before manifests) or "damaged"
    detail: str = ""  # for "damaged": "FILE: what is wrong"


def _read_manifest(tag_dir: Path) -> dict | str | None:
    """The manifest, None when there is none, or a string saying why it is unusable."""
    path = tag_dir / MANIFEST
    if not path.is_file():
        return None
    try:
        manifest = json.loads(path.read_text())
        files = manifest["files"]
        if not all(isinstance(e["size"], int) and isinstance(e["sha256"], str)
                   for e in files.values()):  # fmt: skip
            raise ValueError("bad entry")
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return f"{MANIFEST}: unreadable"
    return manifest


def _check_file(path: Path, entry: dict) -> str:
    """What is wrong with the file, or the empty string when it has the manifest's size and
    sha256."""
    if not path.is_file():
        return "missing"
    size = path.stat().st_size
    if size != entry["size"]:
        return f"{size} bytes, {entry['size']} expected"
    try:
        return "" if sha256_file(path) == entry["sha256"] else "sha256 mismatch"
    except OSError as err:
        return f"unreadable ({err.strerror or err})"


def verify(tag_dir: Path) -> Verdict:
    """Is the checkpoint what its manifest says? Collective when a process group runs (rank 0
    reads the manifest and broadcasts it, each rank hashes its share of the files, the
    problems are gathered: every rank gets the same verdict); local otherwise (export, eval).
    A damaged checkpoint's detail names the first bad file in name order."""
    tag_dir = Path(tag_dir)
    manifest = _broadcast(_read_manifest(tag_dir) if _rank() == 0 else None)
    if manifest is None:
        return Verdict("unverified")
    if isinstance(manifest, str):
        return Verdict("damaged", manifest)
    files = manifest["files"]
    sizes = {name: entry["size"] for name, entry in files.items()}
    everyone = {name: list(range(_world())) for name in files}
    mine = {}
    for name in _share(sizes, everyone, _world())[_rank()]:
        problem = _check_file(tag_dir / name, files[name])
        if problem:
            mine[name] = problem
    problems = {k: v for part in _all_gather(mine) for k, v in part.items()}
    if problems:
        first = sorted(problems)[0]
        return Verdict("damaged", f"{first}: {problems[first]}")
    return Verdict("intact")


def unverified_note(tag: str) -> str:
    return (
        f"checkpoint {tag} has no {MANIFEST} (written before manifests): its files are not verified"
    )


def damaged_note(damaged: list[tuple[str, str]], chosen: str, verb: str = "resuming") -> str:
    """`checkpoint step_6 is damaged (FILE: why); resuming from step_3`."""
    said = ", ".join(f"checkpoint {tag} is damaged ({detail})" for tag, detail in damaged)
    return f"{said}; {verb} from {chosen}"


def choose_resume(cfg: CheckpointConfig, ckpt_dir: Path) -> tuple[Path | None, list[str]]:
    """Collective: (the tag dir every rank resumes from or None, lines for rank 0 to print).

    "auto": rank 0 lists the complete tags and broadcasts the list; the newest intact one is
    taken, each damaged newer one named. An explicit path that is damaged is refused. Raises
    StorageError when checkpoints exist but none is intact."""
    if not cfg.resume:
        return None, []
    if cfg.resume == "auto":
        newest_first = [str(ckpt_dir / tag) for tag in complete_tags(ckpt_dir)[::-1]]
        candidates = [Path(p) for p in _broadcast(newest_first if _rank() == 0 else None)]
    else:
        candidates = [Path(_broadcast(cfg.resume))]
    damaged: list[tuple[str, str]] = []
    for tag_dir in candidates:
        verdict = verify(tag_dir)
        if verdict.status == "damaged":
            damaged.append((tag_dir.name, verdict.detail))
            continue
        notes = [damaged_note(damaged, tag_dir.name)] if damaged else []
        if verdict.status == "unverified":
            notes.append(unverified_note(tag_dir.name))
        return tag_dir, notes
    if not damaged:
        return None, []  # auto, and nothing to resume yet: a fresh start
    if cfg.resume != "auto":
        tag, detail = damaged[0]
        raise StorageError(
            f"checkpoint.resume: checkpoint {tag} is damaged ({detail}); pass another "
            "checkpoint or checkpoint.resume=auto to take the newest intact one"
        )
    said = "; ".join(f"{tag}: {detail}" for tag, detail in damaged)
    raise StorageError(
        f"checkpoint.resume=auto: no intact checkpoint in {ckpt_dir} (damaged: {said}); "
        "restore the files or start a new run.dir"
    )


# ---- client state: data position and RNG -------------------------------------------------


def _rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "python": list(random.getstate()[1])}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate((3, tuple(state["python"]), None))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def weights_finite(engine) -> bool:
    """Agreed by all ranks: every parameter this rank holds (its ZeRO-3 partition) is finite.

    The check stays on the parameters' device (one host sync, not one per tensor) and the flag
    goes through the collective on the device the process group serves."""
    held = [getattr(p, "ds_tensor", p) for p in engine.module.parameters()]
    local = torch.stack([torch.isfinite(t).all() for t in held if t.numel()]).all()
    flag = local.float().reshape(1).to(collective_device())
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item())


def save(engine, ckpt_dir: Path, *, step: int, data_state: dict, keep_last: int, rank: int) -> Path:
    """Collective: every rank must call it at the same step."""
    tag = tag_for(step)
    tag_dir = ckpt_dir / tag
    if not weights_finite(engine):
        raise CheckpointError(
            f"weights are not finite at step {step} (non-finite gradients?); no checkpoint "
            "written: resume from the newest complete one with a lower optim.lr"
        )
    if rank == 0 and tag_dir.exists():  # a stale incomplete attempt at this same step
        shutil.rmtree(tag_dir)
    dist.barrier()
    try:
        engine.save_checkpoint(str(ckpt_dir), tag=tag, save_latest=False)
        client = {"step": step, "data": data_state, "rng": _rng_state()}
        client_path = tag_dir / f"rank_{rank:05d}.pt"
        tmp = client_path.with_name(f".{client_path.name}.tmp")
        torch.save(client, tmp)
        os.replace(tmp, client_path)
    except (OSError, RuntimeError) as err:
        # Disk full or unwritable. torch.save reports it as a RuntimeError from its zip writer
        # ("inline_container"); any other RuntimeError (a lost peer) is not ours to explain.
        if isinstance(err, RuntimeError) and "inline_container" not in str(err):
            raise
        shutil.rmtree(tag_dir, ignore_errors=True)  # no half-written tag left behind
        reason = err.strerror if isinstance(err, OSError) and err.strerror else str(err)
        free = shutil.disk_usage(ckpt_dir).free / 2**20
        raise CheckpointError(
            f"checkpoint {tag} could not be written ({reason.strip().splitlines()[0][:120]}; "
            f"{free:.1f} MiB free at {ckpt_dir}); the previous complete checkpoint is intact: "
            "free space and resume with checkpoint.resume=auto"
        ) from None
    dist.barrier()  # every rank's files are on disk before the manifest and the marker say so
    write_manifest(tag_dir, step=step)
    if rank == 0:
        _atomic_write_text(tag_dir / COMPLETE, f"{step}\n")
        _atomic_write_text(ckpt_dir / LATEST, f"{tag}\n")
        _cleanup(ckpt_dir, keep_last)
    dist.barrier()
    return tag_dir


def _cleanup(ckpt_dir: Path, keep_last: int) -> None:
    complete = complete_tags(ckpt_dir)
    keep = set(complete[-keep_last:])
    newest = complete[-1] if complete else ""
    for path in ckpt_dir.iterdir():
        # Old complete tags beyond keep_last, and incomplete ones older than the newest
        # complete (leftovers of a killed write; a newer incomplete one may be in progress).
        if TAG_RE.match(path.name) and path.name not in keep and path.name < newest:
            shutil.rmtree(path, ignore_errors=True)


def load_client_state(path: Path) -> dict:
    """This rank's client state, tensors and plain containers only (weights_only=True): a
    file that needs arbitrary unpickling is refused, not executed."""
    if not path.is_file():
        raise CheckpointError(f"{path} missing: the checkpoint lacks a rank's client state")
    try:
        client = torch.load(path, weights_only=True)
    except Exception as err:  # UnpicklingError for foreign objects, others for corrupt files
        first = str(err).strip().splitlines()[0][:120] if str(err).strip() else type(err).__name__
        raise CheckpointError(
            f"{path} is not a client state this trainer wrote (refused by weights_only=True: "
            f"{first}); resume from a checkpoint your own run wrote"
        ) from None
    if not isinstance(client, dict) or not {"step", "data", "rng"} <= client.keys():
        raise CheckpointError(f"{path} lacks step/data/rng; it was not written by this trainer")
    return client


def saved_world_size(tag_dir: Path) -> int:
    """How many ranks wrote the checkpoint: one client-state file each (rank_XXXXX.pt)."""
    ranks = sorted(
        int(m.group(1)) for p in Path(tag_dir).iterdir() if (m := CLIENT_RE.match(p.name))
    )
    if not ranks or ranks != list(range(len(ranks))):
        raise CheckpointError(
            f"{tag_dir}: client states of ranks {ranks[:8]} found, not 0..N-1; this checkpoint "
            "is incomplete"
        )
    return len(ranks)


def load_data_states(resume_dir: Path, world_size_saved: int) -> list[dict]:
    """Every saved rank's data position, in saved-rank order (rank i's file is saved rank i's):
    what a loader whose state is per logical stream needs to pick its own streams on any
    world size."""
    return [
        load_client_state(Path(resume_dir) / f"rank_{r:05d}.pt")["data"]
        for r in range(world_size_saved)
    ]


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


# ---- load -------------------------------------------------------------------------------------


@dataclass
class Resumed:
    step: int
    client: dict  # this rank's client state (saved rank `rank`'s; saved rank 0's past N)
    saved_world_size: int
    notes: list[str] = field(default_factory=list)  # lines for rank 0 to print


def load(engine, tag_dir: Path, *, rank: int, world_size: int | None = None) -> Resumed:
    """Restore engine + this rank's RNG from a checkpoint written on any number of ranks.

    Same world size: DeepSpeed's load_checkpoint (exact resume). Another world size at ZeRO
    1-3: `load_elastic`. Either way the run's own settings then replace the checkpoint's
    (`restore_run_settings`). RNG: rank r takes saved rank r's state when there was a rank r;
    a rank beyond the saved world keeps its own fresh seed (trainer/build.py: run.seed + 1 +
    rank), so no two ranks share a dropout stream. The data position is the caller's
    (`load_data_states`)."""
    tag_dir = Path(tag_dir)
    world_size = world_size if world_size is not None else _world()
    saved_world = saved_world_size(tag_dir)
    own = tag_dir / f"rank_{rank:05d}.pt"
    client = load_client_state(own if rank < saved_world else tag_dir / "rank_00000.pt")
    step = int(client["step"])
    current = run_settings(engine)
    notes = []
    if saved_world == world_size or not _optim_files(tag_dir):
        # Equal world sizes, or ZeRO-0 (the optimizer state is whole in the model-states file).
        engine.load_checkpoint(
            str(tag_dir.parent),
            tag=tag_dir.name,
            load_optimizer_states=True,
            load_lr_scheduler_states=True,
        )
        saved = run_settings(engine)
    else:
        saved = load_elastic(engine, tag_dir)
        notes.append(
            f"resume: {tag_dir.name} was written by {saved_world} rank(s), this run has "
            f"{world_size}: weights, fp32 master weights and Adam moments re-partitioned"
        )
    if rank < saved_world:
        _set_rng_state(client["rng"])
    line = restore_run_settings(engine, current, saved, step)
    if line:
        notes.append(line)
    return Resumed(step, client, saved_world, notes)


# ---- elastic resume: an N-rank ZeRO checkpoint into an M-rank engine ------------------------

OPTIM_RE = re.compile(r"^(?:bf16_)?zero_pp_rank_(\d+)_mp_rank_00_optim_states\.pt$")
STATE_KEYS = ("fp32", "exp_avg", "exp_avg_sq")


def _optim_files(tag_dir: Path) -> list[Path]:
    """DeepSpeed's per-rank optimizer files, in rank order ([] at ZeRO-0)."""
    found = [(int(m.group(1)), p) for p in tag_dir.iterdir() if (m := OPTIM_RE.match(p.name))]
    return [p for _, p in sorted(found)]


def deepspeed_safe_globals() -> list:
    """The non-tensor objects in DeepSpeed's optimizer files (0.19.8): the loss scaler, the
    ZeRO stage enum and the parameter slice mappings' fragment addresses. Allowing exactly
    these lets weights_only=True read them; anything else in a file is refused."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]


def load_deepspeed_file(path: Path) -> dict:
    """One of DeepSpeed's checkpoint files, memory-mapped (tensors are read when touched),
    with weights_only=True and only `deepspeed_safe_globals` allowed."""
    try:
        with torch.serialization.safe_globals(deepspeed_safe_globals()):
            return torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except Exception as err:
        first = str(err).strip().splitlines()[0][:160] if str(err).strip() else type(err).__name__
        raise CheckpointError(
            f"{path}: cannot be read for an elastic resume ({first}); resume on the number of "
            "ranks that wrote it"
        ) from None


class _Flat:
    """A virtual concatenation of 1-D tensors, sliced without building the whole."""

    def __init__(self, parts: list[torch.Tensor]):
        self.parts = [p.reshape(-1) for p in parts]
        self.starts = [0]
        for part in self.parts:
            self.starts.append(self.starts[-1] + part.numel())

    @property
    def numel(self) -> int:
        return self.starts[-1]

    def slice(self, start: int, length: int) -> torch.Tensor:
        pieces, end = [], start + length
        for part, lo, hi in zip(self.parts, self.starts[:-1], self.starts[1:], strict=True):
            if hi > start and lo < end:
                pieces.append(part[max(start, lo) - lo : min(end, hi) - lo])
        out = torch.cat(pieces) if pieces else torch.empty(0)
        if out.numel() != length:
            raise CheckpointError(
                f"elastic resume: wanted {length} values at {start}, found {out.numel()}"
            )
        return out.float()


class ZeroCheckpoint:
    """The fp32 master weights and Adam moments of every parameter of an N-rank ZeRO-1/2/3
    checkpoint, read from its files (weights_only=True, memory-mapped: a parameter's values
    are read when it is asked for).

    Layouts (DeepSpeed 0.19.8; the same ones deepspeed.utils.zero_to_fp32 merges):
    - ZeRO-1/2: per param group, one flat vector (parameters in `param_shapes` order, each
      followed by its alignment padding) cut into N consecutive partitions; a rank's file
      holds its partition of the fp32 master weights without the group's tail padding
      (`single_partition_of_fp32_groups`) and the torch optimizer state of that partition with
      it (`base_optimizer_state`, padding length in `group_paddings`).
    - ZeRO-3: every parameter is cut into N equal pieces of ceil(numel/N) (the last one padded);
      rank r's flat groups hold piece r of each parameter in order (`fp32_flat_groups`, and the
      optimizer state of the same shape).
    """

    def __init__(self, tag_dir: Path):
        tag_dir = Path(tag_dir)
        files = _optim_files(tag_dir)
        if not files:
            raise CheckpointError(f"{tag_dir}: no ZeRO optimizer files (*_optim_states.pt)")
        self.world_size = len(files)
        states = [load_deepspeed_file(f)["optimizer_state_dict"] for f in files]
        if "zero_stage" not in states[0]:
            raise CheckpointError(
                f"{files[0]}: not a ZeRO-1/2/3 optimizer file; elastic resume supports ZeRO "
                "stages 1-3 (resume on the number of ranks that wrote it)"
            )
        self.stage = int(states[0]["zero_stage"])
        counts = states[0]["partition_count"]
        count = max(counts) if isinstance(counts, list) else int(counts)
        if count != self.world_size:
            raise CheckpointError(
                f"{tag_dir}: {self.world_size} optimizer files but written by {count} ranks; the "
                "checkpoint is incomplete"
            )
        model_name = (
            "zero_pp_rank_0_mp_rank_00_model_states.pt"
            if self.stage == 3
            else "mp_rank_00_model_states.pt"
        )
        model = load_deepspeed_file(tag_dir / model_name)
        self.param_shapes: list[dict[str, torch.Size]] = list(model["param_shapes"])
        self.lr_scheduler: dict | None = model.get("lr_scheduler")
        self.counters = {
            k: model.get(k, 0) for k in ("global_steps", "global_samples", "skipped_steps")
        }
        self.global_state = states[0]  # loss scaler, clip, version: the same on every rank
        self.shapes = {
            name: torch.Size(s) for group in self.param_shapes for name, s in group.items()
        }
        if self.stage <= 2:
            self._init_zero12(states)
        else:
            self._init_zero3(states)

    def _init_zero12(self, states: list[dict]) -> None:
        groups = len(self.param_shapes)
        rigid = isinstance(states[0]["base_optimizer_state"], dict)
        parts: dict[str, list[list[torch.Tensor]]] = {
            k: [[] for _ in range(groups)] for k in STATE_KEYS
        }
        for sd in states:
            fp32 = sd["single_partition_of_fp32_groups"]
            base = sd["base_optimizer_state"]
            for i in range(groups):
                parts["fp32"][i].append(fp32[i].reshape(-1))
                state = base["state"][i] if rigid else base[i]
                keep = fp32[i].numel()  # the partition without its share of the tail padding
                for key in ("exp_avg", "exp_avg_sq"):
                    parts[key][i].append(state[key].reshape(-1)[:keep])
        base0 = states[0]["base_optimizer_state"]
        first = base0["state"][0] if rigid else base0[0]
        self.step = first.get("step", states[0].get("base_optimizer_state_step"))
        self.param_groups = base0.get("param_groups") if rigid else None
        self._flats = {k: [_Flat(p) for p in parts[k]] for k in STATE_KEYS}
        paddings = states[0].get("param_alignment_paddings")
        self._where: dict[str, tuple[int, int]] = {}
        for i, shapes in enumerate(self.param_shapes):
            offset = 0
            for j, (name, shape) in enumerate(shapes.items()):
                self._where[name] = (i, offset)
                offset += torch.Size(shape).numel() + (paddings[i][j] if paddings else 0)
            if offset > self._flats["fp32"][i].numel:
                raise CheckpointError(f"elastic resume: param group {i} is shorter than its shapes")

    def _init_zero3(self, states: list[dict]) -> None:
        self._flats = {
            "fp32": [_Flat(list(sd["fp32_flat_groups"])) for sd in states],
            **{
                key: [
                    _Flat([sd["optimizer_state_dict"]["state"][i][key]
                           for i in range(len(sd["fp32_flat_groups"]))])
                    for sd in states
                ]
                for key in ("exp_avg", "exp_avg_sq")
            },
        }  # fmt: skip
        opt0 = states[0]["optimizer_state_dict"]
        self.step = opt0["state"][0].get("step")
        self.param_groups = opt0.get("param_groups")
        self._where = {}
        offset = 0
        for name, shape in self.shapes.items():
            self._where[name] = (-1, offset)
            offset += -(-shape.numel() // self.world_size)  # ceil: each rank's piece
        if offset != self._flats["fp32"][0].numel:
            raise CheckpointError(
                f"elastic resume: ZeRO-3 partitions hold {self._flats['fp32'][0].numel} values "
                f"per rank, the shapes need {offset}"
            )

    def full(self, name: str, key: str) -> torch.Tensor:
        """The whole fp32 tensor of `key` ("fp32", "exp_avg", "exp_avg_sq") of parameter
        `name`, in its shape."""
        shape = self.shapes[name]
        numel = shape.numel()
        group, offset = self._where[name]
        if self.stage <= 2:
            return self._flats[key][group].slice(offset, numel).view(shape)
        piece = -(-numel // self.world_size)
        pieces = [flat.slice(offset, piece) for flat in self._flats[key]]
        return torch.cat(pieces)[:numel].view(shape)

    def settings(self) -> dict:
        """The checkpoint's settings in `run_settings` form (for the "what changed" line)."""
        lambdas, base_lrs = [SimpleNamespace()], [None]
        if self.lr_scheduler:
            lambdas = [
                SimpleNamespace(**(fn or {})) for fn in self.lr_scheduler.get("lr_lambdas", [{}])
            ]
            base_lrs = list(self.lr_scheduler.get("base_lrs", [None]))
        groups = [{k: g[k] for k in HYPERPARAMS if k in g} for g in (self.param_groups or [])]
        clip = self.global_state.get("clip_grad")
        return {"lambdas": lambdas, "base_lrs": base_lrs, "groups": groups, "clip_grad": clip}


def _flat_partitions(optimizer, stage: int) -> list[tuple[torch.Tensor, dict]]:
    """(flat fp32 partition, its torch param group) pairs the Adam state belongs to. ZeRO-3
    hands the base optimizer one sub-group at a time (stage3._optimizer_step), so its flats
    are not in the param groups between steps."""
    base = optimizer.optimizer
    if stage == 3:
        flats = optimizer.fp32_partitioned_groups_flat
        groups = [base.param_groups[optimizer.sub_group_to_group_id[i]] for i in range(len(flats))]
        return list(zip(flats, groups, strict=True))
    return [(p, group) for group in base.param_groups for p in group["params"]]


def _ensure_optimizer_state(optimizer, stage: int, saved_step: Any) -> None:
    """Adam state for every flat partition of a fresh engine (torch creates it lazily at the
    first step), with the saved step count in the saved form (a tensor for torch's AdamW,
    on the parameter's device when fused or capturable, as torch itself puts it)."""
    state_of = optimizer.optimizer.state
    for flat, group in _flat_partitions(optimizer, stage):
        on_device = bool(group.get("fused") or group.get("capturable"))
        state = state_of[flat]
        if torch.is_tensor(saved_step):
            state["step"] = saved_step.detach().clone().to(flat.device if on_device else "cpu")
        else:
            state["step"] = copy.copy(saved_step)
            if saved_step is not None and "step" in group:
                group["step"] = saved_step  # optimizers that count per group (FusedAdam)
        for key in ("exp_avg", "exp_avg_sq"):
            if key not in state:
                state[key] = torch.zeros_like(flat, memory_format=torch.preserve_format)


def _zero3_piece(full: torch.Tensor, param, optimizer) -> torch.Tensor:
    """This rank's ZeRO-3 partition of `full`: piece r of ceil(numel/M), zero-padded."""
    n = param.ds_tensor.numel()
    rank = optimizer._get_param_partition_rank(param)
    flat = full.reshape(-1)
    piece = flat[rank * n : (rank + 1) * n]
    if piece.numel() < n:
        piece = torch.cat([piece, flat.new_zeros(n - piece.numel())])
    return piece


def load_elastic(engine, tag_dir: Path) -> dict:
    """Load an N-rank ZeRO-1/2/3 checkpoint into this M-rank engine; returns the checkpoint's
    settings (`run_settings` form).

    Chosen over DeepSpeed's universal checkpoint (ds_to_universal + "load_universal"): that
    needs an offline conversion pass writing a second, per-parameter copy of the checkpoint,
    and a DeepSpeed config flag that must be set before the engine exists, i.e. before we know
    whether the world size changed. Here the ranks read the N-rank files directly
    (`ZeroCheckpoint`, memory-mapped, weights_only=True) and each writes only its own
    partition through DeepSpeed's tensor-fragment API: safe_set_full_fp32_param /
    safe_set_full_optimizer_state at ZeRO-1/2, the safe_set_local_* forms at ZeRO-3 (whose
    full-tensor setter indexes past the end of a parameter whose size M does not divide).
    Then the 16/32-bit model weights are refreshed from the fp32 master weights, and the step
    count, loss scaler and engine counters are restored."""
    from deepspeed.utils import (
        safe_set_full_fp32_param,
        safe_set_full_optimizer_state,
        safe_set_local_fp32_param,
        safe_set_local_optimizer_state,
    )

    saved = ZeroCheckpoint(tag_dir)
    stage = engine.zero_optimization_stage()
    if stage not in (1, 2, 3):
        raise CheckpointError(
            f"{tag_dir} was written by {saved.world_size} ranks at ZeRO-{saved.stage}; this run "
            f"is ZeRO-{stage}: elastic resume needs ZeRO-1, 2 or 3 on both sides"
        )
    optimizer = engine.optimizer
    _ensure_optimizer_state(optimizer, stage, saved.step)
    if stage == 3:
        optimizer.checkpoint_event_prologue()  # every parameter partitioned
    else:
        optimizer._hp_optimizer_states_linked = False
        optimizer._lazy_init_hp_params_optimizer_state()  # fragments -> the new Adam state
    missing = [
        n for n, p in engine.module.named_parameters() if p.requires_grad and n not in saved.shapes
    ]
    if missing:
        raise CheckpointError(f"{tag_dir} lacks parameters of this model: {missing[:3]}")
    for name, param in engine.module.named_parameters():
        if not param.requires_grad:
            continue
        for key in STATE_KEYS:
            value = saved.full(name, key).to(engine.device)
            if stage == 3:
                piece = _zero3_piece(value, param, optimizer)
                if key == "fp32":
                    safe_set_local_fp32_param(param, piece)
                else:
                    safe_set_local_optimizer_state(param, piece, key)
            elif key == "fp32":
                safe_set_full_fp32_param(param, value)
            else:
                safe_set_full_optimizer_state(param, value, key)
    if stage == 3:
        with torch.no_grad():
            for i, fp32 in enumerate(optimizer.fp32_partitioned_groups_flat):
                if fp32.numel():
                    optimizer.fp16_partitioned_groups_flat[i].data.copy_(fp32.data)
        optimizer._load_global_state_stage3(saved.global_state)
        optimizer.checkpoint_event_epilogue()  # persistent parameters gathered again
    else:
        optimizer.update_lp_params()  # 16/32-bit model weights from the fp32 partitions
        optimizer._load_global_state(saved.global_state)
    for key, value in saved.counters.items():
        setattr(engine, key, value)
    if saved.lr_scheduler:
        engine.lr_scheduler.load_state_dict(saved.lr_scheduler)
    return saved.settings()
