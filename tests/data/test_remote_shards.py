"""Remote shards (http over a local server on 127.0.0.1; s3/gs through stand-in commands), brace
expansion of `pipe:` commands, globs. A download that fails (404, connection closed mid-shard,
stalled server, refused connection) ends the shard with one error sample, which the loader skips
and counts; nothing crashes or hangs (every read runs under a deadline)."""

from __future__ import annotations

import functools
import os
import socket
import threading
import time
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

import pytest

import data.shards as shards
from data.decode import decode
from data.shards import expand_shards, read_shard

DEADLINE = 60  # seconds any single read may take before the test fails as a hang
UNPATCHED_OPEN = shards._open  # the `remote_allowed` fixture replaces it in every test


def _run(fn, timeout=DEADLINE):
    """fn() in a daemon thread; fails the test instead of hanging it."""
    result: dict = {}

    def target():
        try:
            result["value"] = fn()
        except BaseException as exc:  # re-raised below, in the test's thread
            result["error"] = exc

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(timeout)
    assert not thread.is_alive(), f"still running after {timeout} s"
    if "error" in result:
        raise result["error"]
    return result["value"]


@pytest.fixture(autouse=True)
def remote_allowed(monkeypatch):
    """read_shard as the loader will call it with data.allow_remote=true (it passes only
    allow_pipe today): shards._open with allow_remote forced on."""

    def _open(url, allow_pipe=False, *args, **kwargs):
        return UNPATCHED_OPEN(url, allow_pipe, allow_remote=True)

    monkeypatch.setattr(shards, "_open", _open)


def _read(url: str) -> list:
    return _run(lambda: list(read_shard(url)))


