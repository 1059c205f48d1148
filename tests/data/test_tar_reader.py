"""read_shard's direct tar reader against tarfile: the same samples, refs and error samples for
ustar, GNU and pax tars, hand-made headers tarfile reads, and truncated or damaged files.

The reference is read_shard as it was when it iterated tarfile (copied below), so any
difference in what the loader sees shows here."""

from __future__ import annotations

import io
import tarfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from data import shards
from data.shards import BYTES_READ, RawSample, _split_name, read_shard, write_shard


def _reference_read_shard(url: str, offset: int = 0) -> Iterator[RawSample]:
    """read_shard before the direct reader, for a local file (the shape of its except clause,
    its offsets and its end kept as they were)."""
    stream = open(url, "rb")  # noqa: SIM115 (closed in the finally clause, as read_shard did)
    seekable = stream.seekable()
    if offset:
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
        stream.close()
    except (tarfile.TarError, OSError, EOFError) as exc:
        yield RawSample(
            shard=url, key=current.key if current else "?", error=f"truncated tar: {exc}"
        )
        current = None
    finally:
        stream.close()
    if current is not None:
        current.ref = [start, end] if seekable else None
        yield current


# ---- building tars ------------------------------------------------------------------------

DIR, LINK = object(), object()  # member kinds besides bytes: a directory, a symlink


def _payload(n: int, seed: int) -> bytes:
    return bytes((seed * 31 + i * 7) % 251 for i in range(n))


def _members(long_names: bool) -> list[tuple[str, object]]:
    """Names and contents covering what the reader must get right: multi-member samples,
    sizes on and off block boundaries, empty members, a repeated extension (the first wins),
    directories and a symlink between members, keys with a directory and a multi-dot
    extension, a name split into ustar prefix + name, non-ASCII names, a member without an
    extension, a name filling its field, a key that comes back after another."""
    members: list[tuple[str, object]] = [
        ("000000.jpg", _payload(700, 0)),
        ("000000.txt", _payload(512, 1)),
        ("000000.json", b""),
        ("dir", DIR),
        ("dir/x.seg.png", _payload(1500, 2)),
        ("dir/x.jpg", _payload(1024, 3)),
        ("dir/x.JPG", b"second jpg: setdefault keeps the first"),
        ("a" * 70 + "/" + "b" * 50 + "/000001.jpg", _payload(33, 4)),  # ustar: prefix + name
        ("a" * 70 + "/" + "b" * 50 + "/000001.txt", b"a caption"),
        ("données/000002.jpg", _payload(2048, 5)),
        ("données/000002.txt", "légende ✓".encode()),
        ("000003.jpg", _payload(1, 6)),
        ("000003.alt", LINK),
        ("000003.txt", _payload(511, 7)),
        ("README", b"no extension"),
        ("y" * 96 + ".jpg", _payload(5, 13)),  # 100 characters: the name field has no NUL
        ("k.jpg", _payload(100, 8)),
        ("m.jpg", _payload(100, 9)),
        ("k.txt", _payload(100, 10)),
    ]
    if long_names:  # beyond ustar: GNU 'L' headers, pax path records
        deep = "/".join(f"level{i:02d}" for i in range(30))
        members += [
            (f"{deep}/000004.jpg", _payload(900, 11)),
            (f"{deep}/000004.txt", b"long"),
            ("x" * 150 + ".jpg", _payload(10, 12)),
            ("日本語の長い名前" * 10 + "/000005.txt", b"non-ascii long"),
        ]
    return members


def _write_tar(path: Path, members: list[tuple[str, object]], fmt: int, **kw) -> Path:
    with tarfile.open(path, "w", format=fmt, **kw) as tar:
        for i, (name, content) in enumerate(members):
            info = tarfile.TarInfo(name)
            info.mtime, info.mode = 1_700_000_000 + i, 0o644
            if fmt != tarfile.USTAR_FORMAT and i == 3:
                info.uid = 8**8  # GNU: a base-256 uid; pax: a uid record
            if fmt == tarfile.PAX_FORMAT and i == 4:
                info.mtime = 1_700_000_000.5  # a pax mtime record
            if content is DIR:
                info.type = tarfile.DIRTYPE
                tar.addfile(info)
            elif content is LINK:
                info.type, info.linkname = tarfile.SYMTYPE, "000003.jpg"
                tar.addfile(info)
            else:
                info.size = len(content)
                tar.addfile(info, io.BytesIO(content))
    return path


