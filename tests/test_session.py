"""The harness as train.py sees it (harness.session, harness.standalone, harness.run).

Under the lab, train.py finds the lab on a Unix socket ($AUTORESEARCH_SOCKET) and proves who it is
with the trial's key ($AUTORESEARCH_KEY): here a real serve_trainer answers it from a real Feed on
the embedded default corpus prepared for the `cpu` profile (sequence 256, vocabulary 2048), as the
supervisor does. Run by hand (`python train.py`, no lab), the same calls are served in-process and
the checkpoint is scored there. Run as the lab runs it (`python -m autoresearch.harness.run`), a
failure is told by the exit code.
"""
from __future__ import annotations

import io
import itertools
import os
import re
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
import torch

import autoresearch
from autoresearch.harness import PROFILES, HarnessError, start_run
from autoresearch.harness import run as harness_run
from autoresearch.harness import wire
from autoresearch.harness.feed import Feed, serve_trainer
from autoresearch.harness.loader import EPOCH_END, pack_rows
from autoresearch.harness.session import CHECKPOINT_FILE

KEY = "this-trials-key"
CPU = PROFILES["cpu"]
SUMMARY_KEYS = ("val_bpb", "training_seconds", "total_seconds", "peak_vram_mb", "mfu_percent", "total_tokens_M",
                "num_steps", "num_params_M", "depth")


class Lab:
    """The supervisor's side of training: a listening Unix socket, serve_trainer for each connection."""

    def __init__(self, data, world_size: int = 1, seed: int | None = 7, feed: Feed | None = None):
        self.feed = feed or Feed(data.tokens("train"), data.doc_starts("train"), CPU.seq_len, data.tokenizer.bos_id,
                                 CPU.vocab_size, world_size)
        self.settings = {"profile": asdict(CPU), "time_budget": 12.5, "bos_id": data.tokenizer.bos_id, "seed": seed,
                         "device": "cpu", "tokenizer": str(data.path)}
        self.checkpoints: list[tuple[bytes, dict, float]] = []
        self.folder = Path(tempfile.mkdtemp(prefix="ar-lab-"))  # a Unix socket's path must be short
        self.path = str(self.folder / "lab.sock")
        self.server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.server.bind(self.path)
        self.server.listen(4)
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.server.accept()
            except OSError:
                return
            threading.Thread(target=self._talk, args=(conn,), daemon=True).start()

    def _talk(self, conn: socket.socket) -> None:
        try:
            serve_trainer(conn, self.feed, self.settings, lambda *hand_in: self.checkpoints.append(hand_in), key=KEY)
        except (OSError, wire.WireError):
            pass
        finally:
            conn.close()

    def close(self) -> None:
        self.server.close()
        os.unlink(self.path)
        self.folder.rmdir()


@pytest.fixture
def lab(cpu_prepared, monkeypatch):
    lab = Lab(cpu_prepared)
    monkeypatch.setenv(wire.SOCKET_ENV, lab.path)
    monkeypatch.setenv(wire.KEY_ENV, KEY)
    yield lab
    lab.close()


def training_rows(data, seed: int, n: int) -> np.ndarray:
    """The first n rows the lab owes after the start: the documents shuffled by (seed, epoch), packed."""
    starts, tokens = data.doc_starts("train"), data.tokens("train")
    ends = np.append(starts[1:], len(tokens))

    def documents():
        for epoch in itertools.count():
            for i in np.random.default_rng((seed, epoch)).permutation(len(starts)):
                yield int(starts[i]), int(ends[i])
            yield EPOCH_END

    return np.stack(list(itertools.islice(pack_rows(tokens, documents(), CPU.seq_len + 1, data.tokenizer.bos_id), n)))


def as_rows(inputs: torch.Tensor, targets: torch.Tensor) -> np.ndarray:
    return torch.cat([inputs, targets[:, -1:]], dim=1).numpy()


