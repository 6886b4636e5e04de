"""A verdict no trainer can forge: each class of cheat, as a real train.py run through `autoresearch trial`.

A proposer is rewarded for a lower number, so train.py is hostile. Every test here takes a workspace
whose baseline is measured, writes a cheating train.py into it, and runs `autoresearch trial` on it
(the cpu profile, the tiny real trainer, real sandboxes). Each asserts that the cheat was not kept,
that the ledger names the cause, and that nothing else of the record changed: the earlier rows,
results.tsv, the lab's config, and git, which stays on the best commit.
"""
from __future__ import annotations

import json
import os
import socket
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from autoresearch.lab.ledger import Ledger
from autoresearch.lab.outcomes import Failure, Status
from autoresearch.lab.workspace import git
from lab_helpers import TINY_TRAINER, make_workspace
from report_helpers import copy_workspace

HAND_IN = "    run.save_checkpoint(model, config, num_steps=steps, depth=1)\n"
START = "    run.training_started()\n"


def cheat(before: str, code: str, trainer: str = TINY_TRAINER) -> str:
    """The tiny trainer with `code` (indented for main) inserted before the line `before`."""
    assert before in trainer, before
    return trainer.replace(before, code + before, 1)


@pytest.fixture(scope="session")
def measured_workspace(tmp_path_factory, cpu_prepared) -> Path:
    """A workspace of the tiny trainer whose baseline (two seeds) is measured."""
    from autoresearch.lab.loop import Lab

    ws = make_workspace(tmp_path_factory.mktemp("guarded") / "ws", cpu_prepared, budget=1.5, baseline_runs=2)
    lab = Lab(ws, log=lambda msg: None)
    try:
        assert lab.baseline() is not None
    finally:
        lab.close()
    return ws.root


@pytest.fixture
def workspace(measured_workspace, tmp_path) -> Path:
    return copy_workspace(measured_workspace, tmp_path / "ws")


def configure(root: Path, **values) -> None:
    path = root / ".autoresearch" / "config.json"
    config = json.loads(path.read_text())
    config.update(values)
    path.write_text(json.dumps(config, indent=2))
    ledger = sqlite3.connect(root / ".autoresearch" / "ledger.db")  # the lab's record of its own config
    import hashlib

    ledger.execute("UPDATE meta SET value = ? WHERE key = 'config_sha256'",
                   (json.dumps(hashlib.sha256(path.read_bytes()).hexdigest()),))
    ledger.commit()
    ledger.close()


def record(root: Path) -> dict:
    """Everything of the record a trial must leave as it found it."""
    ledger = Ledger(root / ".autoresearch" / "ledger.db")
    try:
        rows = [(t.id, t.status, t.val_bpb, t.commit_sha, t.reason) for t in ledger.trials()]
    finally:
        ledger.close()
    return {"rows": rows, "tsv": (root / "results.tsv").read_text().splitlines(),
            "config": (root / ".autoresearch" / "config.json").read_bytes(), "head": git(root, "rev-parse", "HEAD")}


def attempt(root: Path, trainer: str, *, env: dict | None = None, unsandboxed: bool = False, timeout: float = 300):
    """Write `trainer` as train.py and run `autoresearch trial` on it: (the new ledger row, the command's output)."""
    before = record(root)
    (root / "train.py").write_text(trainer)
    command = [sys.executable, "-m", "autoresearch", "trial", "-m", "a cheat", str(root)]
    if unsandboxed:
        command.append("--unsandboxed")
    proc = subprocess.run(command, capture_output=True, text=True, timeout=timeout, env={**os.environ, **(env or {})})
    after = record(root)
    assert after["rows"][:len(before["rows"])] == before["rows"], "an earlier row changed"
    assert after["tsv"][:len(before["tsv"])] == before["tsv"], "results.tsv lost or changed a line"
    assert after["config"] == before["config"], "the lab's config changed"
    assert after["head"] == before["head"], "git is not on the best commit"
    ledger = Ledger(root / ".autoresearch" / "ledger.db")
    try:
        trial = ledger.trials()[-1]
    finally:
        ledger.close()
    assert trial.status != Status.KEEP, (trial.status, trial.val_bpb, trial.reason)
    return trial, proc.stdout + proc.stderr


def untrained(trainer: str) -> str:
    """The trainer handing in after one step: a probe whose cheat failed then scores far worse than the
    baseline, so that only a cheat that worked could be kept."""
    budget = "while time.time() - started < run.time_budget:  # BUDGET"
    assert budget in trainer
    return trainer.replace(budget, "while steps < 1:")