FORMATS = {"ustar": tarfile.USTAR_FORMAT, "gnu": tarfile.GNU_FORMAT, "pax": tarfile.PAX_FORMAT}


@pytest.fixture(scope="module")
def tars(tmp_path_factory) -> dict[str, Path]:
    """One tar per format with _members, and one by write_shard."""
    out = tmp_path_factory.mktemp("tars")
    made = {
        name: _write_tar(out / f"{name}.tar", _members(fmt != tarfile.USTAR_FORMAT), fmt)
        for name, fmt in FORMATS.items()
    }
    made["write_shard"] = out / "write_shard.tar"
    write_shard(
        made["write_shard"],
        [(n, c) for n, c in _members(False) if isinstance(c, bytes)],
    )
    return made


def _header(name: str, size: int, kind: bytes = tarfile.REGTYPE) -> bytes:
    info = tarfile.TarInfo(name)
    info.size, info.type, info.mtime = size, kind, 0
    return info.tobuf(tarfile.USTAR_FORMAT)


def _member(name: str, data: bytes) -> bytes:
    """A ustar member: header, data, padding."""
    return _header(name, len(data)) + data + bytes(-len(data) % 512)


def _rechecksum(header: bytearray, signed: bool = False) -> None:
    """Write the header's checksum (signed: as Sun and NeXT tars summed, chars as signed)."""
    header[148:156] = b" " * 8
    total = sum(b - 256 if signed and b > 127 else b for b in header)
    header[148:156] = b"%06o\0 " % total


def _both(path: Path, offset: int = 0) -> tuple[list[RawSample], list[RawSample]]:
    return list(read_shard(str(path), offset=offset)), list(
        _reference_read_shard(str(path), offset=offset)
    )


def _assert_same(path: Path) -> list[RawSample]:
    got, want = _both(path)
    assert got == want
    return got


@pytest.fixture
def tarfile_from(monkeypatch) -> list[int]:
    """The offsets from which read_shard handed a local shard to tarfile (none: it read it
    all itself), so that a test shows which reader produced what it compares."""
    offsets: list[int] = []
    real = shards._tarfile_samples

    def recording(url, stream, seekable):
        offsets.append(stream.tell())
        return real(url, stream, seekable)

    monkeypatch.setattr(shards, "_tarfile_samples", recording)
    return offsets


# ---- whole tars -----------------------------------------------------------------------------


@pytest.mark.parametrize("kind", [*FORMATS, "write_shard"])
def test_same_samples_and_refs_as_tarfile(tars, kind, tarfile_from):
    got = _assert_same(tars[kind])
    assert tarfile_from == []  # the formats shards are written in need no tarfile
    assert not any(s.error for s in got)
    keys = [s.key for s in got]
    assert keys[:4] == ["000000", "dir/x", "a" * 70 + "/" + "b" * 50 + "/000001", "données/000002"]
    assert keys.count("k") == 2  # a key that comes back is a new sample, as in tarfile
    x = got[1]
    assert set(x.members) == {"seg.png", "jpg"} and x.members["jpg"] == _payload(1024, 3)
    assert got[0].members == {"jpg": _payload(700, 0), "txt": _payload(512, 1), "json": b""}


@pytest.mark.parametrize("kind", [*FORMATS, "write_shard"])
def test_reading_from_each_ref_gives_the_rest(tars, kind, tarfile_from):
    samples = list(_reference_read_shard(str(tars[kind])))
    for i, sample in enumerate(samples):
        got, want = _both(tars[kind], offset=sample.ref[0])
        assert got == want == samples[i:]
    assert tarfile_from == []