# --- start_run --------------------------------------------------------------------------------------
def test_start_run_takes_the_runs_settings_from_the_lab(lab, cpu_prepared):
    run = start_run()
    assert run.profile == CPU and run.time_budget == 12.5 and run.device == torch.device("cpu")
    assert (run.seq_len, run.vocab_size, run.bos_id) == (256, 2048, cpu_prepared.tokenizer.bos_id)
    assert run.seed(42) == 7  # the lab repeats this run under seed 7
    assert (run.rank, run.world_size) == (0, 1)
    assert run.tokenizer.bos_id == run.bos_id


def test_without_a_seed_from_the_lab_the_trainers_own_is_used(cpu_prepared, monkeypatch):
    lab = Lab(cpu_prepared, seed=None)
    monkeypatch.setenv(wire.SOCKET_ENV, lab.path)
    monkeypatch.setenv(wire.KEY_ENV, KEY)
    try:
        assert start_run().seed(42) == 42
    finally:
        lab.close()


def test_start_run_without_the_trials_key_is_refused(lab, monkeypatch):
    monkeypatch.setenv(wire.KEY_ENV, "a-guess")
    with pytest.raises(HarnessError, match="The lab refused a request: a hello without the trial's key"):
        start_run()
    assert lab.feed.requests == 0


# --- the loader ---------------------------------------------------------------------------------------
def test_the_loader_yields_inputs_and_targets_of_the_profiles_shape_shifted_by_one(lab, cpu_prepared):
    run = start_run()
    inputs, targets, epoch = next(run.train_loader(8, seed=1))
    assert inputs.shape == targets.shape == (8, 256)
    assert inputs.dtype == targets.dtype == torch.int64 and inputs.device == torch.device("cpu")
    assert torch.equal(inputs[:, 1:], targets[:, :-1]) and epoch == 0
    assert (inputs[:, 0] == cpu_prepared.tokenizer.bos_id).all()


def test_rows_are_random_before_training_started_and_the_training_rows_after(lab, cpu_prepared):
    run = start_run()
    loader = run.train_loader(8, seed=1)
    owed = training_rows(cpu_prepared, seed=1, n=3 * 8)
    for _ in range(3):
        warm_up = as_rows(*next(loader)[:2])
        assert not any((row == known).all() for row in warm_up for known in owed)
    assert lab.feed.tokens_served == 0 and lab.feed.started_at is None
    run.training_started()
    assert lab.feed.started_at is not None
    trained = np.concatenate([as_rows(*next(loader)[:2]) for _ in range(3)])
    assert np.array_equal(trained, owed)
    assert lab.feed.tokens_served in (3 * 8 * 256, 4 * 8 * 256)  # and maybe the next batch, fetched ahead


class SlowWarmUpFeed(Feed):
    """A feed that takes a while over random rows, so that a loader's prefetch is still waiting for
    them when train.py says that training started."""

    def __init__(self, *args):
        super().__init__(*args)
        self.random_asked = 0
        self.second_random_asked = threading.Event()  # the loader's prefetch reached the lab

    def rows(self, n, seed, rank=0):
        if self.started_at is None:
            self.random_asked += 1
            if self.random_asked == 2:
                self.second_random_asked.set()
            time.sleep(0.3)
        return super().rows(n, seed, rank)


def test_rows_fetched_ahead_across_the_start_are_not_trained_on(cpu_prepared, monkeypatch):
    slow = SlowWarmUpFeed(cpu_prepared.tokens("train"), cpu_prepared.doc_starts("train"), 256,
                          cpu_prepared.tokenizer.bos_id, 2048)
    lab = Lab(cpu_prepared, feed=slow)
    monkeypatch.setenv(wire.SOCKET_ENV, lab.path)
    monkeypatch.setenv(wire.KEY_ENV, KEY)
    try:
        run = start_run()
        loader = run.train_loader(8, seed=2)
        next(loader)  # the warm-up batch; the loader asks for the next one at once
        assert slow.second_random_asked.wait(10)
        run.training_started()  # while that request is still being answered, with random rows
        first = as_rows(*next(loader)[:2])
        assert np.array_equal(first, training_rows(cpu_prepared, seed=2, n=8))
        assert slow.random_asked == 2
    finally:
        lab.close()


