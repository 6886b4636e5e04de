"""What torch.compile left in one run of a train.py, kept for later runs of it (and the baseline's for every run).

A trainer compiles before it calls training_started(): 30-36 s on an H100 from nothing, 5-8 s from the
cache that a run of the same graph left. A cache that outlives a trial is a channel from one run of
untrusted code to another, so the lab keeps it within three rules:

1. A snapshot holds nothing computed from training rows. The supervisor copies the trainer's cache
   folder when its START arrives, before the clock starts and before any rank is served a training row
   (harness.feed's before_start), regular files only, through no symbolic link, within SNAPSHOT_LIMITS
   (copy_files). What the trainer writes afterwards, even to a file it holds open, stays out of it.
2. Only a run that was given no snapshot is snapshotted, so a snapshot holds at most one warm-up's work:
   warm-ups never add up from trial to trial. A trial may spend its own warm-up (up to its start-up
   limit) as it likes on the same random rows, so a snapshot saves it time and holds nothing it could
   not compute itself.
3. A run is given only a snapshot that a run of the very same train.py made, or one of the workspace's
   baseline (the train.py the person started from, which no proposer wrote). Never an earlier best's:
   Inductor's cache holds pickles and generated code that the run would execute, so a best's snapshot
   would let a trick of its own outlive its removal from the code, in every run built on it.

Snapshots are kept by what the compiled code depends on (a key: train.py's content, the harness, torch
and the device), in the machine's cache folder, out of every sandbox's sight: a new workspace's baseline
starts from the snapshot an earlier workspace left of the same template. Sandboxed trials only: an
unsandboxed one could write into the store itself.

Which one (CompileCache.plan): the run's own train.py's; else, unless a run of it already missed with the
baseline's (its warm-up, from the first batch asked for to START, took more than MISSED_FRACTION of the
one that made the snapshot: its edit changed what is compiled), the baseline's; else none, and the run
is snapshotted. So an edit that leaves the compiled graph as the baseline's starts warm, one that changes
it compiles from nothing the first time it runs, and every later run of it (the keep rule's, confirmation's)
starts from its own.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import stat
import time
from dataclasses import dataclass
from pathlib import Path

FOLDER = "compile-cache"  # under the machine's cache folder (harness.storage.cache_dir)
FILES = "files"  # a snapshot's copy of the cache folder
META_FILE = "meta.json"
INCOMING_PREFIX = ".incoming-"  # a trial's snapshot until the lab has stored it
MISSED_SUFFIX = ".missed"
TRAINER_CACHE = "compile-cache"  # under the trainer's /tmp: TORCHINDUCTOR_CACHE_DIR
SNAPSHOT_LIMITS = (4 << 30, 50_000)  # bytes, entries (files, folders, links): a cache beyond them is not kept
MAX_DEPTH = 16  # folders deep (Inductor's and Triton's caches are 3 to 5): deeper is refused
KEPT_SNAPSHOTS = 12  # the most recently used are kept; the others are removed as new ones come
KEPT_MARKS = 1000  # of misses, the most recent
MISSED_FRACTION = 0.5
MIN_COMPILE_SECONDS = 5.0  # a snapshot made in a shorter warm-up holds too little to be missed


class TooLarge(Exception):
    """A folder beyond the copy's limits."""


