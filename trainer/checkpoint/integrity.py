"""Checkpoints one can trust later: RUN/ shared by every rank, a manifest of every file's size
and sha256, verification on resume (all ranks agree), and the choice of the tag to resume."""

from __future__ import annotations

import contextlib
import hashlib
import json
import secrets
from dataclasses import dataclass
from pathlib import Path

import torch.distributed as dist

from trainer.checkpoint.layout import (
    COMPLETE,
    HASH_CHUNK,
    MANIFEST,
    MANIFEST_VERSION,
    PROBE_PREFIX,
    CheckpointConfig,
    CheckpointError,
    StorageError,
    _all_gather,
    _atomic_write_text,
    _broadcast,
    _distributed,
    _rank,
    _world,
    complete_tags,
)

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
