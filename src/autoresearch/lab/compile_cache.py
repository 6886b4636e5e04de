"""What torch.compile left in one run of a train.py, kept for later runs of it and of the commits built on it.

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
3. A run is given only a snapshot that a run of the very same train.py made, or a run of the train.py
   of one of its commit's first-parent ancestors (the bests it was built on): code the run runs anyway,
   but for its own edit. No candidate's snapshot reaches a rival's run.

Snapshots are kept by what the compiled code depends on (a key: train.py's content, the harness, torch
and the device), in the machine's cache folder, out of every sandbox's sight: a new workspace's baseline
starts from the snapshot an earlier workspace left of the same template. Sandboxed trials only: an
unsandboxed one could write into the store itself.

Which one (CompileCache.plan): the run's own train.py's; else, unless a run of it already missed with an
ancestor's (its warm-up, from the first batch asked for to START, took more than MISSED_FRACTION of the
one that made the snapshot: its edit changed what is compiled), the nearest ancestor's; else none, and
the run is snapshotted.
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
SNAPSHOT_LIMITS = (4 << 30, 50_000)  # bytes, files: a cache beyond them is not kept
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
    skipped. `owner` (uid, gid) owns the copies. Returns (bytes, files); raises TooLarge past `limits`,
    leaving `dest` partly written."""
    max_bytes, max_files = limits
    counted = [0, 0]

    def own(path: Path) -> None:
        if owner is not None:
            os.chown(path, *owner)

    def copy_folder(fd: int, into: Path) -> None:
        into.mkdir(mode=0o755)
        own(into)
        with os.scandir(fd) as entries:
            names = [e.name for e in entries]
        for name in names:
            try:
                child = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=fd)
            except OSError:  # a link (ELOOP), or gone
                continue
            try:
                mode = os.fstat(child).st_mode
                if stat.S_ISDIR(mode):
                    copy_folder(child, into / name)
                elif stat.S_ISREG(mode):
                    counted[1] += 1
                    if counted[1] > max_files:
                        raise TooLarge(f"more than {max_files} files")
                    with open(into / name, "wb") as out:
                        own(into / name)
                        while chunk := os.read(child, 1 << 20):
                            counted[0] += len(chunk)
                            if counted[0] > max_bytes:
                                raise TooLarge(f"more than {max_bytes >> 20} MiB")
                            out.write(chunk)
            finally:
                os.close(child)

    top = os.open(source, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        copy_folder(top, dest)
    finally:
        os.close(top)
    return counted[0], counted[1]


@dataclass
class Plan:
    """What one run is given and whether it is snapshotted. Paths are the lab host's."""

    commit: str
    key: str  # its train.py's snapshot key (CompileCache.key)
    given: str | None = None  # the commit (its own or an ancestor) whose train.py's snapshot it starts from
    source: Path | None = None  # that snapshot's files
    incoming: Path | None = None  # where the supervisor puts this run's snapshot (None: not snapshotted)
    made_warmup: float | None = None  # the warm-up of the run that made the given snapshot, seconds


class CompileCache:
    """Snapshots, one folder per key: files/ and meta.json; KEY.missed marks a train.py whose run missed
    with an ancestor's snapshot. `environment` is what the compiled code depends on besides train.py (the
    harness, torch, the device): runs in another environment share nothing."""

    def __init__(self, root: Path, environment: dict):
        self.root = Path(root)
        self.environment = json.dumps(environment, sort_keys=True)

    def key(self, trainer_id: str) -> str:
        """The snapshot key of a train.py, by its content's id (git's blob id)."""
        return hashlib.sha256(f"{self.environment}\0{trainer_id}".encode()).hexdigest()[:32]

    def _meta(self, key: str) -> dict | None:
        try:
            return json.loads((self.root / key / META_FILE).read_text())
        except (OSError, ValueError):
            return None

    def plan(self, lineage: list[tuple[str, str]], trial_id: int) -> Plan:
        """The plan for a run of `lineage[0]`: (commit, train.py's blob id) of the run's commit, then of its
        first-parent ancestors, nearest first."""
        commit, key = lineage[0][0], self.key(lineage[0][1])
        chain = lineage[:1] if (self.root / f"{key}{MISSED_SUFFIX}").exists() else lineage
        for candidate, blob in chain:
            found = self.key(blob)
            meta = self._meta(found)
            if meta is not None:
                os.utime(self.root / found)  # recently used: kept longest
                return Plan(commit, key, candidate, self.root / found / FILES, None, meta.get("warmup_seconds"))
        self.root.mkdir(parents=True, exist_ok=True)
        incoming = self.root / f"{INCOMING_PREFIX}{os.getpid()}-{trial_id}"  # labs of other workspaces share the root
        shutil.rmtree(incoming, ignore_errors=True)
        return Plan(commit, key, incoming=incoming)

    def record(self, plan: Plan, result: dict, trial_id: int) -> str | None:
        """After the run: store its snapshot as its train.py's, or mark a miss. Returns a line for the record."""
        clock, cache = result.get("clock") or {}, result.get("compile_cache") or {}
        asked, started = clock.get("first_request"), clock.get("started")  # the warm-up: from the first batch asked
        warmup = started - asked if isinstance(asked, (int, float)) and isinstance(started, (int, float)) else None
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
            return f"its compile cache was kept for later runs of this train.py and of commits built on {plan.commit[:7]}"
        seeded = "failed" not in (cache.get("seeded") or {})  # a copy that failed compiled from nothing: no miss
        if (plan.given != plan.commit and seeded and warmup is not None
                and (plan.made_warmup or 0) >= MIN_COMPILE_SECONDS and warmup > MISSED_FRACTION * plan.made_warmup):
            (self.root / f"{plan.key}{MISSED_SUFFIX}").touch()
            return (f"it missed {plan.given[:7]}'s compile cache (a warm-up of {warmup:.0f} s against "
                    f"{plan.made_warmup:.0f} s): its next run compiles afresh, and its cache is kept")
        return None

    def _evict(self) -> None:
        snapshots = [p for p in self.root.iterdir() if p.is_dir() and not p.name.startswith(INCOMING_PREFIX)]
        markers = [p for p in self.root.iterdir() if p.name.endswith(MISSED_SUFFIX)]
        for kept, paths in ((KEPT_SNAPSHOTS, snapshots), (KEPT_MARKS, markers)):
            paths.sort(key=lambda p: p.stat().st_mtime, reverse=True)
            for old in paths[kept:]:
                if old.is_dir():
                    shutil.rmtree(old, ignore_errors=True)
                else:
                    old.unlink(missing_ok=True)
