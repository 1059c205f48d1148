"""Tar shards in img2dataset's webdataset layout: expanding shard specs, reading raw samples,
writing deterministic shards.

Reading is raw on purpose (bytes, never decoded): the loader shuffles and counts raw samples and
decodes only the ones it yields, so resuming can replay a position without decoding. Local
shards are parsed by a small tar reader of this module's own, which gives exactly tarfile's
samples at a fraction of its CPU and hands anything unusual (damage, sparse files, global pax
headers) to tarfile; pipes and remote URLs are read by tarfile as streams.
"""

from __future__ import annotations

import contextlib
import glob
import io
import re
import shutil
import tarfile
import zlib
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

    Local shards can seek: each sample's `ref` is [byte offset of its first member, byte offset
    just after it], so a resume seeks there instead of reading the shard from its start. They
    are parsed directly (`_direct_samples`), with exactly tarfile's results. Pipes and remote
    URLs cannot seek: tarfile reads them as a stream, `ref` is None and `offset` must be 0."""
    raw = _open(url, allow_pipe, allow_remote)
    if not getattr(raw, "seekable", lambda: False)():
        stream = _CountingReader(raw)
        if offset:
            stream.close()
            raise ValueError(f"{url}: cannot seek to byte {offset} (not a local file)")
        yield from _tarfile_samples(url, stream, seekable=False)
        return
    if offset:
        raw.seek(offset)
    yield from _direct_samples(url, raw, offset)


def _tarfile_samples(url: str, stream: _CountingReader, seekable: bool) -> Iterator[RawSample]:
    """read_shard by tarfile, from the stream's position: for streams that cannot seek, and for
    local shards from where the direct reader met something it leaves to tarfile."""
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


# ---- the direct reader of local shards ------------------------------------------------------
#
# tarfile's per-member machinery (TarInfo.frombuf, two checksums by struct, the file object
# wrappers around every read) was 14-38% of a loader worker's CPU. The reader below parses the
# 512-byte headers itself from large reads and produces exactly what _tarfile_samples produces
# from the same bytes: the same members, names, offsets and end. Whatever it does not handle
# that way -- damage of any kind (truncation, a bad checksum or number field, a malformed pax
# record), sparse files, global or Solaris pax headers, unknown member types -- raises _Unusual,
# and tarfile reads the shard on from the start of the sample in progress (so no sample is
# yielded twice), so even its quiet endings and error messages stay tarfile's.

_BLOCK = 512
_ZERO_BLOCK = bytes(_BLOCK)
_FIRST_READ = 64 << 10
"""The first read ahead, once a shard is read past its first sample (see _Window)."""
_MAX_READ = 1 << 20
"""Reads ahead double from _FIRST_READ up to this (a whole-shard pass makes few large reads)."""
_MAX_CHAIN = 8
"""Extended headers (pax 'x', GNU 'L'/'K') before one member beyond which tarfile takes over."""

_REGULAR = frozenset(b"0\x007")  # tarfile.REGULAR_TYPES without sparse 'S': members with data
_NO_DATA = frozenset(b"123456")  # links, devices, directories, fifos: no data blocks follow
_LONG_NAME, _LONG_LINK, _PAX = ord("L"), ord("K"), ord("x")
_NUMBER_FIELDS = ((100, 108), (108, 116), (116, 124), (136, 148), (329, 337), (337, 345))
"""mode, uid, gid, mtime, devmajor, devminor: unused, but tarfile rejects a header whose
number fields do not parse, so they are checked too."""
_PAX_RECORD = re.compile(rb"(\d+) ([^=]+)=")  # tarfile's: "LENGTH KEYWORD=VALUE\n"


class _Unusual(Exception):
    """Something in the tar the direct reader leaves to tarfile (see above)."""


def _padded(size: int) -> int:
    """`size` rounded up to whole blocks (tarfile's TarInfo._block)."""
    return -(-size // _BLOCK) * _BLOCK


def _number(field: bytes) -> int:
    """A header number field as tarfile.nti reads it: base-256 when the first byte is 0o200
    (positive) or 0o377 (negative), else octal text up to the first NUL; _Unusual where nti
    raises."""
    if field[0] in (0o200, 0o377):
        value = int.from_bytes(field[1:], "big")
        return value - 256 ** (len(field) - 1) if field[0] == 0o377 else value
    nul = field.find(0)
    text = field if nul < 0 else field[:nul]
    try:
        return int(text, 8)  # where this parses, nti gives the same value
    except ValueError:
        pass
    try:
        return int(text.decode("ascii").strip() or "0", 8)  # nti itself: blanks, empty = 0
    except ValueError:
        raise _Unusual from None


def _checksum(header: bytes) -> int:
    """tarfile's unsigned header checksum: 256 + the sum of the bytes outside the checksum
    field. zlib.adler32's low half is 1 + the byte sum modulo 65521, exact for pieces of at
    most 256 bytes (4x faster than sum() over the bytes)."""
    return (
        (zlib.adler32(header[:148]) & 0xFFFF)
        + (zlib.adler32(header[156:384]) & 0xFFFF)
        + (zlib.adler32(header[384:]) & 0xFFFF)
        + 253  # 256 for the checksum field as spaces, less the three adler32 start values
    )


def _text(field: bytes) -> str:
    """A name field as tarfile.nts decodes it with a TarFile's default encoding and errors."""
    nul = field.find(0)
    return (field if nul < 0 else field[:nul]).decode(tarfile.ENCODING, "surrogateescape")


def _pax_field(value: bytes, fallback: str) -> str:
    """A pax record's text as tarfile decodes it: UTF-8, else `fallback` with surrogates."""
    try:
        return value.decode("utf-8")
    except UnicodeDecodeError:
        return value.decode(fallback, "surrogateescape")


def _pax_path_size(records: bytes, size: int) -> tuple[str | None, int | None]:
    """The `path` and `size` of an extended header's records (`size` bytes of them, then the
    padding), as tarfile parses them. Only well-formed records are read here: each "LENGTH
    KEYWORD=VALUE\n" exactly LENGTH bytes, together exactly `size`, so tarfile versions,
    whose parsers differ on malformed ones, agree on them; hdrcharset and GNU sparse records,
    which change how tarfile reads the member, are left to tarfile."""
    if b"hdrcharset=" in records or b"GNU.sparse" in records:
        raise _Unusual
    path = new_size = None
    pos = 0
    while match := _PAX_RECORD.match(records, pos):
        end = pos + int(match.group(1))
        if end > size or match.end() >= end or records[end - 1] != 0x0A:
            raise _Unusual
        keyword = _pax_field(match.group(2), "utf-8")
        value = records[match.end() : end - 1]
        if keyword == "path":
            path = _pax_field(value, tarfile.ENCODING)
        elif keyword == "size":
            if not value.isdigit():
                raise _Unusual  # tarfile reads it as 0, or as int() of other digits
            new_size = int(value)
        pos = end
    if pos != size:
        raise _Unusual
    return path, new_size


class _Window:
    """A seekable file's bytes from the reading position on: `data` holds the file's bytes
    [base, base + len(data)); bytes before `keep` (what the reader is done with) are dropped
    when more are read. Every byte read is added to BYTES_READ.

    Until `read_ahead` it reads just the bytes asked for, as tarfile did: a resume's fetch
    reads one sample from an offset and should cost no more than that. After it, reads start
    at _FIRST_READ and double up to _MAX_READ."""

    def __init__(self, raw: BinaryIO, base: int) -> None:
        self.raw, self.base, self.keep = raw, base, base
        self.data, self.eof, self.read_size = b"", False, 0

    def read_ahead(self) -> None:
        """From now on, read in large blocks (the shard is being read on)."""
        self.read_size = self.read_size or _FIRST_READ

    @property
    def end(self) -> int:
        """The file offset just after the bytes held (the file's size once `eof`)."""
        return self.base + len(self.data)

    def have(self, end: int) -> bool:
        """Are the file's bytes up to offset `end` held (reading more if needed)? False only
        where the file ends before `end`."""
        return end <= self.base + len(self.data) or self._fill(end)

    def _fill(self, end: int) -> bool:
        if self.eof:
            return False
        cut = min(self.keep - self.base, len(self.data))
        self.data, self.base = self.data[cut:], self.base + cut
        parts, missing = [self.data], end - self.end
        want = max(missing, self.read_size)
        self.read_size = min(2 * self.read_size, _MAX_READ)
        while missing > 0:
            chunk = self.raw.read(want)
            BYTES_READ[0] += len(chunk)
            if not chunk:
                self.eof = True
                break
            parts.append(chunk)
            missing -= len(chunk)
            want -= len(chunk)
        self.data = b"".join(parts)
        return end <= self.end

    def span(self, start: int, size: int) -> bytes:
        """The file's `size` bytes from offset `start` (held: see `have`)."""
        return self.data[start - self.base : start - self.base + size]


class _TarScan:
    """The regular-file members of a tar from a file offset, parsed as tarfile parses them:
    iterating gives (offset of the member's first header, name, data); afterwards `end` is
    tarfile's `offset` after the last member (where the end-of-archive blocks start)."""

    def __init__(self, raw: BinaryIO, offset: int) -> None:
        self.window = _Window(raw, offset)
        self.end = offset
        self.valid: set[bytes] = set()  # number fields already checked (they repeat)

    def __iter__(self) -> Iterator[tuple[int, str, bytes]]:
        window, pos = self.window, self.end
        while True:
            window.keep = pos
            if not window.have(pos + _BLOCK):
                if window.eof and window.end == pos and pos != 0:
                    return  # no end-of-archive blocks: tarfile ends here too
                raise _Unusual  # truncated (or empty): tarfile ends quietly or raises
            header = window.span(pos, _BLOCK)
            if header == _ZERO_BLOCK:
                return
            name, size, data_start, end = self._member(pos, header, 0)
            if name is not None:
                if not window.have(data_start + size):
                    raise _Unusual  # truncated data: tarfile raises
                yield pos, name, window.span(data_start, size)
            self.end = pos = end

    def _member(self, pos: int, header: bytes, depth: int) -> tuple[str | None, int, int, int]:
        """The member whose headers start at `pos`, as TarInfo.fromtarfile reads it: (name,
        or None for a member without data such as a directory; size; offset of its data;
        offset of the next header)."""
        if _number(header[148:156]) != _checksum(header):
            raise _Unusual  # a bad checksum, or a signed one: tarfile decides
        self._check_numbers(header)
        size = _number(header[124:136])
        if size < 0:
            raise _Unusual
        kind, data_start = header[156], pos + _BLOCK
        if kind in _REGULAR:
            name = _text(header[:100])
            if kind == 0 and name.endswith("/"):
                return None, size, data_start, data_start  # old-style directory
            if header[345]:
                name = f"{_text(header[345:500])}/{name}"  # ustar prefix
            return name, size, data_start, data_start + _padded(size)
        if kind in _NO_DATA:
            return None, size, data_start, data_start
        if kind in (_LONG_NAME, _LONG_LINK, _PAX) and depth < _MAX_CHAIN:
            return self._extended(kind, data_start, size, depth)
        raise _Unusual  # sparse 'S', global pax 'g', Solaris 'X', unknown types

    def _extended(
        self, kind: int, data_start: int, size: int, depth: int
    ) -> tuple[str | None, int, int, int]:
        """A GNU long name / long link or a pax extended header at `data_start` - _BLOCK,
        applied to the member that follows it as tarfile applies them."""
        window, following = self.window, data_start + _padded(size)
        if not window.have(following + _BLOCK):
            raise _Unusual  # truncated: tarfile raises
        content = window.span(data_start, following - data_start)
        header = window.span(following, _BLOCK)
        if header == _ZERO_BLOCK:
            raise _Unusual  # tarfile raises: an extended header must be followed by a member
        path, new_size = _pax_path_size(content, size) if kind == _PAX else (None, None)
        name, size, start, end = self._member(following, header, depth + 1)
        if name is None or kind == _LONG_LINK:
            return name, size, start, end
        if kind == _LONG_NAME:
            return _text(content), size, start, end
        if path is not None:
            name = path.rstrip("/")
        if new_size is not None:
            size, end = new_size, start + _padded(new_size)
        return name, size, start, end

    def _check_numbers(self, header: bytes) -> None:
        """Raise _Unusual where a number field tarfile parses but this reader does not use
        would make tarfile reject the header."""
        valid, ids, mtime, devices = self.valid, header[100:124], header[136:148], header[329:345]
        if ids in valid and mtime in valid and devices in valid:
            return
        for a, b in _NUMBER_FIELDS:
            _number(header[a:b])
        if len(valid) > 4096:
            valid.clear()
        valid.update((ids, mtime, devices))


def _direct_samples(url: str, raw: BinaryIO, offset: int) -> Iterator[RawSample]:
    """read_shard for a local shard positioned at `offset`, parsed by _TarScan. A sample is
    yielded once the first member of the next one is read whole (data included), where tarfile
    yields it; where _TarScan meets something unusual, tarfile reads on from the start of the
    sample in progress (so nothing is yielded twice)."""
    scan = _TarScan(raw, offset)
    current: RawSample | None = None
    start = offset
    try:
        for begin, name, data in scan:
            key, ext = _split_name(name)
            if current is not None and key != current.key:
                current.ref = [start, begin]
                yield current
                scan.window.read_ahead()  # asked for more than one sample
                current = None
            if current is None:
                current, start = RawSample(shard=url, key=key), begin
            current.members.setdefault(ext, data)
    except _Unusual:
        raw.seek(start)
        yield from _tarfile_samples(url, _CountingReader(raw), seekable=True)
        return
    except OSError as exc:
        yield RawSample(
            shard=url, key=current.key if current else "?", error=f"truncated tar: {exc}"
        )
        return
    finally:
        _close_quietly(raw)
    if current is not None:
        current.ref = [start, scan.end]
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