def trainer_folder(root: Path, trial_id: int) -> Path:
    return root / ".autoresearch" / "trials" / f"{trial_id:05d}" / "sandbox" / "train"


def baseline_mean(root: Path) -> float:
    ledger = Ledger(root / ".autoresearch" / "ledger.db")
    try:
        values = [t.val_bpb for t in ledger.trials() if t.kind == "baseline"]
    finally:
        ledger.close()
    return sum(values) / len(values)


# --- the clock ---------------------------------------------------------------------------------------
def test_training_past_the_budget_is_ended_when_the_budget_runs_out(workspace):
    greedy = TINY_TRAINER.replace("while time.time() - started < run.time_budget:  # BUDGET",
                                  "while time.time() - started < 20 * run.time_budget:")
    started = time.monotonic()
    trial, out = attempt(workspace, greedy)
    assert (trial.status, trial.failure) == (Status.CRASH, Failure.OVER_BUDGET)
    assert "by the lab's clock" in trial.reason
    assert time.monotonic() - started < 60  # ended at the budget, not after its 30 s of training


def test_training_before_the_clock_starts_sees_only_random_rows(workspace):
    # The whole "training" happens in a long warm-up, before training_started(); then it hands in at once.
    early = cheat(START, "    import numpy as np\n    seen = []\n    for _ in range(200):\n"
                         "        inputs, targets, _ = next(loader)\n        seen.append(inputs.numpy())\n"
                         "        loss = F.cross_entropy(model(inputs).view(-1, run.vocab_size), targets.view(-1))\n"
                         "        optimizer.zero_grad(); loss.backward(); optimizer.step()\n"
                         "    np.save('prestart.npy', np.stack(seen))\n")
    early = early.replace("while time.time() - started < run.time_budget:  # BUDGET", "while steps < 1:")
    trial, _ = attempt(workspace, early)
    assert trial.status == Status.DISCARD and trial.val_bpb > baseline_mean(workspace)
    import numpy as np

    rows = np.load(trainer_folder(workspace, trial.id) / "prestart.npy")
    counts = np.bincount(rows[:, :, 1:].ravel(), minlength=2048)
    assert counts.min() > 0 and counts.max() < 3 * counts.mean()  # uniform noise, not text


def test_a_warm_up_longer_than_the_start_up_limit_is_ended(workspace):
    configure(workspace, startup_limit=6.0)
    slow = cheat(START, "    time.sleep(60)\n")
    started = time.monotonic()
    trial, _ = attempt(workspace, slow)
    assert (trial.status, trial.failure) == (Status.CRASH, Failure.STARTUP_TIMEOUT)
    assert time.monotonic() - started < 40


def test_the_start_cannot_be_told_twice_and_a_checkpoint_before_it_is_refused(workspace):
    # Hands in right away, before saying that training started: nothing was trained on training data.
    early = TINY_TRAINER.replace(START, "").replace("while time.time() - started < run.time_budget:  # BUDGET",
                                                    "while steps < 1:")
    trial, _ = attempt(workspace, early)
    assert (trial.status, trial.failure) == (Status.CRASH, Failure.NO_DATA)


# --- the checkpoint ------------------------------------------------------------------------------------
def test_weights_trained_after_the_hand_in_count_for_nothing(workspace):
    # Hands in an untrained model at once, then would train on for 10 s, hand in again and overwrite files;
    # the lab ends it at the hand-in and scores what was handed in.
    late = untrained(TINY_TRAINER).replace(HAND_IN, HAND_IN + "    for _ in range(100):\n        try:\n"
                                           "            run.save_checkpoint(model, config)\n        except Exception:\n"
                                           "            pass\n        for name in ['checkpoint.pt', '../checkpoint.pt', '/tmp/checkpoint.pt']:\n"
                                           "            try:\n                torch.save(model.state_dict(), name)\n"
                                           "            except Exception:\n                pass\n        time.sleep(0.1)\n")
    started = time.monotonic()
    trial, _ = attempt(workspace, late)
    assert trial.status == Status.DISCARD and trial.val_bpb > baseline_mean(workspace)  # the untrained model
    assert time.monotonic() - started < 60