@pytest.fixture(scope="module")
def server(synthetic_dir):
    """http://127.0.0.1:PORT serving DIR/train; /half/NAME sends half of NAME (announcing the
    full length) then closes; /stall/NAME sends half then waits (until the test ends, at most
    30 s)."""
    root = synthetic_dir / "train"
    release = threading.Event()

    class Handler(SimpleHTTPRequestHandler):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, directory=str(root), **kwargs)

        def log_message(self, *args):  # keep the test output clean
            pass

        def do_GET(self):
            mode, _, name = self.path.strip("/").partition("/")
            if mode not in ("half", "stall"):
                return super().do_GET()
            data = (root / name).read_bytes()
            self.send_response(200)
            self.send_header("Content-Type", "application/x-tar")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data[: len(data) // 2])
            self.wfile.flush()
            if mode == "stall":
                release.wait(30)
            self.close_connection = True
            self.connection.shutdown(socket.SHUT_RDWR)

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    httpd.daemon_threads = True
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    release.set()
    httpd.shutdown()
    httpd.server_close()
    thread.join(10)


@functools.cache
def _local(path: str) -> list:
    return list(read_shard(path))


def _same(a, b) -> bool:
    return [(s.key, s.members, s.error) for s in a] == [(s.key, s.members, s.error) for s in b]


def _ends_with_an_error(samples, local, *words) -> None:
    *good, last = samples
    assert last.error and all(w in last.error for w in words), last.error
    assert _same(good, local[: len(good)])  # what came before the failure is a clean prefix
    with pytest.raises(ValueError):  # the loader's decode step: skipped and counted
        decode(last)


def test_a_shard_over_http_equals_the_local_read(server, synthetic_dir):
    local = _local(str(synthetic_dir / "train" / "000003.tar"))
    remote = _read(f"{server}/000003.tar")
    assert len(remote) == 30 and _same(remote, local)
    assert {s.shard for s in remote} == {f"{server}/000003.tar"}


def test_a_brace_pattern_of_urls_is_returned_unchecked_and_reads(server, synthetic_dir):
    urls = expand_shards(f"{server}/{{000000..000002}}.tar", allow_remote=True)
    assert urls == [f"{server}/00000{i}.tar" for i in range(3)]
    for i, url in enumerate(urls):
        assert _same(_read(url), _local(str(synthetic_dir / "train" / f"00000{i}.tar")))
    assert expand_shards(f"{server}/nope.tar", allow_remote=True) == [f"{server}/nope.tar"]


def test_a_url_that_404s_is_one_error_sample(server):
    samples = _read(f"{server}/nope.tar")
    assert len(samples) == 1
    _ends_with_an_error(samples, [], "status 22", "HTTP error", f"{server}/nope.tar")


def test_a_transfer_closed_mid_shard_ends_with_an_error_sample(server, synthetic_dir):
    local = _local(str(synthetic_dir / "train" / "000001.tar"))
    samples = _read(f"{server}/half/000001.tar")
    assert 2 <= len(samples) <= 20  # about half the shard, then the error
    _ends_with_an_error(samples, local, "status 18", "partial file")


def test_a_stalled_transfer_times_out_into_an_error_sample(server, synthetic_dir, monkeypatch):
    monkeypatch.setattr(shards, "CURL_STALL_SECONDS", 2)
    local = _local(str(synthetic_dir / "train" / "000002.tar"))
    started = time.monotonic()
    samples = _run(lambda: list(read_shard(f"{server}/stall/000002.tar")), timeout=30)
    assert time.monotonic() - started < 25
    _ends_with_an_error(samples, local, "status 28", "timed out")


def test_stopping_early_stops_the_download_without_waiting(server):
    """The loader stops reading a shard mid-way (end of a run, a resume skipping ahead):
    closing must not wait for a stalled download to finish or time out."""

    def first_then_close():
        samples = read_shard(f"{server}/stall/000004.tar")
        first = next(samples)
        started = time.monotonic()
        samples.close()
        return first, time.monotonic() - started

    first, seconds = _run(first_then_close, timeout=30)
    assert first.error is None and seconds < 5


def test_a_refused_connection_is_one_error_sample():
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    samples = _read(f"http://127.0.0.1:{port}/000000.tar")
    assert len(samples) == 1 and "status 7" in samples[0].error


def test_remote_urls_are_refused_unless_allowed(server):
    spec = f"{server}/{{000000..000001}}.tar"
    assert expand_shards(spec) == []
    assert len(expand_shards(spec, allow_remote=True)) == 2
    with pytest.raises(ValueError, match=r"^train_shards: refusing remote URL .*allow_remote=true"):
        UNPATCHED_OPEN(f"{server}/000000.tar", False)
    for url in ("s3://bucket/a.tar", "gs://bucket/a.tar", "HTTPS://host/a.tar"):
        assert shards.is_remote(url) and expand_shards(url) == []
    assert not shards.is_remote("pipe:curl -s http://host/a.tar")
    assert not shards.is_remote("/data/http:/x.tar")


@pytest.fixture()
def fake_tools(tmp_path, monkeypatch, synthetic_dir):
    """`aws` and `gsutil` stand-ins on PATH that print a local shard named like the URL's last
    part (and fail for a name starting with 'missing')."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    train = synthetic_dir / "train"
    for tool, url_arg in (("aws", 4), ("gsutil", 2)):
        script = bin_dir / tool
        script.write_text(
            "#!/bin/sh\n"
            f'name=$(basename "${url_arg}")\n'
            'case "$name" in missing*) echo "not found" >&2; exit 1;; esac\n'
            f'exec cat "{train}/$name"\n'
        )
        script.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    return train


@pytest.mark.parametrize("scheme", ["s3", "gs"])
def test_s3_and_gs_read_through_their_command_line_tools(fake_tools, scheme):
    local = _local(str(fake_tools / "000005.tar"))
    assert _same(_read(f"{scheme}://bucket/train/000005.tar"), local)
    failed = _read(f"{scheme}://bucket/train/missing.tar")
    assert len(failed) == 1 and "status 1" in failed[0].error


def test_a_missing_download_tool_is_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(ValueError, match=r"^train_shards: reading s3:// URLs needs the 'aws'"):
        shards.open_remote("s3://bucket/a.tar")


def test_braces_in_a_pipe_command_give_one_pipe_per_shard(synthetic_dir):
    train = synthetic_dir / "train"
    spec = f"pipe:cat {train}/{{000000..000003}}.tar"
    urls = expand_shards(spec, allow_pipe=True)
    assert urls == [f"pipe:cat {train}/00000{i}.tar" for i in range(4)]
    assert expand_shards(spec) == []  # still refused unless allowed
    assert _same(_run(lambda: list(read_shard(urls[1], allow_pipe=True))),
                 _local(str(train / "000001.tar")))  # fmt: skip
    # shell braces that are not a pattern stay as they are
    assert expand_shards("pipe:awk '{print $1}' f", allow_pipe=True) == ["pipe:awk '{print $1}' f"]


def test_a_glob_works_like_a_directory(synthetic_dir, tmp_path):
    train = synthetic_dir / "train"
    by_dir = expand_shards(str(train))
    assert expand_shards(f"{train}/*.tar") == by_dir and len(by_dir) == 8
    assert expand_shards(f"{train}/00000[0-2].tar") == by_dir[:3]
    assert expand_shards(f"{synthetic_dir}/**/train/00000{{0,1}}.tar") == by_dir[:2]
    assert expand_shards(f"{tmp_path}/*.tar") == []