def copy_files(source: Path, dest: Path, limits: tuple[int, int] = SNAPSHOT_LIMITS,
               owner: tuple[int, int] | None = None) -> tuple[int, int]:
    """Copy the regular files and folders under `source` to `dest` (which must not exist), never through a
    symbolic link: every name is opened relative to its folder's descriptor with O_NOFOLLOW, so that a
    folder swapped for a link while the copy runs is skipped, not followed. Links, FIFOs and sockets are
    skipped. `owner` (uid, gid) owns the copies. Returns (bytes, files); raises TooLarge past `limits`
    (bytes, and entries of any kind) or past MAX_DEPTH, leaving `dest` partly written. Depth first, with a
    stack of its own: only the open folders' descriptors are held, at most MAX_DEPTH + 1."""
    max_bytes, max_entries = limits
    size = files = entries = 0
    flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC

    def made(path: Path) -> None:
        if owner is not None:
            os.chown(path, *owner)

    top = os.open(source, flags | os.O_DIRECTORY)
    stack = [(top, Path(dest), iter(os.listdir(top)))]  # (descriptor, copy, names left) of each open folder
    try:
        Path(dest).mkdir(mode=0o755)
        made(Path(dest))
        while stack:
            fd, into, names = stack[-1]
            name = next(names, None)
            if name is None:
                os.close(fd)
                stack.pop()
                continue
            entries += 1
            if entries > max_entries:
                raise TooLarge(f"more than {max_entries} entries")
            try:
                child = os.open(name, flags, dir_fd=fd)
            except OSError:  # a link (ELOOP), or gone
                continue
            mode = os.fstat(child).st_mode
            if stat.S_ISDIR(mode):
                try:
                    if len(stack) > MAX_DEPTH:
                        raise TooLarge(f"folders more than {MAX_DEPTH} deep")
                    listing = os.listdir(child)
                    (into / name).mkdir(mode=0o755)
                    made(into / name)
                except BaseException:
                    os.close(child)
                    raise
                stack.append((child, into / name, iter(listing)))
                continue
            try:
                if stat.S_ISREG(mode):
                    files += 1
                    with open(into / name, "xb") as out:
                        made(into / name)
                        while chunk := os.read(child, 1 << 20):
                            size += len(chunk)
                            if size > max_bytes:
                                raise TooLarge(f"more than {max_bytes >> 20} MiB")
                            out.write(chunk)
            finally:
                os.close(child)
    finally:
        for fd, _, _ in stack:
            os.close(fd)
    return size, files


@dataclass
class Plan:
    """What one run is given and whether it is snapshotted. Paths are the lab host's."""

    commit: str
    key: str  # its train.py's snapshot key (CompileCache.key)
    given: str | None = None  # the commit (its own, or the baseline) whose train.py's snapshot it starts from
    source: Path | None = None  # that snapshot's files
    incoming: Path | None = None  # where the supervisor puts this run's snapshot (None: not snapshotted)
    made_warmup: float | None = None  # the warm-up of the run that made the given snapshot, seconds
    made_files: int | None = None  # the files in the given snapshot


