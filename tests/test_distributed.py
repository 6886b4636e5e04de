"""One trial on several processes: the train.py template data-parallel under torchrun, on the CPU (gloo).

Specifications: two ranks compute, step for step, what one process computes with the same total
batch and twice the accumulation (the same loss on every micro-batch, the same weights handed in);
a trial of two ranks runs through the lab's supervisor, in one sandbox, and is scored, its record
knowing the world size; a rank that fails ends the trial, which is recorded with that rank's exit
code and message; a rank that hangs is ended, with every other process of the trial, by the trial's
limit; and a TOTAL_BATCH_SIZE that the ranks cannot share says so, naming their number.
"""
from __future__ import annotations

import dataclasses
import io
import json
import os
import re
import socket
import subprocess
import sys
import tempfile
import threading
from dataclasses import asdict
from pathlib import Path

import pytest
import torch

import autoresearch
from autoresearch import harness
from autoresearch.harness import run as harness_run
from autoresearch.harness import wire
from autoresearch.harness.feed import Feed, serve_trainer
from autoresearch.lab import supervisor as sup
from autoresearch.lab.outcomes import Failure
from autoresearch.lab.trial import summarize
from lab_helpers import alive, tagged_processes

SRC = Path(autoresearch.__file__).parent.parent
CPU = harness.get_profile("cpu")
KEY = "the-trials-key"
# A model small enough for seconds of work on two cores; 4 rows of 256 tokens a micro-batch, 4096 tokens a
# step: four micro-batches on one process, two on each of two ranks.
TINY = dict(DEPTH=2, ASPECT_RATIO=32, HEAD_DIM=32, WINDOW_PATTERN="SL", TOTAL_BATCH_SIZE=4096, DEVICE_BATCH_SIZE=4)
START = "        run.training_started()\n"
# train.py's main() as it is, with three things seen from outside: a clock that reads one second later at every
# look (so that one process and two ranks take the same steps on the same schedule however busy the machine
# is), the loss of every micro-batch, and the norm of every gradient as the optimizer gets it. Each rank
# writes them to OUT.RANK.json.
RECORDING = '''
import importlib.util, json, os, sys

spec = importlib.util.spec_from_file_location("train", sys.argv[1])
train = importlib.util.module_from_spec(spec)
spec.loader.exec_module(train)


class Clock:
    now = 0.0

    def time(self):
        self.now += 1.0
        return self.now


seen = {"losses": [], "grad_norms": []}
make_loss_fn, setup_optimizer = train.make_loss_fn, train.setup_optimizer


def recording_loss_fn(*args, **kwargs):
    loss_fn = make_loss_fn(*args, **kwargs)

    def recorded(inputs, targets):
        loss = loss_fn(inputs, targets)
        seen["losses"].append(loss.item())
        return loss

    return recorded


def recording_optimizer(model):
    optimizer = setup_optimizer(model)
    step = optimizer.step

    def recorded():
        seen["grad_norms"].append([p.grad.norm().item() for p in model.parameters()])
        step()

    optimizer.step = recorded
    return optimizer


train.time, train.make_loss_fn, train.setup_optimizer = Clock(), recording_loss_fn, recording_optimizer
train.main()
with open(f"{sys.argv[2]}.{os.environ.get('RANK', '0')}.json", "w") as f:
    json.dump(seen, f)
'''


def trainer(extra: dict | None = None, after_start: str = "") -> str:
    """The template as a cpu workspace gets it, with TINY (and `extra`) written over its constants, and
    `after_start` (code indented for the training block) run once training has started."""
    text = harness.render_trainer(CPU)
    text = harness.render_trainer(dataclasses.replace(CPU, trainer={**TINY, **(extra or {})}), source=text)
    assert START in text
    return text.replace(START, START + after_start, 1)