def test_refs_are_header_offsets(tmp_path):
    """Two samples of a jpg (100 bytes) and a txt (10): headers at 0, 1024, 2048, 3072; the
    last ref ends where the end-of-archive blocks start."""
    path = tmp_path / "s.tar"
    write_shard(path, [("a.jpg", b"j" * 100), ("a.txt", b"t" * 10)] * 1
                + [("b.jpg", b"J" * 100), ("b.txt", b"T" * 10)])  # fmt: skip
    got = list(read_shard(str(path)))
    assert [(s.key, s.ref) for s in got] == [("a", [0, 2048]), ("b", [2048, 4096])]
    assert got[1].members == {"jpg": b"J" * 100, "txt": b"T" * 10}
    assert list(read_shard(str(path), offset=2048)) == got[1:]


def test_member_larger_than_a_read(tmp_path):
    big = _payload(3 << 20, 1)  # > _MAX_READ
    path = tmp_path / "big.tar"
    write_shard(path, [("a.txt", b"x"), ("a.jpg", big), ("b.jpg", big[:5000]), ("c.jpg", b"c")])
    got = _assert_same(path)
    assert got[0].members["jpg"] == big and [s.key for s in got] == ["a", "b", "c"]


def test_no_end_of_archive_blocks(tmp_path):
    path = tmp_path / "open.tar"
    path.write_bytes(_member("a.jpg", b"1" * 512) + _member("b.jpg", b"2" * 3))
    got = _assert_same(path)
    assert [s.ref for s in got] == [[0, 1024], [1024, 2048]]


# ---- headers tarfile reads that the writer above does not make --------------------------------


def test_base256_size_field(tmp_path, tarfile_from):
    header = bytearray(_header("a.jpg", 0))
    header[124:136] = b"\x80" + (700).to_bytes(11, "big")
    _rechecksum(header)
    path = tmp_path / "b256.tar"
    path.write_bytes(bytes(header) + _payload(700, 1) + bytes(324) + _member("a.txt", b"t")
                     + bytes(1024))  # fmt: skip
    got = _assert_same(path)
    assert got[0].members == {"jpg": _payload(700, 1), "txt": b"t"} and tarfile_from == []


def test_pax_size_and_path_records(tmp_path, tarfile_from):
    """A pax header whose size record replaces the ustar size field (0 here) and whose path
    record (with a trailing slash, stripped as tarfile does) replaces the name."""
    pax = tarfile.TarInfo._create_pax_generic_header(
        {"path": "p/000009.jpg/", "size": "1234", "comment": "ignored"}, tarfile.XHDTYPE, "utf-8"
    )
    data = _payload(1234, 3)
    path = tmp_path / "pax.tar"
    path.write_bytes(pax + _header("short.jpg", 0) + data + bytes(-1234 % 512)
                     + _member("p/000009.txt", b"t") + bytes(1024))  # fmt: skip
    got = _assert_same(path)
    assert got[0].key == "p/000009" and got[0].members == {"jpg": data, "txt": b"t"}
    assert tarfile_from == []


def test_gnu_long_name_and_long_link(tmp_path, tarfile_from):
    long = "n" * 300
    path = tmp_path / "gnu.tar"
    with tarfile.open(path, "w", format=tarfile.GNU_FORMAT) as tar:
        link = tarfile.TarInfo(long + ".lnk")
        link.type, link.linkname = tarfile.SYMTYPE, "t" * 200  # 'K' then 'L' headers
        tar.addfile(link)
        for ext in ("jpg", "txt"):
            info = tarfile.TarInfo(f"{long}.{ext}")
            info.size = 5
            tar.addfile(info, io.BytesIO(b"12345"))
    got = _assert_same(path)
    assert [s.key for s in got] == [long] and tarfile_from == []


def test_old_style_members(tmp_path, tarfile_from):
    """Type NUL: a file, or a directory when the name ends in '/' (old V7 tars); type '7'
    (contiguous) is a file too."""
    headers = [bytearray(_header(name, size)) for name, size in
               [("old/", 0), ("old/a.jpg", 3), ("old/a.txt", 2)]]  # fmt: skip
    headers[0][156:157] = headers[1][156:157] = b"\0"
    headers[2][156:157] = b"7"
    for header in headers:
        _rechecksum(header)
    path = tmp_path / "old.tar"
    path.write_bytes(bytes(headers[0]) + bytes(headers[1]) + b"jpg" + bytes(509)
                     + bytes(headers[2]) + b"tx" + bytes(510) + bytes(1024))  # fmt: skip
    got = _assert_same(path)
    assert [(s.key, s.members) for s in got] == [("old/a", {"jpg": b"jpg", "txt": b"tx"})]
    assert tarfile_from == []