class CompileCache:
    """Snapshots, one folder per key: files/ and meta.json; KEY.missed marks a train.py whose run missed
    with the baseline's snapshot. `environment` is what the compiled code depends on besides train.py (the
    harness, torch, the device): runs in another environment share nothing. Labs of several workspaces
    may share the folder: what one removes, another copying it finds gone (a seed that comes out short)."""

    def __init__(self, root: Path, environment: dict):
        self.root = Path(root)
        self.environment = json.dumps(environment, sort_keys=True)

    def key(self, trainer_id: str) -> str:
        """The snapshot key of a train.py, by its content's id (git's blob id)."""
        return hashlib.sha256(f"{self.environment}\0{trainer_id}".encode()).hexdigest()[:32]

    def _meta(self, key: str) -> dict | None:
        try:
            meta = json.loads((self.root / key / META_FILE).read_text())
            os.utime(self.root / key)  # recently used: kept longest
            return meta
        except (OSError, ValueError):
            return None

    def plan(self, run: tuple[str, str], baseline: tuple[str, str] | None, trial_id: int) -> Plan:
        """The plan for a run of `run`, (commit, train.py's blob id); `baseline` is the workspace's."""
        commit, key = run[0], self.key(run[1])
        chain = [run]
        if baseline is not None and baseline[1] != run[1] and not (self.root / f"{key}{MISSED_SUFFIX}").exists():
            chain.append(baseline)
        for candidate, blob in chain:
            meta = self._meta(self.key(blob))
            if meta is not None:
                return Plan(commit, key, candidate, self.root / self.key(blob) / FILES, None,
                            meta.get("warmup_seconds"), meta.get("files"))
        self.root.mkdir(parents=True, exist_ok=True)
        self._sweep()
        incoming = self.root / f"{INCOMING_PREFIX}{os.getpid()}-{trial_id}"
        shutil.rmtree(incoming, ignore_errors=True)
        return Plan(commit, key, incoming=incoming)

    def record(self, plan: Plan, result: dict, trial_id: int) -> str | None:
        """After the run: store its snapshot as its train.py's, or mark a miss. Returns a line for the record."""
        clock, cache = result.get("clock") or {}, result.get("compile_cache") or {}
        asked, started = clock.get("first_request"), clock.get("started")  # the warm-up: from the first batch asked
        warmup = None  # to START, less the snapshot's copy (made before START was stamped)
        if isinstance(asked, (int, float)) and isinstance(started, (int, float)):
            warmup = started - asked - float((cache.get("snapshot") or {}).get("seconds") or 0)
        if plan.incoming is not None:
            made = cache.get("snapshot") or {}
            if warmup is None or not made.get("files") or not (plan.incoming / FILES).is_dir():
                shutil.rmtree(plan.incoming, ignore_errors=True)
                return None
            (plan.incoming / META_FILE).write_text(json.dumps({
                "commit": plan.commit, "trial": trial_id, "warmup_seconds": round(warmup, 3),
                "bytes": made.get("bytes"), "files": made.get("files"), "made_at": time.time()}))
            try:
                os.rename(plan.incoming, self.root / plan.key)
            except OSError:  # another run of the same train.py stored one first
                shutil.rmtree(plan.incoming, ignore_errors=True)
                return None
            self._evict()
            return f"its compile cache was kept for later runs of this train.py ({plan.commit[:7]})"
        seeded = cache.get("seeded") or {}
        whole = "failed" not in seeded and (seeded.get("files") or 0) >= (plan.made_files or 0)  # else: no miss
        if (plan.given != plan.commit and whole and warmup is not None
                and (plan.made_warmup or 0) >= MIN_COMPILE_SECONDS and warmup > MISSED_FRACTION * plan.made_warmup):
            (self.root / f"{plan.key}{MISSED_SUFFIX}").touch()
            return (f"it missed the baseline's compile cache (a warm-up of {warmup:.0f} s against "
                    f"{plan.made_warmup:.0f} s): its next run compiles afresh, and its cache is kept")
        return None

    def _sweep(self) -> None:
        """Remove the snapshots in the making that a lab which is gone left behind."""
        for folder in self.root.glob(f"{INCOMING_PREFIX}*"):
            pid = folder.name[len(INCOMING_PREFIX):].partition("-")[0]
            try:
                os.kill(int(pid), 0)
            except (ValueError, ProcessLookupError):
                shutil.rmtree(folder, ignore_errors=True)
            except OSError:  # alive, another user's
                pass

    def _evict(self) -> None:
        def by_age(paths: list[Path]) -> list[Path]:
            aged = []
            for path in paths:
                try:
                    aged.append((path.stat().st_mtime, path))
                except OSError:  # another lab removed it
                    pass
            return [path for _, path in sorted(aged, reverse=True)]

        entries = list(self.root.iterdir())
        snapshots = by_age([p for p in entries if p.is_dir() and not p.name.startswith(INCOMING_PREFIX)])
        markers = by_age([p for p in entries if p.name.endswith(MISSED_SUFFIX)])
        for old in snapshots[KEPT_SNAPSHOTS:]:
            shutil.rmtree(old, ignore_errors=True)
        for old in markers[KEPT_MARKS:]:
            old.unlink(missing_ok=True)