class Lab:
    """The supervisor's side of training for `world_size` ranks: a Unix socket, a Feed, the hand-in."""

    def __init__(self, data, world_size: int, time_budget: float):
        self.feed = Feed(data.tokens("train"), data.doc_starts("train"), CPU.seq_len, data.tokenizer.bos_id,
                         CPU.vocab_size, world_size)
        self.settings = {"profile": asdict(CPU), "time_budget": time_budget, "bos_id": data.tokenizer.bos_id,
                         "seed": 5, "device": "cpu", "tokenizer": str(data.path)}
        self.checkpoints: list[tuple[bytes, dict]] = []
        self.folder = Path(tempfile.mkdtemp(prefix="ar-dp-"))  # a Unix socket's path must be short
        self.server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.server.bind(str(self.folder / "lab.sock"))
        self.server.listen(8)
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.server.accept()
            except OSError:
                return
            threading.Thread(target=self._talk, args=(conn,), daemon=True).start()

    def _talk(self, conn) -> None:
        try:
            serve_trainer(conn, self.feed, self.settings, lambda payload, stats, _: self.checkpoints.append(
                (bytes(payload), stats)), key=KEY)
        except (OSError, wire.WireError):
            pass
        finally:
            conn.close()

    def env(self) -> dict:
        env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
        return {**env, wire.SOCKET_ENV: str(self.folder / "lab.sock"), wire.KEY_ENV: KEY, "OMP_NUM_THREADS": "1",
                "PYTHONPATH": os.pathsep.join(filter(None, [str(SRC), os.environ.get("PYTHONPATH")]))}

    def close(self) -> None:
        self.server.close()
        for path in self.folder.iterdir():
            path.unlink()
        self.folder.rmdir()


def launch(lab: Lab, ranks: int, argv: list[str], cwd: Path) -> subprocess.CompletedProcess:
    """`python -m autoresearch.harness.run [--nproc-per-node=RANKS] ARGV`, as the supervisor starts train.py."""
    flag = [f"{harness_run.NPROC_FLAG}{ranks}"] if ranks > 1 else []
    return subprocess.run([sys.executable, "-m", "autoresearch.harness.run", *flag, *argv], cwd=cwd, env=lab.env(),
                          capture_output=True, text=True, timeout=120)


# --- the same maths --------------------------------------------------------------------------------------
def test_two_ranks_take_the_steps_of_one_process_with_twice_the_accumulation(tmp_path, cpu_prepared):
    (tmp_path / "train.py").write_text(trainer())
    (tmp_path / "recording.py").write_text(RECORDING)
    runs = {}
    for ranks in (1, 2):
        lab = Lab(cpu_prepared, world_size=ranks, time_budget=6)  # two steps on Clock's time
        try:
            proc = launch(lab, ranks, ["recording.py", "train.py", f"seen{ranks}"], tmp_path)
        finally:
            lab.close()
        assert proc.returncode == 0, proc.stdout + proc.stderr
        [(payload, stats)] = lab.checkpoints  # from rank 0 alone
        assert stats["world_size"] == ranks and stats["num_steps"] == 2
        header = [line for line in proc.stdout.splitlines() if line.startswith("device=")]
        assert len(header) == 1 and f"grad_accum={4 // ranks} ranks={ranks}" in header[0]  # printed by rank 0 alone
        seen = [json.loads((tmp_path / f"seen{ranks}.{r}.json").read_text()) for r in range(ranks)]
        runs[ranks] = torch.load(io.BytesIO(payload), weights_only=True)["state_dict"], seen

    (one_weights, [one]), (two_weights, [rank0, rank1]) = runs[1], runs[2]
    # Step s of one process draws chunks 4s..4s+3 of the rows; rank r of two draws 4s+r and 4s+2+r. Each
    # micro-batch's loss is the same (the first is the warm-up's, on random rows).
    losses = [loss for pair in zip(rank0["losses"][1:], rank1["losses"][1:]) for loss in pair]
    assert len(losses) == len(one["losses"][1:]) == 8
    assert losses == pytest.approx(one["losses"][1:], rel=1e-6)
    # The optimizer gets the same gradients, on both ranks: the mean over all four micro-batches.
    assert rank0["grad_norms"] == rank1["grad_norms"]
    assert rank0["grad_norms"][0] == pytest.approx(one["grad_norms"][0], rel=1e-5)
    assert rank0["grad_norms"][1] == pytest.approx(one["grad_norms"][1], rel=1e-3)
    # And the same weights come out, up to float order, which Muon's orthogonalisation in bf16 turns into
    # a bf16 rounding now and then: a few of its updates differ in their last bits.
    assert one_weights.keys() == two_weights.keys()
    for name, weight in one_weights.items():
        torch.testing.assert_close(two_weights[name], weight, rtol=0, atol=5e-3, msg=name)