def test_a_model_that_fails_only_when_scored_is_a_scoring_crash(workspace):
    # build_model works when train.py trains, and raises where the lab rebuilds it to score: no number at all.
    dodger = TINY_TRAINER.replace('def build_model(config):\n', 'def build_model(config):\n'
                                  '    if __name__ != "__main__":\n        raise RuntimeError("not scored today")\n')
    forger = cheat(HAND_IN, "    import json\n    for name in ['result.json', '../result.json', '../../result.json',\n"
                            "                 '/trial/eval-val.json']:\n        try:\n"
                            "            open(name, 'w').write(json.dumps({'outcome': 'ok', 'val_bpb': 0.5}))\n"
                            "        except OSError:\n            pass\n", dodger)
    trial, _ = attempt(workspace, forger)
    assert (trial.status, trial.failure) == (Status.CRASH, Failure.SCORING)
    assert "not scored today" in trial.reason


# --- the answers -----------------------------------------------------------------------------------------
def test_the_validation_and_test_tokens_are_out_of_reach(workspace, cpu_prepared):
    # If it could read val.bin it would hand in nothing but a lookup of the answers; it hands in an untrained
    # model otherwise. The data's folder is named here exactly, as a cheat that knows the cache would.
    data = str(cpu_prepared.path)
    snoop = cheat(START, f"    import os\n    found = []\n    for path in [{data + '/val.bin'!r}, {data + '/test.bin'!r}]:\n"
                         "        if os.path.exists(path):\n            found.append(path)\n"
                         "    for top, dirs, files in os.walk('/'):\n"
                         "        found += [os.path.join(top, f) for f in files if f in ('val.bin', 'test.bin', 'train.bin')]\n"
                         "        dirs[:] = [d for d in dirs if top + d not in ('/proc', '/sys', '/dev')]\n"
                         "    print('FOUND', found)\n")
    snoop = snoop.replace("while time.time() - started < run.time_budget:  # BUDGET", "while steps < 1:")
    trial, _ = attempt(workspace, snoop)
    log = (workspace / ".autoresearch" / "trials" / f"{trial.id:05d}" / "train.log").read_text()
    assert "FOUND []" in log
    assert trial.status == Status.DISCARD


def test_the_model_being_scored_cannot_read_the_answers_either(workspace, cpu_prepared):
    data = str(cpu_prepared.path)
    # Its forward pass looks for val.bin from inside the scoring sandbox; if found, it would answer from it.
    snooper = TINY_TRAINER.replace("        features = self.embed(idx)  # FEATURES\n",
                                   f"        import os\n        if os.path.exists({data + '/val.bin'!r}) or "
                                   "os.path.exists('/autoresearch/val.bin'):\n"
                                   "            raise RuntimeError('the answers are in reach')\n"
                                   "        features = self.embed(idx)  # FEATURES\n")
    trial, _ = attempt(workspace, untrained(snooper))
    assert "the answers are in reach" not in trial.reason
    assert trial.status == Status.DISCARD and trial.val_bpb is not None


def test_a_model_that_reads_the_next_token_is_a_causality_violation(workspace):
    peeker = TINY_TRAINER.replace("features = self.embed(idx)  # FEATURES",
                                  "features = self.embed(torch.cat([idx[:, 1:], idx[:, -1:]], dim=1))")
    trial, _ = attempt(workspace, peeker)
    assert (trial.status, trial.failure) == (Status.CRASH, Failure.CAUSALITY)
    assert trial.reason.startswith("causality violation")


def test_a_model_that_reads_ahead_and_replays_its_answers_to_probes_is_a_causality_violation(workspace):
    # It reads the next token, and answers any row that starts like one it has answered before with its
    # earlier answers up to where the two differ: a probe's copy in the same process would match exactly.
    replayer = TINY_TRAINER.replace("        features = self.embed(idx)  # FEATURES\n        return self.head(features)\n",
                                    "        out = self.head(self.embed(torch.cat([idx[:, 1:], idx[:, -1:]], dim=1)))\n"
                                    "        if not self.training:\n"
                                    "            memory = globals().setdefault('MEMORY', {})\n"
                                    "            for i in range(idx.shape[0]):\n"
                                    "                key = tuple(idx[i, :4].tolist())\n"
                                    "                if key in memory:\n"
                                    "                    seen, answer = memory[key]\n"
                                    "                    common = int((seen == idx[i]).int().cumprod(0).sum())\n"
                                    "                    out[i, :common] = answer[:common]\n"
                                    "                else:\n"
                                    "                    memory[key] = (idx[i].clone(), out[i].detach().clone())\n"
                                    "        return out\n")
    assert replayer != TINY_TRAINER
    trial, _ = attempt(workspace, replayer)
    assert (trial.status, trial.failure) == (Status.CRASH, Failure.CAUSALITY)