def test_two_ranks_draw_step_for_step_what_one_process_would_with_twice_the_micro_batches(cpu_prepared,
                                                                                             monkeypatch):
    lab = Lab(cpu_prepared, world_size=2)
    monkeypatch.setenv(wire.SOCKET_ENV, lab.path)
    monkeypatch.setenv(wire.KEY_ENV, KEY)
    try:
        runs = []
        for rank in (0, 1):
            monkeypatch.setenv("RANK", str(rank))
            runs.append(start_run())
        assert [(r.rank, r.world_size) for r in runs] == [(0, 2), (1, 2)]
        loaders = [r.train_loader(4, seed=3) for r in runs]
        for loader in loaders:
            next(loader)
        runs[1].training_started()
        assert lab.feed.started_at is None  # only rank 0's start starts the clock
        runs[0].training_started()
        owed = training_rows(cpu_prepared, seed=3, n=3 * 2 * 4).reshape(3, 2, 4, 257)
        for step in range(3):
            for rank, loader in enumerate(loaders):
                assert np.array_equal(as_rows(*next(loader)[:2]), owed[step, rank]), (step, rank)
    finally:
        lab.close()


# --- the hand-in ----------------------------------------------------------------------------------------
class TinyLM(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.embed = torch.nn.Embedding(2048, 16)
        self.head = torch.nn.Linear(16, 2048, bias=False)

    def forward(self, inputs):
        return self.head(self.embed(inputs))


def handed_in(lab: Lab) -> tuple[dict, dict, float]:
    [(payload, stats, arrived)] = lab.checkpoints
    return torch.load(io.BytesIO(payload), weights_only=True), stats, arrived


def test_the_checkpoint_is_the_weights_config_and_stats_loadable_without_pickled_code(lab):
    run = start_run()
    next(run.train_loader(4))
    run.training_started()
    model = TinyLM()
    run.save_checkpoint(torch.compile(model), {"vocab_size": 2048, "dim": 16}, num_steps=3, depth=1)
    checkpoint, stats, arrived = handed_in(lab)
    assert checkpoint["config"] == {"vocab_size": 2048, "dim": 16} and checkpoint["profile"] == "cpu"
    assert list(checkpoint["state_dict"]) == ["embed.weight", "head.weight"]  # no torch.compile prefix
    assert all(torch.equal(checkpoint["state_dict"][k], v) for k, v in model.state_dict().items())
    assert stats["num_steps"] == 3 and stats["depth"] == 1
    assert stats["peak_memory_mb"] > 0 and stats["device_name"].startswith("CPU")  # the harness's, not the trainer's
    assert arrived >= lab.feed.started_at and lab.feed.closed_at is not None


def test_a_model_with_compiled_parts_is_handed_in_under_the_names_build_model_gives(lab):
    run = start_run()
    model = TinyLM()
    model.embed = torch.compile(model.embed)
    run.save_checkpoint(model, {})
    assert list(handed_in(lab)[0]["state_dict"]) == ["embed.weight", "head.weight"]


def test_a_data_parallel_model_is_handed_in_as_the_module_it_wraps(lab, tmp_path):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0, world_size=1)
    try:
        wrapped = torch.nn.parallel.DistributedDataParallel(torch.compile(TinyLM()))
        start_run().save_checkpoint(wrapped, {})
    finally:
        dist.destroy_process_group()
    assert list(handed_in(lab)[0]["state_dict"]) == ["embed.weight", "head.weight"]


