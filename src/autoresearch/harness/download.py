"""Fetching climbmix shards from the Hugging Face hub: resumable, verified, never half-written.

A shard is written to NAME.part and renamed into place only after its size, its sha256 (when
the server gives one) and its parquet footer check out, so a file under its final name is always
a good one, and an interrupted run costs at most a .part that the next run resumes. HTTP is the
standard library's, so preparing data needs no extra dependency.
"""
from __future__ import annotations

import http.client
import operator
import os
import random
import re
import sys
import tempfile
import threading
import urllib.error
import urllib.request
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from contextlib import closing
from pathlib import Path
from typing import Iterable

import pyarrow as pa
import pyarrow.parquet as pq
from tqdm import tqdm

from .errors import HarnessError
from .storage import sha256_file

CLIMBMIX_REPO = "karpathy/climbmix-400b-shuffle"
CLIMBMIX_MAX_SHARD = 6542
CLIMBMIX_VAL_SHARD = CLIMBMIX_MAX_SHARD  # pinned by the reference: the last shard is never trained on
DEFAULT_ENDPOINT = "https://huggingface.co"

_CHUNK = 1 << 20
_SHA256 = re.compile(r'^"?([0-9a-fA-F]{64})"?$')  # weak ETags (W/...) promise no exact bytes: ignored
_CONTENT_RANGE = re.compile(r"^bytes (\d+)-\d+/(\d+)$")
_NETWORK_ERRORS = (OSError, http.client.HTTPException)  # URLError, timeouts, resets, bad responses


class DownloadError(HarnessError):
    """A shard could not be fetched; the message names the file or URL and what to do."""


class _Retry(Exception):
    """A failure another attempt may not repeat: the network, 5xx, 429, a corrupt transfer."""

    def __init__(self, reason: str, retry_after: int | None = None):
        super().__init__(reason)
        self.retry_after = retry_after


class _Cancelled(Exception):
    """Another shard failed or the user pressed Ctrl-C: stop rather than finish a doomed batch."""


def resolve_endpoint(endpoint: str | None = None) -> str:
    return (endpoint or os.environ.get("HF_ENDPOINT") or DEFAULT_ENDPOINT).rstrip("/")


def shard_name(index: int) -> str:
    return f"shard_{index:05d}.parquet"


def shard_url(index: int, endpoint: str | None = None) -> str:
    index = operator.index(index)
    if not 0 <= index <= CLIMBMIX_MAX_SHARD:
        raise ValueError(f"climbmix shard index must be in 0..{CLIMBMIX_MAX_SHARD}, got {index}")
    return f"{resolve_endpoint(endpoint)}/datasets/{CLIMBMIX_REPO}/resolve/main/{shard_name(index)}"


def download_shards(indices: Iterable[int], dest_dir: str | os.PathLike, *, endpoint: str | None = None,
                    workers: int = 8, retries: int = 5, backoff: float = 1.0, timeout: float = 60.0,
                    progress: bool = True) -> list[Path]:
    """Make sure each shard in `indices` is in `dest_dir`; return their paths in that order."""
    indices = [operator.index(i) for i in indices]
    urls = {i: shard_url(i, endpoint) for i in indices}  # every index validated before any request
    dest = Path(dest_dir)
    _check_writable(dest)
    finals = {i: dest / shard_name(i) for i in urls}  # a dict: a repeated index is fetched once
    todo = [i for i, path in finals.items() if _shard_problem(path) is not None]
    if todo:
        stop = threading.Event()
        with closing(_Progress(len(todo), progress)) as bar, ThreadPoolExecutor(min(workers, len(todo))) as pool:
            futures = [pool.submit(_fetch, urls[i], finals[i], retries, backoff, timeout, bar, stop) for i in todo]
            try:
                wait(futures, return_when=FIRST_EXCEPTION)
                failed = [f.exception() for f in futures if f.done() and f.exception() is not None]
                if failed:
                    raise failed[0]
            finally:
                # Threads cannot be killed: tell the running ones to stop at their next chunk, so an
                # error or Ctrl-C does not wait for every other shard to finish downloading.
                stop.set()
                for f in futures:
                    f.cancel()
    return [finals[i] for i in indices]


def _check_writable(dest: Path) -> None:
    try:
        dest.mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryFile(dir=dest).close()
    except OSError as e:
        raise DownloadError(
            f"Cannot write corpus shards to {dest} ({e.strerror or e}). Make that directory writable, "
            "or set AUTORESEARCH_CACHE to a writable directory with room for the shards."
        ) from None


def _fetch(url: str, final: Path, retries: int, backoff: float, timeout: float, bar, stop) -> Path:
    part = final.with_name(final.name + ".part")
    bar.advance(_size(part))  # bytes kept from an earlier run count as done
    for attempt in range(retries + 1):
        try:
            _transfer(url, part, timeout, bar, stop)
            break
        except _Retry as e:
            if attempt == retries:
                kept = f" The partial file {part} is kept; the next run resumes from it." if part.exists() else ""
                raise DownloadError(
                    f"Could not download {url} after {retries + 1} attempts; the last error was: {e}.{kept} "
                    "Check the network connection (and HF_ENDPOINT, if set) and run again."
                ) from None
            delay = e.retry_after if e.retry_after is not None else backoff * 2**attempt * random.uniform(1, 1.25)
            if stop.wait(delay):
                raise _Cancelled() from None
        except OSError as e:  # network errors became _Retry inside _transfer: this one is the local disk
            raise DownloadError(
                f"Could not write {part} ({e.strerror or e}). Free some disk space, or set "
                "AUTORESEARCH_CACHE to a directory with room for the shards."
            ) from None
    problem = _shard_problem(part)
    if problem is not None:
        _discard(part, bar)
        raise DownloadError(
            f"The server sent something that is not a corpus shard for {url}: {problem}. It was deleted. "
            f"Check that HF_ENDPOINT (if set) points at a Hugging Face hub or mirror that serves "
            f"{CLIMBMIX_REPO}, not at a proxy or login page."
        )
    os.replace(part, final)
    bar.shard_done()
    return final


