"""Tar shards in img2dataset's webdataset layout: expanding shard specs, reading raw samples,
writing deterministic shards.

Reading is raw on purpose (bytes, never decoded): the loader shuffles and counts raw samples and
decodes only the ones it yields, so resuming can replay a position without decoding.
"""

from __future__ import annotations

import contextlib
import glob
import io
import shutil
import tarfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

import braceexpand
from webdataset.gopen import Pipe, gopen

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


REMOTE_SCHEMES = ("http", "https", "s3", "gs")
"""URL schemes read over the network (data.allow_remote): http(s) with curl, s3 with the AWS CLI
(`aws s3 cp URL -`), gs with gsutil (webdataset's `gopen`)."""


def is_remote(url: str) -> bool:
    """Is `url` an http/https/s3/gs URL (not a local path, not a `pipe:` command)?"""
    scheme, sep, _ = url.partition("://")
    return bool(sep) and scheme.lower() in REMOTE_SCHEMES


def expand_shards(spec: str, *, allow_pipe: bool = False, allow_remote: bool = False) -> list[str]:
    """Shard URLs of a spec: a directory (its *.tar, sorted), a brace pattern, a glob
    (`DIR/*.tar`, sorted; `**` recurses), a path, a `pipe:` command or a remote URL.

    Braces are expanded everywhere, as webdataset does (`pipe:curl -s http://h/{0..3}.tar` is
    four commands; write \\{ \\} \\, and \\\\ for literal braces, commas and backslashes).
    Local results are existing files only, so an empty list means nothing matched; `pipe:`
    commands (when allow_pipe) and http/https/s3/gs URLs (when allow_remote) are returned
    unchecked: their existence shows only when read."""
    if spec.startswith("pipe:"):
        return list(braceexpand.braceexpand(spec)) if allow_pipe else []
    if is_remote(spec):
        return list(braceexpand.braceexpand(spec)) if allow_remote else []
    path = Path(spec)
    if path.is_dir():
        return [str(p) for p in sorted(path.glob("*.tar"))]
    urls: list[str] = []
    for url in braceexpand.braceexpand(spec):
        if Path(url).is_file():
            urls.append(url)
        elif glob.has_magic(url):
            urls.extend(m for m in sorted(glob.glob(url, recursive=True)) if Path(m).is_file())
    return urls


def _open(url: str, allow_pipe: bool, allow_remote: bool = False) -> BinaryIO:
    """A local path, or (when allowed) a `pipe:` command or a remote URL, as a binary stream.

    Local paths and `pipe:` go through webdataset's `gopen`; its pipe object checks the
    command's exit status when closed, so a failing command is an error, not a silently short
    shard. Remote URLs: see `open_remote`. Every read failure is an OSError (read_shard turns
    it into one error sample that ends the shard)."""
    if url.startswith("pipe:") and not allow_pipe:
        raise ValueError(f"train_shards: refusing shell URL '{url}' (set data.allow_pipe=true)")
    if is_remote(url):
        if not allow_remote:
            raise ValueError(
                f"train_shards: refusing remote URL '{url}' (set data.allow_remote=true)"
            )
        return open_remote(url)
    return gopen(url, "rb")


CURL_CONNECT_SECONDS = 30
"""curl gives up on a connection not made within this many seconds."""
CURL_STALL_SECONDS = 60
"""curl gives up on a transfer that received nothing for this many seconds (a stalled server
must end the shard with an error, not hang the worker)."""

_CURL_ERRORS = {
    6: "could not resolve host",
    7: "could not connect",
    18: "transfer closed early (partial file)",
    22: "HTTP error status (e.g. 404)",
    28: "timed out",
    35: "TLS handshake failed",
    52: "empty reply from server",
    56: "connection lost while receiving",
}


def open_remote(url: str) -> BinaryIO:
    """Stream an http/https/s3/gs URL through a download command's stdout.

    http(s): curl, failing on HTTP errors (--fail), on a connection not made in
    CURL_CONNECT_SECONDS and on CURL_STALL_SECONDS without data; no retries (a retry after part
    of the body was written would append a second copy to the stream). s3: `aws s3 cp URL -`
    (credentials from the AWS CLI's usual configuration). gs: `gsutil cat URL`, as webdataset's
    `gopen` does. A command that exits non-zero raises OSError naming the URL at the end of
    its data, never a silently short shard; closing before the end stops the command."""
    scheme = url.partition("://")[0].lower()
    if scheme in ("http", "https"):
        args = [
            "curl", "--fail", "--silent", "--show-error", "--location",
            "--proto", "=http,https", "--proto-redir", "=http,https",
            "--connect-timeout", str(CURL_CONNECT_SECONDS),
            "--speed-limit", "1", "--speed-time", str(CURL_STALL_SECONDS),
            url,
        ]  # fmt: skip
    elif scheme == "s3":
        args = ["aws", "s3", "cp", "--quiet", url, "-"]
    elif scheme == "gs":
        args = ["gsutil", "cat", url]
    else:
        raise ValueError(f"train_shards: '{url}': no reader for {scheme}:// URLs")
    if shutil.which(args[0]) is None:
        raise ValueError(
            f"train_shards: reading {scheme}:// URLs needs the '{args[0]}' command on PATH; "
            "install it, or download the shards and point data.train_shards at them"
        )
    return _Download(args, url)


