"""download_shards against a local stand-in for the Hugging Face hub that misbehaves on request."""
from __future__ import annotations

import hashlib
import io
import os
import re
import socket
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from autoresearch.harness.download import (
    CLIMBMIX_MAX_SHARD,
    CLIMBMIX_REPO,
    CLIMBMIX_VAL_SHARD,
    DEFAULT_ENDPOINT,
    DownloadError,
    download_shards,
    resolve_endpoint,
    shard_url,
)

FAST = dict(backoff=0, timeout=5, progress=False)  # retries at once; a test never waits on backoff


def parquet_bytes(index: int, rows: int = 30, column: str = "text") -> bytes:
    table = pa.table({column: [f"shard {index}, document {r}: " + "lorem ipsum " * r for r in range(rows)]})
    buf = io.BytesIO()
    pq.write_table(table, buf)
    return buf.getvalue()


@dataclass
class Hub:
    """What the server serves and how it misbehaves. `faults[path]` is consumed one entry per
    request; once it is empty the path is served properly."""

    url: str = ""
    files: dict[str, bytes] = field(default_factory=dict)
    faults: dict[str, list[str]] = field(default_factory=dict)
    requests: list[tuple[str, dict]] = field(default_factory=list)
    delay: float = 0.0  # seconds each request takes, to make parallelism visible
    in_flight: int = 0
    max_in_flight: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)

    @staticmethod
    def path(index: int) -> str:
        return f"/datasets/{CLIMBMIX_REPO}/resolve/main/shard_{index:05d}.parquet"

    def serve(self, index: int, body: bytes | None = None, faults: list[str] = ()) -> bytes:
        body = parquet_bytes(index) if body is None else body
        self.files[self.path(index)] = body
        self.faults[self.path(index)] = list(faults)
        return body

    def hits(self, index: int) -> list[dict]:
        return [headers for path, headers in self.requests if path == self.path(index)]


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    def do_GET(self):
        hub: Hub = self.server.hub
        path = self.path.removeprefix("/cdn")  # the "CDN" a redirect points at serves the same files
        with hub.lock:
            hub.requests.append((self.path, dict(self.headers)))
            fault = hub.faults.get(path, []).pop(0) if hub.faults.get(path) and path == self.path else "ok"
            hub.in_flight += 1
            hub.max_in_flight = max(hub.max_in_flight, hub.in_flight)
        try:
            time.sleep(hub.delay)
            self.answer(hub, path, fault)
        finally:
            with hub.lock:
                hub.in_flight -= 1

    def answer(self, hub: Hub, path: str, fault: str):
        body = hub.files.get(path)
        if body is None or fault == "404":
            return self.status(404)
        if fault == "503":
            return self.status(503)
        if fault == "429":
            return self.status(429, {"Retry-After": "0"})
        if fault == "hang":  # longer than the client's timeout
            time.sleep(1.0)
            return self.status(503)
        sha = hashlib.sha256(body).hexdigest()
        if fault == "redirect-bad-sha":  # the hub's way: sha256 and size on the redirect, none from the CDN
            return self.status(302, {"Location": "/cdn" + path, "X-Linked-Etag": f'"{"0" * 64}"',
                                     "X-Linked-Size": str(len(body))})
        if fault == "redirect":
            return self.status(302, {"Location": "/cdn" + path, "X-Linked-Etag": f'"{sha}"',
                                     "X-Linked-Size": str(len(body))})
        start, code, headers = 0, 200, {}
        match = re.fullmatch(r"bytes=(\d+)-", self.headers.get("Range", ""))
        if match and fault != "no-range":
            start, code = int(match[1]), 206
            if start >= len(body):
                return self.status(416, {"Content-Range": f"bytes */{len(body)}"})
            headers["Content-Range"] = f"bytes {start}-{len(body) - 1}/{len(body)}"
        if not self.path.startswith("/cdn"):
            headers["X-Linked-Etag"] = f'"{sha}"'
        payload = body[start:]
        if fault == "corrupt":  # same length, wrong bytes
            payload = payload[:-1] + bytes([payload[-1] ^ 0xFF])
        self.send_response(code)
        for k, v in {**headers, "Content-Length": str(len(payload)), "Connection": "close"}.items():
            self.send_header(k, v)
        self.end_headers()
        if fault == "truncate":  # promise everything, send half, hang up
            payload = payload[: len(payload) // 2]
        if fault == "slow":  # about a second for a few MB: time enough for another shard to fail
            for at in range(0, len(payload), 1 << 16):
                self.wfile.write(payload[at : at + (1 << 16)])
                time.sleep(0.02)
        else:
            self.wfile.write(payload)
        self.close_connection = True

    def status(self, code: int, headers: dict | None = None):
        self.send_response(code)
        for k, v in {**(headers or {}), "Content-Length": "0", "Connection": "close"}.items():
            self.send_header(k, v)
        self.end_headers()
        self.close_connection = True


class QuietServer(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request, client_address):
        pass  # a client that timed out and hung up is part of the script, not a failure


@pytest.fixture
def hub():
    server = QuietServer(("127.0.0.1", 0), Handler)
    server.hub = Hub(url=f"http://127.0.0.1:{server.server_address[1]}")
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
    thread.start()
    yield server.hub
    server.shutdown()
    server.server_close()


# --- naming ---------------------------------------------------------------------------------------


def test_shard_urls_follow_the_hub_layout():
    assert CLIMBMIX_VAL_SHARD == CLIMBMIX_MAX_SHARD == 6542
    assert shard_url(7, "https://mirror.example/") == (
        "https://mirror.example/datasets/karpathy/climbmix-400b-shuffle/resolve/main/shard_00007.parquet"
    )
    with pytest.raises(ValueError):
        shard_url(CLIMBMIX_MAX_SHARD + 1)


def test_endpoint_is_the_argument_else_hf_endpoint_else_the_hub(monkeypatch):
    monkeypatch.delenv("HF_ENDPOINT", raising=False)
    assert resolve_endpoint() == DEFAULT_ENDPOINT
    monkeypatch.setenv("HF_ENDPOINT", "https://hf-mirror.example/")
    assert resolve_endpoint() == "https://hf-mirror.example"
    assert resolve_endpoint("http://local:8080/") == "http://local:8080"


def test_hf_endpoint_is_used_for_downloads(hub, tmp_path, monkeypatch):
    body = hub.serve(5)
    monkeypatch.setenv("HF_ENDPOINT", hub.url + "/")
    [path] = download_shards([5], tmp_path, **FAST)
    assert path.read_bytes() == body


# --- the normal case ------------------------------------------------------------------------------


def test_downloads_shards_in_parallel_and_returns_them_in_the_order_asked(hub, tmp_path):
    bodies = {i: hub.serve(i) for i in range(4)}
    hub.delay = 0.2
    paths = download_shards([3, 0, 2, 1], tmp_path, endpoint=hub.url, workers=4, **FAST)
    assert [p.name for p in paths] == [f"shard_{i:05d}.parquet" for i in (3, 0, 2, 1)]
    assert all(p.read_bytes() == bodies[i] for p, i in zip(paths, (3, 0, 2, 1)))
    assert pq.read_table(paths[0]).column("text")[0].as_py().startswith("shard 3, document 0")
    assert hub.max_in_flight > 1
    assert not list(tmp_path.glob("*.part"))


def test_shards_already_present_are_not_requested_again(hub, tmp_path):
    for i in range(3):
        hub.serve(i)
    first = download_shards(range(3), tmp_path, endpoint=hub.url, **FAST)
    count = len(hub.requests)
    assert download_shards(range(3), tmp_path, endpoint=hub.url, **FAST) == first
    assert len(hub.requests) == count == 3


def test_a_repeated_index_is_fetched_once(hub, tmp_path):
    hub.serve(1)
    a, b = download_shards([1, 1], tmp_path, endpoint=hub.url, **FAST)
    assert a == b and len(hub.requests) == 1


def test_a_damaged_file_under_the_final_name_is_replaced(hub, tmp_path):
    body = hub.serve(0)
    (tmp_path / "shard_00000.parquet").write_bytes(body[: len(body) // 2])
    [path] = download_shards([0], tmp_path, endpoint=hub.url, **FAST)
    assert path.read_bytes() == body


def test_dest_dir_is_created(hub, tmp_path):
    hub.serve(0)
    [path] = download_shards([0], tmp_path / "a" / "b", endpoint=hub.url, **FAST)
    assert path.parent == tmp_path / "a" / "b" and path.is_file()


# --- resuming -------------------------------------------------------------------------------------


def test_a_part_file_is_resumed_with_a_range_request(hub, tmp_path):
    body = hub.serve(0)
    (tmp_path / "shard_00000.parquet.part").write_bytes(body[:100])
    [path] = download_shards([0], tmp_path, endpoint=hub.url, **FAST)
    assert hub.hits(0)[0]["Range"] == "bytes=100-"
    assert path.read_bytes() == body
    assert not (tmp_path / "shard_00000.parquet.part").exists()


def test_a_server_without_range_support_makes_it_start_over(hub, tmp_path):
    body = hub.serve(0, faults=["no-range"])
    (tmp_path / "shard_00000.parquet.part").write_bytes(b"x" * 100)  # would corrupt the file if appended to
    [path] = download_shards([0], tmp_path, endpoint=hub.url, **FAST)
    assert path.read_bytes() == body and len(hub.requests) == 1


def test_a_part_file_longer_than_the_shard_is_discarded(hub, tmp_path):
    body = hub.serve(0)
    (tmp_path / "shard_00000.parquet.part").write_bytes(b"x" * (len(body) + 10))  # the server answers 416
    [path] = download_shards([0], tmp_path, endpoint=hub.url, **FAST)
    assert path.read_bytes() == body


def test_a_truncated_transfer_is_resumed_where_it_stopped(hub, tmp_path):
    body = hub.serve(0, faults=["truncate"])
    [path] = download_shards([0], tmp_path, endpoint=hub.url, **FAST)
    assert path.read_bytes() == body
    first, second = hub.hits(0)
    assert "Range" not in first and second["Range"] == f"bytes={len(body) // 2}-"


def test_a_transfer_that_stays_truncated_fails_cleanly_and_a_later_run_finishes_it(hub, tmp_path):
    body = hub.serve(0, faults=["truncate"] * 3)
    with pytest.raises(DownloadError, match="after 3 attempts.*closed after"):
        download_shards([0], tmp_path, endpoint=hub.url, retries=2, **FAST)
    assert not (tmp_path / "shard_00000.parquet").exists()
    assert (tmp_path / "shard_00000.parquet.part").stat().st_size > len(body) // 2  # each attempt got further
    [path] = download_shards([0], tmp_path, endpoint=hub.url, **FAST)
    assert path.read_bytes() == body


# --- verification ---------------------------------------------------------------------------------


def test_a_checksum_mismatch_is_retried(hub, tmp_path):
    body = hub.serve(0, faults=["corrupt"])
    [path] = download_shards([0], tmp_path, endpoint=hub.url, **FAST)
    assert path.read_bytes() == body and len(hub.requests) == 2


def test_a_persistent_checksum_mismatch_fails_and_leaves_no_file(hub, tmp_path):
    hub.serve(0, faults=["corrupt"] * 3)
    with pytest.raises(DownloadError, match="sha256"):
        download_shards([0], tmp_path, endpoint=hub.url, retries=2, **FAST)
    assert list(tmp_path.iterdir()) == []
    assert len(hub.requests) == 3


def test_the_sha256_on_the_hubs_redirect_is_checked(hub, tmp_path):
    body = hub.serve(0, faults=["redirect-bad-sha"] * 2)
    with pytest.raises(DownloadError, match="sha256"):
        download_shards([0], tmp_path, endpoint=hub.url, retries=1, **FAST)
    hub.faults[hub.path(0)] = ["redirect"]
    [path] = download_shards([0], tmp_path, endpoint=hub.url, **FAST)
    assert path.read_bytes() == body
    assert [p for p, _ in hub.requests][-2:] == [hub.path(0), "/cdn" + hub.path(0)]


def test_something_that_is_not_parquet_is_rejected(hub, tmp_path):
    hub.serve(0, body=b"<html>Please log in</html>")
    with pytest.raises(DownloadError, match="not a corpus shard"):
        download_shards([0], tmp_path, endpoint=hub.url, **FAST)
    assert list(tmp_path.iterdir()) == []


def test_a_parquet_file_without_a_text_column_is_rejected(hub, tmp_path):
    hub.serve(0, body=parquet_bytes(0, column="content"))
    with pytest.raises(DownloadError, match="no 'text' column"):
        download_shards([0], tmp_path, endpoint=hub.url, **FAST)
    assert list(tmp_path.iterdir()) == []


# --- retrying and giving up -----------------------------------------------------------------------


def test_503_is_retried_until_it_succeeds(hub, tmp_path):
    body = hub.serve(0, faults=["503", "503"])
    [path] = download_shards([0], tmp_path, endpoint=hub.url, **FAST)
    assert path.read_bytes() == body and len(hub.requests) == 3


def test_503_that_never_clears_gives_up_after_the_retries(hub, tmp_path):
    hub.serve(0, faults=["503"] * 10)
    with pytest.raises(DownloadError, match=r"after 3 attempts.*HTTP 503"):
        download_shards([0], tmp_path, endpoint=hub.url, retries=2, **FAST)
    assert len(hub.requests) == 3 and list(tmp_path.iterdir()) == []


def test_429_waits_as_long_as_retry_after_says_not_the_backoff(hub, tmp_path):
    body = hub.serve(0, faults=["429"])
    start = time.monotonic()
    [path] = download_shards([0], tmp_path, endpoint=hub.url, backoff=5, timeout=5, progress=False)
    assert time.monotonic() - start < 3  # Retry-After: 0, where the backoff would have slept 5 s
    assert path.read_bytes() == body and len(hub.requests) == 2


def test_a_timeout_is_retried(hub, tmp_path):
    body = hub.serve(0, faults=["hang"])
    [path] = download_shards([0], tmp_path, endpoint=hub.url, backoff=0, timeout=0.3, progress=False)
    assert path.read_bytes() == body and len(hub.requests) == 2


def test_404_fails_at_once_naming_the_url(hub, tmp_path):
    start = time.monotonic()
    with pytest.raises(DownloadError) as error:
        download_shards([9], tmp_path, endpoint=hub.url, retries=1, backoff=5, progress=False)
    assert time.monotonic() - start < 3 and len(hub.requests) == 1  # a retry would have slept 5 s first
    assert shard_url(9, hub.url) in str(error.value) and "HF_ENDPOINT" in str(error.value)


def test_a_refused_connection_is_retried_then_reported(tmp_path):
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(DownloadError, match=f"127.0.0.1:{port}.*after 3 attempts"):
        download_shards([0], tmp_path, endpoint=f"http://127.0.0.1:{port}", retries=2, **FAST)


def test_one_failing_shard_fails_the_batch_but_keeps_the_good_ones(hub, tmp_path):
    for i in range(3):
        hub.serve(i)
    hub.files.pop(hub.path(1))
    with pytest.raises(DownloadError, match="shard_00001"):
        download_shards(range(3), tmp_path, endpoint=hub.url, workers=1, **FAST)
    assert not (tmp_path / "shard_00001.parquet").exists()
    assert (tmp_path / "shard_00000.parquet").exists()


def test_a_failing_shard_stops_the_transfers_still_running(hub, tmp_path):
    rows = [os.urandom(500).hex() for _ in range(3000)]  # 3 MB that do not compress
    buf = io.BytesIO()
    pq.write_table(pa.table({"text": rows}), buf)
    hub.serve(0, body=buf.getvalue(), faults=["slow"])
    with pytest.raises(DownloadError, match="shard_00001"):
        download_shards([0, 1], tmp_path, endpoint=hub.url, workers=2, **FAST)
    assert not (tmp_path / "shard_00000.parquet").exists()  # abandoned, not finished in the background
    assert (tmp_path / "shard_00000.parquet.part").exists()  # and kept for the next run to resume


# --- the local side -------------------------------------------------------------------------------


def test_an_unwritable_dest_dir_is_reported_with_the_fix(hub, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    with pytest.raises(DownloadError, match="AUTORESEARCH_CACHE") as error:
        download_shards([0], blocker / "shards", endpoint=hub.url, **FAST)
    assert str(blocker / "shards") in str(error.value) and hub.requests == []


def test_progress_goes_to_stderr_and_is_silent_when_off(hub, tmp_path, capsys):
    hub.serve(0), hub.serve(1)
    download_shards([0], tmp_path, endpoint=hub.url, backoff=0, progress=False)
    assert capsys.readouterr() == ("", "")
    download_shards([1], tmp_path, endpoint=hub.url, backoff=0, progress=True)
    out, err = capsys.readouterr()
    assert out == "" and "1/1 shards" in err