def test_undecodable_names(tmp_path, tarfile_from):
    """Names that are not UTF-8: raw in ustar headers, a hdrcharset=BINARY path record in pax
    (left to tarfile), as tarfile decodes them (surrogate escapes)."""
    name = b"caf\xe9/000001".decode("utf-8", "surrogateescape")
    for fmt in (tarfile.USTAR_FORMAT, tarfile.PAX_FORMAT):
        path = _write_tar(tmp_path / f"{fmt}.tar", [(f"{name}.jpg", b"j"), (f"{name}.txt", b"t")],
                          fmt)  # fmt: skip
        assert [s.key for s in _assert_same(path)] == [name]
    assert tarfile_from == [0]  # the pax one: hdrcharset


@pytest.mark.parametrize("where", ["start", "middle"])
def test_global_pax_header(tmp_path, where, tarfile_from):
    """tarfile applies 'g' headers to every later member: left to tarfile, from the start of
    the sample in progress (b's), same samples."""
    first = _member("a.jpg", b"a") + _member("b.jpg", b"b")
    glob = tarfile.TarInfo._create_pax_generic_header(
        {"comment": "global"}, tarfile.XGLTYPE, "utf-8"
    )
    rest = _member("b.txt", b"b") + _member("c.jpg", b"c") + bytes(1024)
    path = tmp_path / "g.tar"
    path.write_bytes(glob + first + rest if where == "start" else first + glob + rest)
    got = _assert_same(path)
    assert [s.key for s in got] == ["a", "b", "c"] and got[1].members == {"jpg": b"b", "txt": b"b"}
    assert tarfile_from == ([0] if where == "start" else [1024])


def test_gnu_sparse_records_are_left_to_tarfile(tmp_path, tarfile_from):
    """tarfile takes a pax GNU.sparse.name record as the member's name."""
    pax = tarfile.TarInfo._create_pax_generic_header(
        {"GNU.sparse.name": "s/000007.jpg"}, tarfile.XHDTYPE, "utf-8"
    )
    path = tmp_path / "sparse.tar"
    path.write_bytes(_member("a.jpg", b"a") + pax + _member("other.jpg", b"s") + bytes(1024))
    got = _assert_same(path)
    assert [s.key for s in got] == ["a", "s/000007"] and tarfile_from == [0]


def test_unknown_type_and_signed_checksum(tmp_path, tarfile_from):
    """An unknown member type (tarfile skips its data) and a header with a signed checksum
    (tarfile accepts it): left to tarfile mid-shard, with no sample twice."""
    odd = bytearray(_header("odd.bin", 600, kind=b"V"))
    _rechecksum(odd)
    signed = bytearray(_header("é.jpg", 3))
    _rechecksum(signed, signed=True)
    path = tmp_path / "odd.tar"
    path.write_bytes(_member("a.jpg", b"a") + _member("b.jpg", b"b") + bytes(odd) + bytes(1024)
                     + _member("b.txt", b"b") + bytes(signed) + b"sig" + bytes(509)
                     + _member("d.jpg", b"d") + bytes(1024))  # fmt: skip
    got = _assert_same(path)
    assert [s.key for s in got] == ["a", "b", "é", "d"] and tarfile_from == [1024]


# ---- damage ---------------------------------------------------------------------------------


def _cut_points(end: int) -> list[int]:
    """Every ~100 bytes up to `end`, and each side of every block boundary."""
    points = set(range(0, end, 97))
    for b in range(0, end + 1, 512):
        points.update((b - 1, b, b + 1))
    return sorted(p for p in points if 0 <= p < end)