def test_a_model_that_reads_its_batch_mates_is_a_causality_violation(workspace):
    mates = TINY_TRAINER.replace("        return self.head(features)\n",
                                 "        return self.head(features + 0.1 * features.mean(dim=0, keepdim=True))\n")
    trial, _ = attempt(workspace, mates)
    assert (trial.status, trial.failure) == (Status.CRASH, Failure.CAUSALITY)


def test_patching_the_scorers_side_to_claim_certainty_is_caught(workspace):
    # Imported to be scored, it rewrites the harness code that answers (in the process it shares with it)
    # to claim probability 1 for every next token.
    patcher = TINY_TRAINER.replace("def build_model(config):\n",
                                   "import sys as _sys\n_server = _sys.modules.get('__main__')\n"
                                   "if hasattr(_server, 'LocalModel'):\n"
                                   "    _answer = _server.LocalModel.answer\n"
                                   "    def _certain(self, rows):\n        lse, z = _answer(self, rows)\n"
                                   "        return lse, lse.copy()\n"
                                   "    _server.LocalModel.answer = _certain\n\n\ndef build_model(config):\n")
    trial, _ = attempt(workspace, patcher)
    assert (trial.status, trial.failure) == (Status.CRASH, Failure.CAUSALITY)
    assert "its answers are not its logits" in trial.reason


def test_fabricated_logits_that_favour_the_next_token_are_caught(workspace):
    # Subtler: it patches both what it answers and the vectors it shows, consistently, putting more mass on
    # the token that follows (which it can see in the row it is given).
    patcher = TINY_TRAINER.replace("def build_model(config):\n",
                                   "import sys as _sys\n_server = _sys.modules.get('__main__')\n"
                                   "if hasattr(_server, 'LocalModel'):\n"
                                   "    _answer = _server.LocalModel.answer\n"
                                   "    def _favour(self, rows):\n"
                                   "        _answer(self, rows)\n"
                                   "        targets = torch.as_tensor(rows[:, 1:].astype('int64'))\n"
                                   "        self.last.scatter_add_(-1, targets.unsqueeze(-1), torch.full(targets.shape + (1,), 5.0))\n"
                                   "        lse = torch.logsumexp(self.last, -1)\n"
                                   "        z = self.last.gather(-1, targets.unsqueeze(-1)).squeeze(-1)\n"
                                   "        return lse.numpy(), z.numpy()\n"
                                   "    _server.LocalModel.answer = _favour\n\n\ndef build_model(config):\n")
    trial, _ = attempt(workspace, patcher)
    assert (trial.status, trial.failure) == (Status.CRASH, Failure.CAUSALITY)


# --- what the sandbox keeps it from --------------------------------------------------------------------------
def test_nothing_a_trial_leaves_behind_reaches_the_next_one(workspace):
    stash = cheat(HAND_IN, "    import os\n    for folder in ['/tmp', '/dev/shm', '/trial', os.path.expanduser('~'), '.']:\n"
                           "        try:\n            torch.save(model.state_dict(), os.path.join(folder, 'stash.pt'))\n"
                           "        except OSError:\n            pass\n")
    first, _ = attempt(workspace, untrained(stash))
    look = cheat(START, "    import os\n    hits = []\n    for top, dirs, files in os.walk('/'):\n"
                        "        hits += [os.path.join(top, f) for f in files if f == 'stash.pt']\n"
                        "        dirs[:] = [d for d in dirs if top + d not in ('/proc', '/sys')]\n"
                        "    print('STASHES', hits)\n")
    second, _ = attempt(workspace, untrained(look))
    log = (workspace / ".autoresearch" / "trials" / f"{second.id:05d}" / "train.log").read_text()
    assert "STASHES []" in log


def test_the_lab_s_files_and_the_ledger_cannot_be_written(workspace):
    lab = str(workspace / ".autoresearch")
    writer = cheat(HAND_IN, f"    import sqlite3\n    for path in [{lab + '/config.json'!r}, {lab + '/ledger.db'!r},\n"
                            f"                 {str(workspace / 'results.tsv')!r}, {str(workspace / 'train.py')!r}]:\n"
                            "        try:\n            open(path, 'a').write(' ')\n            print('WROTE', path)\n"
                            "        except OSError as e:\n            print('refused', type(e).__name__)\n")
    trial, _ = attempt(workspace, untrained(writer))
    log = (workspace / ".autoresearch" / "trials" / f"{trial.id:05d}" / "train.log").read_text()
    assert "WROTE" not in log and log.count("refused") == 4