def _transfer(url: str, part: Path, timeout: float, bar, stop) -> None:
    """One attempt: resume or start `part`, then check it is the whole file. Raises _Retry."""
    have = _size(part)
    hops = _HeaderLog()
    request = urllib.request.Request(url, headers={"User-Agent": "autoresearch"})
    if have:
        request.add_header("Range", f"bytes={have}-")
    try:
        response = urllib.request.build_opener(hops).open(request, timeout=timeout)
    except urllib.error.HTTPError as e:
        e.close()
        if e.code == 416:  # the .part is no prefix of the file (longer, or the file changed): start over
            _discard(part, bar)
            raise _Retry("the server refused to resume the partial file") from None
        if e.code == 429 or e.code >= 500:
            raise _Retry(f"HTTP {e.code} {e.reason}", _header_int([e.headers], "Retry-After")) from None
        raise DownloadError(
            f"Could not download {url}: the server answered HTTP {e.code} {e.reason}. Check that the "
            f"shard index is in 0..{CLIMBMIX_MAX_SHARD} and that HF_ENDPOINT (if set) points at a Hugging "
            f"Face hub or mirror that serves {CLIMBMIX_REPO}."
        ) from None
    except _NETWORK_ERRORS as e:
        raise _Retry(f"{type(e).__name__}: {e}") from None
    with response:
        headers = [*hops.seen, response.headers]
        if response.status == 206:
            match = _CONTENT_RANGE.match(response.headers.get("Content-Range", ""))
            if not match or int(match[1]) != have:
                _discard(part, bar)
                raise _Retry("the server resumed at the wrong offset")
            size = int(match[2])
        else:  # 200: the server ignored Range and sends the whole file, so start over
            _discard(part, bar)
            have, size = 0, _header_int([response.headers], "Content-Length")
        size = _header_int(headers, "X-Linked-Size") or size
        bar.add_total(url, size)
        with open(part, "ab" if have else "wb") as f:
            while True:
                if stop.is_set():
                    raise _Cancelled()
                try:
                    chunk = response.read(_CHUNK)
                except _NETWORK_ERRORS as e:
                    raise _Retry(f"transfer interrupted ({type(e).__name__}: {e})") from None
                if not chunk:
                    break
                f.write(chunk)
                bar.advance(len(chunk))
    got = _size(part)
    if size is not None and got < size:  # http.client does not raise on a short body; the .part is resumed
        raise _Retry(f"the connection closed after {got} of {size} bytes")
    if size is not None and got > size:
        _discard(part, bar)
        raise _Retry(f"received {got} bytes where {size} were expected")
    expected = _expected_sha256(headers)
    if expected is not None and sha256_file(part) != expected:
        _discard(part, bar)  # a corrupt transfer may well succeed next time
        raise _Retry(f"the sha256 of the received file does not match the server's {expected}")


class _HeaderLog(urllib.request.HTTPRedirectHandler):
    """Keeps every redirect's headers: the hub puts an LFS file's sha256 and size on its redirect
    to the CDN, and the CDN's own answer may not carry them."""

    def __init__(self):
        self.seen = []

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        self.seen.append(headers)
        return super().redirect_request(req, fp, code, msg, headers, newurl)


def _expected_sha256(headers: list) -> str | None:
    for name in ("X-Linked-Etag", "ETag"):  # X-Linked-Etag is the hub's word; a CDN's ETag may be anything
        for h in headers:
            match = _SHA256.match((h.get(name) or "").strip())
            if match:
                return match[1].lower()
    return None


def _header_int(headers: list, name: str) -> int | None:
    """The first plain number sent as `name` (a Retry-After date is not one: backoff applies then)."""
    values = [(h.get(name) or "").strip() for h in headers]
    return next((int(v) for v in values if v.isdigit()), None)


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


def _discard(part: Path, bar) -> None:
    bar.advance(-_size(part))
    part.unlink(missing_ok=True)


def _shard_problem(path: Path) -> str | None:
    """None when `path` is a readable parquet file with a `text` column, else what is wrong."""
    if not path.is_file():
        return "the file is missing"
    try:
        names = pq.read_schema(path).names  # reads only the footer: cheap, and a truncated file has none
    except (OSError, pa.ArrowException) as e:
        return f"it is not a parquet file ({e})"
    return None if "text" in names else f"it is a parquet file with no 'text' column (columns: {names})"


class _Progress:
    """One byte bar on stderr for the whole batch; its total grows as each shard's size is learned."""

    def __init__(self, shards: int, enabled: bool):
        self._bar = tqdm(total=0, unit="B", unit_scale=True, unit_divisor=1024, desc="climbmix",
                         file=sys.stderr, disable=not enabled, dynamic_ncols=True)
        self._lock, self._sized, self._shards, self._done = threading.Lock(), set(), shards, 0
        self._bar.set_postfix_str(f"0/{shards} shards")

    def close(self) -> None:
        self._bar.close()

    def add_total(self, key: str, size: int | None) -> None:
        with self._lock:
            if size and key not in self._sized:
                self._sized.add(key)
                self._bar.total += size
                self._bar.refresh()

    def advance(self, n: int) -> None:
        if n:
            with self._lock:
                self._bar.update(n)

    def shard_done(self) -> None:
        with self._lock:
            self._done += 1
            self._bar.set_postfix_str(f"{self._done}/{self._shards} shards")