@pytest.mark.parametrize("kind", [*FORMATS, "write_shard"])
def test_truncated_anywhere_like_tarfile(tars, kind, tmp_path):
    data = tars[kind].read_bytes()
    archive_end = list(_reference_read_shard(str(tars[kind])))[-1].ref[1] + 1024
    cut = tmp_path / "cut.tar"
    errors = 0
    for i, at in enumerate(_cut_points(archive_end + 1)):  # then the writer's zero padding
        cut.write_bytes(data[:at])
        got, want = _both(cut)
        assert got == want, at
        errors += bool(got and got[-1].error)
        # the damage is the same seen from a sample's ref (a resume); every 4th cut: time
        if i % 4 == 0 and len(want) > 2 and want[1].ref:
            assert list(read_shard(str(cut), offset=want[1].ref[0])) == want[1:], at
    assert errors > 10  # cuts in data and padding end with an error sample


def test_bad_checksum(tmp_path):
    """At the first header tarfile raises: one error sample. Later, tarfile ends the shard
    quietly there (its rule for a damaged header after the first); either way as tarfile."""
    good = _member("a.jpg", b"a") + _member("a.txt", b"a") + _member("b.jpg", b"b")
    path = tmp_path / "bad.tar"
    for at in (0, 1024, 2048):
        data = bytearray(good + bytes(1024))
        data[at + 148] ^= 1
        path.write_bytes(bytes(data))
        got = _assert_same(path)
        if at == 0:
            assert len(got) == 1 and "bad checksum" in got[0].error


def test_damaged_header_after_an_extended_one_is_an_error(tmp_path):
    pax = tarfile.TarInfo._create_pax_generic_header({"path": "é.jpg"}, tarfile.XHDTYPE, "utf-8")
    bad = bytearray(_header("x.jpg", 1))
    bad[148] ^= 1
    path = tmp_path / "sub.tar"
    path.write_bytes(_member("a.jpg", b"a") + _member("b.jpg", b"b") + pax + bytes(bad)
                     + b"x" + bytes(511) + bytes(1024))  # fmt: skip
    got = _assert_same(path)
    assert [s.key for s in got] == ["a", "b"] and "bad checksum" in got[-1].error


def test_bad_number_field_and_empty_file(tmp_path):
    header = bytearray(_header("b.jpg", 1))
    header[136:148] = b"not octal!\0\0"
    _rechecksum(header)
    path = tmp_path / "num.tar"
    path.write_bytes(_member("a.jpg", b"a") + bytes(header) + b"b" + bytes(511) + bytes(1024))
    assert [s.key for s in _assert_same(path)] == ["a"]  # tarfile ends there quietly
    path.write_bytes(bytes(header) + b"b" + bytes(511))
    assert "invalid header" in _assert_same(path)[0].error
    path.write_bytes(b"")
    assert "empty file" in _assert_same(path)[0].error


# ---- bytes read -----------------------------------------------------------------------------


def test_bytes_read_counts_the_file_and_a_fetch_reads_little(tmp_path):
    path = tmp_path / "many.tar"
    write_shard(path, [(f"{i:06d}.{e}", _payload(1500, i)) for i in range(200) for e in "ab"])
    size = path.stat().st_size
    before = BYTES_READ[0]
    samples = list(read_shard(str(path)))
    assert samples[-1].ref[1] <= BYTES_READ[0] - before <= size
    before = BYTES_READ[0]
    next(iter(read_shard(str(path), offset=samples[100].ref[0])))  # a resume's fetch
    # the sample, then the next one's first header and data (its end), as tarfile read
    assert BYTES_READ[0] - before == samples[100].ref[1] - samples[100].ref[0] + 512 + 1500


def test_a_pass_reads_in_large_blocks(tmp_path, monkeypatch):
    """Past the first sample the reader reads ahead: a whole shard in a few reads, not two
    per member (the point of the direct reader)."""
    path = tmp_path / "many.tar"
    write_shard(path, [(f"{i:06d}.{e}", _payload(1500, i)) for i in range(200) for e in "ab"])
    reads = []

    class Counted(io.FileIO):
        def read(self, size=-1):
            reads.append(size)
            return super().read(size)

    monkeypatch.setattr(shards, "_open", lambda url, *a, **kw: Counted(url, "rb"))
    assert len(list(read_shard(str(path)))) == 200
    assert len(reads) < 20, reads  # 800 members