# --- standalone: python train.py, no lab -----------------------------------------------------------------
def python_env(**extra) -> dict:
    src = str(Path(autoresearch.__file__).resolve().parents[1])
    env = {k: v for k, v in os.environ.items() if k not in (wire.SOCKET_ENV, wire.KEY_ENV)}
    return {**env, "PYTHONPATH": os.pathsep.join([src, os.environ.get("PYTHONPATH", "")]), **extra}


def test_train_py_run_by_hand_trains_scores_and_prints_the_summary(tmp_path, cpu_cache):
    from lab_helpers import TINY_TRAINER

    (tmp_path / "train.py").write_text(TINY_TRAINER)
    done = subprocess.run([sys.executable, "train.py"], cwd=tmp_path, capture_output=True, text=True, timeout=180,
                          env=python_env(AUTORESEARCH_CACHE=str(cpu_cache), AUTORESEARCH_TIME_BUDGET="1",
                                         AUTORESEARCH_DEVICE="cpu"))
    assert done.returncode == 0, done.stdout + done.stderr
    summary = dict(re.findall(r"^(\w+):\s+(\S+)$", done.stdout.split("\n---\n", 1)[1], flags=re.M))
    assert tuple(summary) == SUMMARY_KEYS
    assert 0 < float(summary["val_bpb"]) < 20
    assert 1.0 <= float(summary["training_seconds"]) < 5 and int(summary["num_steps"]) > 0
    assert float(summary["total_seconds"]) >= float(summary["training_seconds"])
    checkpoint = torch.load(tmp_path / "run_output" / CHECKPOINT_FILE, weights_only=True)
    assert checkpoint["config"] == {"vocab_size": 2048, "dim": 32} and checkpoint["profile"] == "cpu"


# --- python -m autoresearch.harness.run: failures told by the exit code --------------------------------
@pytest.mark.parametrize("body, code, says", [
    ("from autoresearch import harness\nraise harness.TrainingDiverged('loss is nan at step 12')",
     harness_run.EXIT_DIVERGED, "FAIL: loss is nan at step 12"),
    ("import torch\nraise torch.OutOfMemoryError('CUDA out of memory. Tried to allocate 2.00 GiB')",
     harness_run.EXIT_OOM, "Lower the device batch size"),
    ("raise MemoryError()", harness_run.EXIT_OOM, "FAIL: out of memory"),
    ("import flash_attn_not_installed_here", harness_run.EXIT_IMPORT, "No module named 'flash_attn_not_installed_here'"),
    ("from autoresearch.harness import HarnessError\nraise HarnessError('train.py broke a rule')",
     harness_run.EXIT_HARNESS, "FAIL: train.py broke a rule"),
    ("raise ValueError('a bug of its own')", harness_run.EXIT_ERROR, "ValueError: a bug of its own"),
], ids=["diverged", "torch-oom", "host-oom", "import", "harness-rule", "own-bug"])
def test_a_failure_of_train_py_is_told_by_the_exit_code(tmp_path, body, code, says):
    (tmp_path / "train.py").write_text(body + "\n")
    done = subprocess.run([sys.executable, "-m", "autoresearch.harness.run", "train.py"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=120, env=python_env())
    assert done.returncode == code, done.stderr
    assert says in done.stderr
    tracebacks = done.stderr.count("Traceback (most recent call last)")
    assert tracebacks == (0 if code in (harness_run.EXIT_DIVERGED, harness_run.EXIT_HARNESS) else 1)


def test_train_py_runs_as_main_with_its_arguments_and_its_own_exit_code(tmp_path):
    (tmp_path / "train.py").write_text("import sys\nassert __name__ == '__main__'\nprint(sys.argv)\nsys.exit(3)\n")
    done = subprocess.run([sys.executable, "-m", "autoresearch.harness.run", "train.py", "--depth", "4"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=60, env=python_env())
    assert done.returncode == 3 and done.stdout.strip() == "['train.py', '--depth', '4']"
    assert done.stderr == ""
