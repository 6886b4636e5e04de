"""torch.compile's cache kept from one run for the next (lab.compile_cache): taken as START arrives, only
from a run that was given none, and given only to runs of the same train.py, or the baseline's to any run.

The tiny trainer on the CPU plays the compiler: it writes into $TORCHINDUCTOR_CACHE_DIR as Inductor would,
and tries what a hostile one would (writing trained weights after the start through a file it opened
before, a link to the validation tokens, a FIFO). The real cache hit is measured on a GPU (BENCHMARKS.md).
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from autoresearch.harness.storage import cache_dir
from autoresearch.lab import compile_cache
from autoresearch.lab.compile_cache import KEPT_SNAPSHOTS, CompileCache, TooLarge, copy_files
from autoresearch.lab.executor import LocalExecutor
from autoresearch.lab.loop import Lab
from autoresearch.lab.supervisor import LOG_FILE
from autoresearch.proposers.scripted import ScriptedProposer
from lab_helpers import make_workspace, variant


def hostile_cacher(leak: Path) -> str:
    """The tiny trainer, writing to its compile cache as Inductor would, and as a cheat would."""
    return variant(
        ("import time\n", "import os\nimport time\n\nCACHE = os.environ.get('TORCHINDUCTOR_CACHE_DIR', '')  # none where the model is scored\n"),
        ("    run.training_started()\n",
         "    os.makedirs(CACHE, exist_ok=True)\n"
         "    print('cache holds:', sorted(os.listdir(CACHE)), flush=True)\n"
         "    open(os.path.join(CACHE, f'kernels of seed {seed}'), 'w').write('compiled code')\n"
         "    held = open(os.path.join(CACHE, 'held open'), 'w')\n"
         "    held.write('compiled code')\n"
         "    held.flush()\n"
         f"    os.symlink({str(leak)!r}, os.path.join(CACHE, 'leak'))\n"
         "    os.mkfifo(os.path.join(CACHE, 'pipe'))\n"
         "    run.training_started()\n"
         "    next(loader)\n"  # training rows have reached it: nothing it writes from here may be kept
         "    held.write(' and trained weights')\n"
         "    held.flush()\n"
         "    open(os.path.join(CACHE, 'written after the start'), 'w').write('trained weights')\n"))


def cache_lines(log: str) -> list[str]:
    return [line for line in log.splitlines() if line.startswith("cache holds:")]


def run_lab(ws, proposals=()) -> list:
    lab = Lab(ws, log=lambda msg: None, executor=LocalExecutor(standby=True, compile_cache=True))
    try:
        lab.run(ScriptedProposer(list(proposals)))
        return lab.ledger.trials()
    finally:
        lab.close()


def test_a_run_given_no_cache_leaves_what_it_compiled_before_the_start_for_later_runs_of_its_train_py_and_children(
        tmp_path, cpu_prepared):
    ws = make_workspace(tmp_path / "ws", cpu_prepared, hostile_cacher(cpu_prepared.path / "val.bin"),
                        baseline_runs=2, rule="strict")
    trials = run_lab(ws, [{"description": "LR 0.003 -> 0.01", "replace": [["LR = 0.003", "LR = 0.01"]]}])
    base = ws.config["base_commit"]
    assert [t.status.value for t in trials][:2] == ["keep", "keep"] and len(trials) == 3
    candidate = trials[2]
    assert candidate.parent_sha == base and candidate.commit_sha != base
    # The first baseline run compiled from nothing and was snapshotted; the second baseline run and the
    # candidate built on the baseline started from that snapshot (the last two in a standby).
    assert [t.hardware.get("compile_cache") for t in trials] == [None, base, base]
    assert [t.hardware.get("standby") for t in trials] == [False, True, True]

    store = cache_dir() / compile_cache.FOLDER  # the machine's, outside the workspace
    [snapshot] = [p for p in store.iterdir()]  # one hop: the runs that started from it left nothing
    kept = snapshot / compile_cache.FILES
    # What was there as START arrived, regular files only: no link to the answers, no FIFO, nothing written
    # after the start, and the file held open as it was then.
    assert sorted(p.name for p in kept.iterdir()) == ["held open", "kernels of seed 0"]
    assert (kept / "held open").read_text() == "compiled code"
    meta = json.loads((snapshot / compile_cache.META_FILE).read_text())
    assert meta["commit"] == base and meta["trial"] == trials[0].id and meta["files"] == 2
    assert meta["warmup_seconds"] > 0

    logs = [(ws.trial_dir(t.id) / LOG_FILE).read_text() for t in trials]
    assert cache_lines(logs[0]) == ["cache holds: []"]
    # The second baseline run's own kernels are not in the candidate's cache.
    assert cache_lines(logs[1]) == cache_lines(logs[2]) == ["cache holds: ['held open', 'kernels of seed 0']"]
    assert json.loads((ws.trial_dir(trials[0].id) / "result.json").read_text())["compile_cache"]["snapshot"]["files"] == 2
    assert "[autoresearch: its compile cache was kept for later runs of this train.py" in logs[0]

    # A workspace made later from the same train.py starts its baseline from that snapshot; one made from
    # another train.py (a research choice of its own) starts from nothing.
    same = make_workspace(tmp_path / "same", cpu_prepared, hostile_cacher(cpu_prepared.path / "val.bin"),
                          baseline_runs=1, rule="strict")
    other = make_workspace(tmp_path / "other", cpu_prepared,
                           hostile_cacher(cpu_prepared.path / "val.bin").replace("LR = 0.003", "LR = 0.004"),
                           baseline_runs=1, rule="strict")
    assert [t.hardware.get("compile_cache") for t in run_lab(same)] == [same.config["base_commit"]]
    assert [t.hardware.get("compile_cache") for t in run_lab(other)] == [None]
    assert cache_lines((same.trial_dir(1) / LOG_FILE).read_text()) == cache_lines(logs[1])


def test_an_unsandboxed_trial_neither_leaves_nor_gets_a_compile_cache(tmp_path, cpu_prepared):
    ws = make_workspace(tmp_path / "ws", cpu_prepared, hostile_cacher(cpu_prepared.path / "val.bin"),
                        baseline_runs=1, rule="strict")
    lab = Lab(ws, log=lambda msg: None, executor=LocalExecutor(standby=False, compile_cache=True), sandboxed=False)
    try:
        lab.run(ScriptedProposer([]))
        [trial] = lab.ledger.trials()
    finally:
        lab.close()
    assert "compile_cache" not in trial.hardware
    assert not (cache_dir() / compile_cache.FOLDER).exists()


def make_store(tmp_path: Path, device_class: str = "H100 80GB HBM3") -> CompileCache:
    return CompileCache(tmp_path / "store", {"torch": "2.11.0", "device_class": device_class})


def run_of(commit: str, train_py: str | None = None) -> tuple[str, str]:
    """(commit, its train.py's blob id); here a commit's train.py is its own unless named."""
    return commit, f"blob of {train_py or commit}"


def folder(cache: CompileCache, train_py: str) -> Path:
    return cache.root / cache.key(f"blob of {train_py}")


def finish(cache: CompileCache, plan, warmup: float, trial_id: int, files: int = 1) -> str | None:
    """What the supervisor would leave for `plan`'s run: its snapshot (when asked for one) and its clock."""
    if plan.incoming is not None:
        (plan.incoming / compile_cache.FILES).mkdir(parents=True)
        (plan.incoming / compile_cache.FILES / "kernel").write_text(f"trial {trial_id}")
    result = {"outcome": "ok", "clock": {"launched": 0.5, "first_request": 1.0, "started": 1.0 + warmup},
              "compile_cache": {"snapshot": {"files": files, "bytes": 10, "seconds": 0.1}} if plan.incoming
              else {"seeded": {"files": plan.made_files, "bytes": 10}}}
    return cache.record(plan, result, trial_id)


def test_a_run_is_given_its_own_train_pys_snapshot_else_the_baselines_never_an_earlier_bests(tmp_path):
    cache = make_store(tmp_path)
    base = run_of("A")
    first = cache.plan(base, base, 1)
    assert first.given is None and first.incoming is not None
    finish(cache, first, 40.0, 1)
    child = cache.plan(run_of("B"), base, 2)  # a candidate built on the baseline
    assert (child.given, child.incoming, child.made_warmup) == ("A", None, 40.0 - 0.1)
    assert child.source == folder(cache, "A") / compile_cache.FILES
    finish(cache, child, 9.0, 2)  # it hit: nothing more is kept
    # B kept as the best, with a snapshot of its own from a later run of it: C, built on B, is given the
    # baseline's, never B's, whose pickles would run in C.
    assert cache.plan(run_of("B"), base, 3).given == "A"
    (folder(cache, "B") / compile_cache.FILES).mkdir(parents=True)
    (folder(cache, "B") / compile_cache.META_FILE).write_text('{"warmup_seconds": 40.0, "files": 1}')
    assert cache.plan(run_of("C"), base, 4).given == "A"
    assert cache.plan(run_of("B"), base, 5).given == "B"  # its own
    # A commit whose train.py is A's (a change undone) is given it as its own; another device, nothing.
    assert cache.plan(run_of("F", "A"), base, 6).given == "F"
    assert make_store(tmp_path, "NVIDIA H200").plan(run_of("A"), base, 7).given is None


def test_a_commit_that_missed_the_baselines_snapshot_compiles_afresh_next_time_and_keeps_its_own(tmp_path):
    cache = make_store(tmp_path)
    base = run_of("A")
    finish(cache, cache.plan(base, base, 1), 40.0, 1)
    child = cache.plan(run_of("B"), base, 2)
    note = finish(cache, child, 38.0, 2)  # its edit changed what is compiled: a warm-up as long as a cold one
    assert "missed" in note
    again = cache.plan(run_of("B"), base, 3)
    assert again.given is None and again.incoming is not None
    finish(cache, again, 39.0, 3)
    assert cache.plan(run_of("B"), base, 4).given == "B"


def test_a_seed_that_came_out_short_is_no_miss(tmp_path):
    cache = make_store(tmp_path)
    base = run_of("A")
    finish(cache, cache.plan(base, base, 1), 40.0, 1, files=3)
    child = cache.plan(run_of("B"), base, 2)
    child.made_files = 3
    result = {"outcome": "ok", "clock": {"first_request": 1.0, "started": 39.0},
              "compile_cache": {"seeded": {"files": 1}}}  # another lab evicted it while it was copied
    assert cache.record(child, result, 2) is None
    assert cache.plan(run_of("B"), base, 3).given == "A"


def test_a_failed_run_leaves_no_snapshot_and_only_the_most_recently_used_are_kept(tmp_path):
    cache = make_store(tmp_path)
    plan = cache.plan(run_of("A"), None, 1)
    (plan.incoming / compile_cache.FILES).mkdir(parents=True)
    assert cache.record(plan, {}, 1) is None  # a crash: no result
    assert not plan.incoming.exists() and cache.plan(run_of("A"), None, 2).given is None
    for i in range(KEPT_SNAPSHOTS + 2):
        finish(cache, cache.plan(run_of(f"C{i}"), None, 10 + i), 30.0, 10 + i)
        os.utime(folder(cache, f"C{i}"), (i, i))  # in the order they were made
    kept = sorted(p.name for p in cache.root.iterdir() if p.is_dir())
    assert kept == sorted(folder(cache, f"C{i}").name for i in range(2, KEPT_SNAPSHOTS + 2))


def test_a_snapshot_in_the_making_that_a_dead_lab_left_is_swept(tmp_path):
    cache = make_store(tmp_path)
    cache.root.mkdir()
    left = cache.root / f"{compile_cache.INCOMING_PREFIX}{2**22 + 7}-3"  # above Linux's largest pid
    (left / compile_cache.FILES).mkdir(parents=True)
    mine = cache.plan(run_of("A"), None, 4)
    assert not left.exists() and mine.incoming.name == f"{compile_cache.INCOMING_PREFIX}{os.getpid()}-4"


def test_a_snapshot_copies_regular_files_only_and_refuses_a_cache_past_its_limits(tmp_path):
    source = tmp_path / "cache"
    (source / "triton" / "abc").mkdir(parents=True)
    (source / "triton" / "abc" / "kernel.cubin").write_bytes(b"\x7fELF" + b"\0" * 100)
    (tmp_path / "secret").write_text("the answers")
    (source / "to a file").symlink_to(tmp_path / "secret")
    (source / "to a folder").symlink_to(tmp_path)
    os.mkfifo(source / "pipe")
    size, files = copy_files(source, tmp_path / "copy")
    assert (size, files) == (104, 1)
    assert sorted(str(p.relative_to(tmp_path / "copy")) for p in (tmp_path / "copy").rglob("*")) == \
        ["triton", "triton/abc", "triton/abc/kernel.cubin"]
    with pytest.raises(TooLarge):
        copy_files(source, tmp_path / "small", limits=(50, 10))
    with pytest.raises(TooLarge):
        copy_files(source, tmp_path / "few", limits=(1 << 20, 0))
    (tmp_path / "linked").symlink_to(source)
    with pytest.raises(OSError):  # the folder itself is never reached through a link
        copy_files(tmp_path / "linked", tmp_path / "through a link")


def chain(top: Path, depth: int, remove: bool = False) -> None:
    """Make top/d/d/.../d, `depth` deep, through folder descriptors (its path is too long to name); or
    remove it, a level at a time from the top (shutil.rmtree recurses too)."""
    fd = os.open(top, os.O_RDONLY | os.O_DIRECTORY)
    try:
        if remove:
            while True:
                try:
                    os.rename("d/d", "next", src_dir_fd=fd, dst_dir_fd=fd)
                except FileNotFoundError:
                    os.rmdir("d", dir_fd=fd)
                    return
                os.rmdir("d", dir_fd=fd)
                os.rename("next", "d", src_dir_fd=fd, dst_dir_fd=fd)
        for _ in range(depth):
            os.mkdir("d", dir_fd=fd)
            child = os.open("d", os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
            os.close(fd)
            fd = child
    finally:
        os.close(fd)


def test_a_cache_of_folders_too_deep_or_too_many_is_refused_without_exhausting_the_lab(tmp_path):
    deep = tmp_path / "deep"
    deep.mkdir()
    chain(deep, 1500)  # past Python's recursion limit: a copy by recursion would raise RecursionError
    try:
        with pytest.raises(TooLarge, match="deep"):
            copy_files(deep, tmp_path / "deep copy")
    finally:
        chain(deep, 1500, remove=True)
    wide = tmp_path / "wide"
    for i in range(60):
        (wide / str(i)).mkdir(parents=True)  # folders count, as files do
    with pytest.raises(TooLarge, match="entries"):
        copy_files(wide, tmp_path / "wide copy", limits=(1 << 20, 50))
    deepest = tmp_path / "deepest allowed" / Path(*["d"] * compile_cache.MAX_DEPTH)
    deepest.mkdir(parents=True)
    (deepest / "kernel").write_text("code")
    assert copy_files(tmp_path / "deepest allowed", tmp_path / "its copy") == (4, 1)
