"""Tar shards in img2dataset's webdataset layout: expanding shard specs, reading raw samples,
writing deterministic shards.

Reading is raw on purpose (bytes, never decoded): the loader shuffles and counts raw samples and
decodes only the ones it yields, so resuming can replay a position without decoding.
"""

from __future__ import annotations

import contextlib
import io
import tarfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

import braceexpand
from webdataset.gopen import gopen

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")


@dataclass
class RawSample:
    """One sample as stored: where it came from and its undecoded members.

    `members` maps each member's extension ("jpg", "txt", "json", "seg.png", ...) to its bytes;
    which of them is the image and which the caption is the decoder's choice (data/decode.py).
    `ref` says where to read the sample again (a source-specific small list: for tar shards
    [shard index, byte offset]; None where the source cannot seek). `error` is set for a
    sample that cannot be used whatever happens next (a truncated tar); the loader skips and
    counts it."""

    shard: str
    key: str
    members: dict[str, bytes] = field(default_factory=dict)
    error: str | None = None
    ref: list | None = None

    @property
    def image(self) -> bytes | None:
        """The first member with an image extension, in IMAGE_EXTS order."""
        return next((self.members[e] for e in IMAGE_EXTS if e in self.members), None)

    @property
    def text(self) -> bytes | None:
        return self.members.get("txt")

    @property
    def meta(self) -> bytes | None:
        return self.members.get("json")


def expand_shards(spec: str, *, allow_pipe: bool = False) -> list[str]:
    """Shard URLs of a spec: a directory (its *.tar, sorted), a brace pattern, or a path.

    Only existing local files are returned (plus `pipe:` URLs when allowed), so an empty list
    means nothing matched."""
    if spec.startswith("pipe:"):
        return [spec] if allow_pipe else []
    path = Path(spec)
    if path.is_dir():
        return [str(p) for p in sorted(path.glob("*.tar"))]
    return [url for url in braceexpand.braceexpand(spec) if Path(url).is_file()]


def _open(url: str, allow_pipe: bool) -> BinaryIO:
    """A local path or (when allowed) a `pipe:` URL, opened by webdataset's `gopen`: its pipe
    object checks the command's exit status when closed, so a failing command is an error, not
    a silently short shard."""
    if url.startswith("pipe:") and not allow_pipe:
        raise ValueError(f"train_shards: refusing shell URL '{url}' (set data.allow_pipe=true)")
    return gopen(url, "rb")


def _close_quietly(stream: BinaryIO) -> None:
    with contextlib.suppress(OSError):
        stream.close()


def _split_name(name: str) -> tuple[str, str]:
    """'dir/000000123.jpg' -> ('dir/000000123', 'jpg'): webdataset keys end at the basename's
    first dot, so 'x.seg.png' belongs to key 'x' with extension 'seg.png'."""
    head, _, base = name.rpartition("/")
    stem, _, ext = base.partition(".")
    return (f"{head}/{stem}" if head else stem), ext.lower()


def read_shard(url: str, *, allow_pipe: bool = False) -> Iterator[RawSample]:
    """Raw samples of one shard in stored order. A truncated or unreadable tar ends the shard
    with one `error` sample naming it (the samples before it are still yielded)."""
    stream = _open(url, allow_pipe)
    current: RawSample | None = None
    try:
        with tarfile.open(fileobj=stream, mode="r|") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                key, ext = _split_name(member.name)
                data = tar.extractfile(member).read()
                if current is not None and key != current.key:
                    yield current
                    current = None
                if current is None:
                    current = RawSample(shard=url, key=key)
                current.members.setdefault(ext, data)
        stream.close()  # for a pipe: URL this raises if the command failed
    except (tarfile.TarError, OSError, EOFError) as exc:
        # The half-read sample is dropped with the rest of the shard: it may be incomplete.
        yield RawSample(
            shard=url, key=current.key if current else "?", error=f"truncated tar: {exc}"
        )
        current = None
    finally:
        _close_quietly(stream)  # after an error or an early stop (closing twice is a no-op)
    if current is not None:
        yield current


def write_shard(path: Path, members: Iterable[tuple[str, bytes]]) -> None:
    """Write (name, bytes) members to a tar whose bytes depend only on the members: fixed
    mtime, owner and mode, in the order given."""
    with (
        open(path, "wb") as raw,
        tarfile.open(fileobj=raw, mode="w", format=tarfile.USTAR_FORMAT) as tar,
    ):
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mtime = 0
            info.mode = 0o644
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            tar.addfile(info, io.BytesIO(data))