def test_a_total_batch_the_ranks_cannot_share_names_their_number(tmp_path, cpu_prepared):
    (tmp_path / "train.py").write_text(trainer({"TOTAL_BATCH_SIZE": 3072}))  # 3 micro-batches of 1024 tokens
    lab = Lab(cpu_prepared, world_size=2, time_budget=5)
    try:
        proc = launch(lab, 2, ["train.py"], tmp_path)
    finally:
        lab.close()
    assert proc.returncode == harness_run.EXIT_ERROR, proc.stderr
    assert re.fullmatch(r"rank [01] of 2: ValueError: TOTAL_BATCH_SIZE=3072 must be a multiple of DEVICE_BATCH_SIZE "
                        r"\* seq_len \* ranks = 4 \* 256 \* 2 = 2048", proc.stderr.strip().splitlines()[-1])
    assert not lab.checkpoints


# --- through the lab's supervisor ---------------------------------------------------------------------------
def supervise(tmp_path: Path, data, text: str, *, budget: float = 2.0, sandboxed: bool = True) -> dict:
    """Run `text` as a trial of two ranks through the lab's supervisor, as trial.py starts it."""
    trial_dir = tmp_path / "trial"
    trial_dir.mkdir()
    (trial_dir / "train.py").write_text(text)
    spec = sup.TrialSpec(trainer=str(trial_dir / "train.py"), data=str(data.path), profile=asdict(CPU),
                         time_budget=budget, device="cpu", threads=1, world_size=2, sandboxed=sandboxed,
                         startup_limit=120, scoring_limit=120,
                         token=f"dp-test-{os.getpid()}-{tmp_path.name}")
    (trial_dir / sup.SPEC_FILE).write_text(json.dumps(asdict(spec)))
    proc = subprocess.run([sys.executable, "-m", "autoresearch.lab.supervisor", str(trial_dir)],
                          capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    result = json.loads((trial_dir / sup.RESULT_FILE).read_text())
    result["log"] = (trial_dir / sup.LOG_FILE).read_text()
    result["token"] = spec.token
    return result


def trial_processes(token: str) -> list[int]:
    """The processes still alive that carry the trial's token (every process of an unsandboxed trial does)."""
    return [pid for pid in tagged_processes(f"{sup.TRIAL_ENV}={token}/") if alive(pid)]


def test_a_trial_of_two_ranks_runs_in_the_sandbox_and_is_scored(tmp_path, cpu_prepared):
    result = supervise(tmp_path, cpu_prepared, trainer())
    assert result["outcome"] == "ok", (result.get("reason"), result["log"][-3000:])
    assert result["world_size"] == 2 and result["stats"]["world_size"] == 2 and result["sandboxed"]
    assert 0 < result["val_bpb"] < 5
    steps = result["stats"]["num_steps"]
    assert steps >= 1 and result["tokens_served"] >= steps * TINY["TOTAL_BATCH_SIZE"]  # both ranks' rows
    progress = [line for line in result["log"].splitlines() if line.startswith("train step=1 ")]
    assert len(progress) == 1  # rank 0 speaks for both
    assert summarize(result)["num_steps"] == steps


def test_a_rank_that_fails_ends_the_trial_with_its_own_code_and_message(tmp_path, cpu_prepared):
    fails = ("        if run.rank == 1:\n"
             "            raise harness.TrainingDiverged('rank 1 went its own way')\n")
    result = supervise(tmp_path, cpu_prepared, trainer(after_start=fails))
    assert result["outcome"] == "crash" and result["failure"] == Failure.DIVERGED.value, result
    assert result["reason"] == "train.py exited with code 71: rank 1 of 2: FAIL: rank 1 went its own way"
    assert not trial_processes(result["token"])


@pytest.mark.parametrize("sandboxed", [True, False], ids=["sandboxed", "unsandboxed"])
def test_a_rank_that_hangs_is_ended_by_the_trial_s_limit_with_every_other(tmp_path, cpu_prepared, sandboxed):
    hangs = ("        if run.rank == 1:\n"
             "            time.sleep(3600)\n")
    result = supervise(tmp_path, cpu_prepared, trainer(after_start=hangs), sandboxed=sandboxed)
    assert result["outcome"] == "crash" and result["failure"] == Failure.OVER_BUDGET.value, result
    assert not trial_processes(result["token"])