def test_a_detached_process_dies_with_the_trial(workspace):
    daemon = ("import os, time\nif os.fork():\n    os._exit(0)\nos.setsid()\nif os.fork():\n    os._exit(0)\n"
              "while True:\n    open('/trial/heartbeat', 'a').write('x')\n    time.sleep(0.05)\n")
    spawner = cheat(HAND_IN, f"    import subprocess, sys\n    subprocess.Popen([sys.executable, '-c', {daemon!r}], env={{}},\n"
                             "                     start_new_session=True)\n    time.sleep(0.5)\n")
    trial, _ = attempt(workspace, untrained(spawner))
    heartbeat = trainer_folder(workspace, trial.id) / "heartbeat"
    assert heartbeat.exists()
    size = heartbeat.stat().st_size
    time.sleep(0.5)
    assert heartbeat.stat().st_size == size


def test_the_lab_s_secrets_are_out_of_reach(workspace):
    snoop = cheat(START, "    import os\n    hits = [k for k in os.environ if 'KEY' in k and k != 'AUTORESEARCH_KEY']\n"
                         "    for pid in os.listdir('/proc'):\n        if pid.isdigit():\n            try:\n"
                         "                if b'sk-very-secret' in open(f'/proc/{pid}/environ', 'rb').read():\n"
                         "                    hits.append(pid)\n            except OSError:\n                pass\n"
                         "    print('SECRETS', hits)\n")
    trial, _ = attempt(workspace, untrained(snoop), env={"OPENAI_API_KEY": "sk-very-secret", "ANTHROPIC_API_KEY": "sk-very-secret"})
    log = (workspace / ".autoresearch" / "trials" / f"{trial.id:05d}" / "train.log").read_text()
    assert "SECRETS []" in log


def test_the_network_is_out_of_reach(workspace):
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    port = server.getsockname()[1]
    caller = cheat(START, f"    import socket\n    s = socket.socket()\n    s.settimeout(2)\n"
                          f"    print('CONNECT', s.connect_ex(('127.0.0.1', {port})))\n")
    try:
        trial, _ = attempt(workspace, untrained(caller))
    finally:
        server.close()
    log = (workspace / ".autoresearch" / "trials" / f"{trial.id:05d}" / "train.log").read_text()
    assert "CONNECT 0" not in log and "CONNECT" in log


def test_memory_is_limited(workspace):
    configure(workspace, memory_bytes=3 << 30)
    hog = cheat(START, "    hog = bytearray(6 << 30)\n")
    trial, _ = attempt(workspace, hog)
    assert (trial.status, trial.failure) == (Status.CRASH, Failure.OOM)


# --- without a sandbox ---------------------------------------------------------------------------------------
def test_unsandboxed_trials_are_marked_and_still_checked(workspace):
    lab = str(workspace / ".autoresearch")
    writer = cheat(HAND_IN, f"    open({lab + '/config.json'!r}, 'a').write(' ')\n")
    trial, out = attempt_unchecked_config(workspace, writer)
    assert trial.sandboxed is False
    assert (trial.status, trial.failure) == (Status.CRASH, Failure.TAMPERING)
    assert "unsandboxed" in out


def test_an_unsandboxed_trial_is_timed_and_scored_all_the_same(workspace):
    trial, out = attempt(workspace, untrained(TINY_TRAINER), unsandboxed=True)
    assert trial.sandboxed is False and trial.status == Status.DISCARD
    assert trial.val_bpb > baseline_mean(workspace) and trial.training_seconds is not None


def attempt_unchecked_config(root: Path, trainer: str):
    """As attempt(), but the config is allowed to change: the point is that the lab says it did."""
    (root / "train.py").write_text(trainer)
    proc = subprocess.run([sys.executable, "-m", "autoresearch", "trial", "-m", "a cheat", "--unsandboxed", str(root)],
                          capture_output=True, text=True, timeout=300)
    ledger = Ledger(root / ".autoresearch" / "ledger.db")
    try:
        return ledger.trials()[-1], proc.stdout + proc.stderr
    finally:
        ledger.close()