class _Download(Pipe):
    """webdataset's Pipe around a download command, checked at the end of its data.

    At end of data it waits for the command and raises OSError (one line: command, status,
    URL) unless the status is 0, so the status is checked exactly once and deterministically;
    closed before the end (an early stop), it stops the command instead of waiting for it."""

    def __init__(self, args: list[str], url: str) -> None:
        super().__init__(args, mode="rb", bufsize=1 << 16)
        self.url, self.command, self.at_end = url, args[0], False

    def read(self, *args, **kw) -> bytes:
        data = self.stream.read(*args, **kw)
        if not data and (not args or args[0] != 0):
            self.at_end = True
            self.wait_for_child()
        return data

    def wait_for_child(self) -> None:
        if self.status is not None:
            return
        self.status = self.proc.wait()
        if self.status != 0:
            why = _CURL_ERRORS.get(self.status, "") if self.command == "curl" else ""
            raise OSError(
                f"{self.command} exited with status {self.status}"
                f"{f' ({why})' if why else ''} reading {self.url}"
            )

    def close(self) -> None:
        if self.stream.closed:
            return
        self.stream.close()
        if not self.at_end and self.proc.poll() is None:
            self.proc.kill()  # stopped early: the rest of the download is not wanted
            self.status = self.proc.wait()
            return
        self.wait_for_child()


def _close_quietly(stream: BinaryIO) -> None:
    with contextlib.suppress(OSError):
        stream.close()


def _split_name(name: str) -> tuple[str, str]:
    """'dir/000000123.jpg' -> ('dir/000000123', 'jpg'): webdataset keys end at the basename's
    first dot, so 'x.seg.png' belongs to key 'x' with extension 'seg.png'."""
    head, _, base = name.rpartition("/")
    stem, _, ext = base.partition(".")
    return (f"{head}/{stem}" if head else stem), ext.lower()


class _CountingReader(io.RawIOBase):
    """A file wrapper that adds every byte read to BYTES_READ (resume cost, bench/resume_bench.py)."""

    def __init__(self, raw: BinaryIO) -> None:
        self.raw = raw

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return getattr(self.raw, "seekable", lambda: False)()

    def read(self, size: int = -1) -> bytes:
        data = self.raw.read(size)
        BYTES_READ[0] += len(data)
        return data

    def readinto(self, buffer) -> int:
        data = self.read(len(buffer))
        buffer[: len(data)] = data
        return len(data)

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        return self.raw.seek(offset, whence)

    def tell(self) -> int:
        return self.raw.tell()

    def close(self) -> None:
        self.raw.close()  # a pipe's exit status is checked here
        super().close()


BYTES_READ = [0]  # bytes this process has read from shards (a list: mutable from anywhere)


def read_shard(
    url: str, *, allow_pipe: bool = False, allow_remote: bool = False, offset: int = 0
) -> Iterator[RawSample]:
    """Raw samples of one shard in stored order, from byte `offset` (the start of a sample, as
    found in a previous read's `ref`). A truncated or unreadable tar ends the shard with one
    `error` sample naming it (the samples before it are still yielded).

    Local shards are read in tarfile's random-access mode, so each sample's `ref` is
    [byte offset of its first member, byte offset just after it]: a resume seeks there instead
    of reading the shard from its start. Pipes and remote URLs cannot seek: `ref` is None and
    `offset` must be 0."""
    stream = _CountingReader(_open(url, allow_pipe, allow_remote))
    seekable = stream.seekable()
    if offset:
        if not seekable:
            stream.close()
            raise ValueError(f"{url}: cannot seek to byte {offset} (not a local file)")
        stream.seek(offset)
    current: RawSample | None = None
    start = end = 0
    try:
        with tarfile.open(fileobj=stream, mode="r:" if seekable else "r|") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                key, ext = _split_name(member.name)
                data = tar.extractfile(member).read()
                if current is not None and key != current.key:
                    current.ref = [start, member.offset] if seekable else None
                    yield current
                    current = None
                if current is None:
                    current, start = RawSample(shard=url, key=key), member.offset
                current.members.setdefault(ext, data)
            end = tar.offset  # just after the last member read
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
        current.ref = [start, end] if seekable else None
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
