"""The harness as train.py sees it: start_run() and the Run it returns.

These run on the embedded default corpus prepared for the real `cpu` profile (vocab 2048,
sequence 256, 131,072 evaluation tokens).
"""
from __future__ import annotations

import json
import math
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from autoresearch.harness import HarnessError, PROFILES, start_run
from autoresearch.harness.session import CHECKPOINT_FILE, RESULT_FILE

SUMMARY = {  # the keys train.py prints after `---`, as in the reference
    "val_bpb": 1.2345, "training_seconds": 300.1, "total_seconds": 325.9, "peak_vram_mb": 45060.2,
    "mfu_percent": 39.8, "total_tokens_M": 499.6, "num_steps": 953, "num_params_M": 50.3, "depth": 8,
}


class TinyLM(torch.nn.Module):
    def __init__(self, vocab: int = 2048, width: int = 32):
        super().__init__()
        torch.manual_seed(0)
        self.embed = torch.nn.Embedding(vocab, width)
        self.head = torch.nn.Linear(width, vocab)

    def forward(self, inputs):
        return self.head(self.embed(inputs))


class Unigram(torch.nn.Module):
    """Predicts the training split's token frequencies (add-one smoothed), whatever the context."""

    def __init__(self, train_tokens: np.ndarray, vocab: int):
        super().__init__()
        counts = np.bincount(train_tokens, minlength=vocab) + 1
        self.register_buffer("log_probs", torch.tensor(np.log(counts / counts.sum()), dtype=torch.float32))

    def forward(self, inputs):
        return self.log_probs.expand(*inputs.shape, len(self.log_probs))


@pytest.fixture
def run_env(monkeypatch, cpu_prepared, tmp_path):
    """The environment the lab gives a cpu run on the embedded default corpus."""
    env = {"AUTORESEARCH_PROFILE": "cpu", "AUTORESEARCH_DATA": str(cpu_prepared.path), "AUTORESEARCH_DEVICE": "cpu",
           "AUTORESEARCH_OUTPUT": str(tmp_path / "out")}
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    return env


@pytest.fixture
def run(run_env):
    return start_run()


@pytest.fixture(scope="module")
def uniform_bpb(cpu_prepared):
    """log2(vocab) bits for every target that carries bytes, over their bytes: a model knowing nothing."""
    rows = run_free_eval_rows(cpu_prepared)
    nbytes = torch.from_numpy(cpu_prepared.tokenizer.token_bytes())[rows[:, 1:]]
    return math.log2(2048) * int((nbytes > 0).sum()) / int(nbytes.sum())


def run_free_eval_rows(data):
    from autoresearch.harness.loader import eval_rows

    cpu = PROFILES["cpu"]
    return eval_rows(data.tokens("val"), data.doc_starts("val"), cpu.seq_len, data.tokenizer.bos_id, cpu.eval_rows)


def test_start_run_reads_the_environment(monkeypatch, cpu_prepared, tmp_path):
    monkeypatch.setenv("AUTORESEARCH_PROFILE", "cpu")
    monkeypatch.setenv("AUTORESEARCH_DATA", str(cpu_prepared.path))
    monkeypatch.setenv("AUTORESEARCH_DEVICE", "cpu")
    monkeypatch.setenv("AUTORESEARCH_OUTPUT", str(tmp_path / "nested" / "out"))
    monkeypatch.setenv("AUTORESEARCH_TIME_BUDGET", "12.5")
    run = start_run()
    assert run.profile is PROFILES["cpu"]
    assert run.data.path == cpu_prepared.path
    assert run.device == torch.device("cpu")
    assert run.output_dir == tmp_path / "nested" / "out" and run.output_dir.is_dir()
    assert run.time_budget == 12.5
    assert (run.seq_len, run.vocab_size) == (256, 2048)
    assert run.bos_id == run.tokenizer.bos_id == 2044


def test_start_run_defaults_to_the_data_prepare_made_last(monkeypatch, cpu_cache, cpu_prepared, tmp_path):
    monkeypatch.setenv("AUTORESEARCH_CACHE", str(cpu_cache))
    monkeypatch.setenv("AUTORESEARCH_PROFILE", "cpu")
    monkeypatch.chdir(tmp_path)
    run = start_run()
    assert run.data.path == cpu_prepared.path
    assert run.time_budget == PROFILES["cpu"].time_budget == 60.0
    assert run.output_dir.resolve() == tmp_path / "run_output" and run.output_dir.is_dir()


@pytest.mark.skipif(torch.cuda.is_available() or torch.backends.mps.is_available(), reason="needs a CPU-only machine")
def test_on_a_cpu_only_machine_the_profile_and_device_default_to_cpu(monkeypatch, cpu_cache, tmp_path):
    monkeypatch.setenv("AUTORESEARCH_CACHE", str(cpu_cache))
    monkeypatch.chdir(tmp_path)
    run = start_run()
    assert run.profile.name == "cpu" and run.device == torch.device("cpu")


def test_without_prepared_data_start_run_says_to_run_prepare(monkeypatch, cache):
    monkeypatch.setenv("AUTORESEARCH_PROFILE", "cpu")
    with pytest.raises(HarnessError, match=r"Run `autoresearch prepare --profile cpu`") as excinfo:
        start_run()
    assert str(cache) in str(excinfo.value)


def test_a_data_folder_without_a_manifest_says_to_run_prepare(monkeypatch, tmp_path):
    monkeypatch.setenv("AUTORESEARCH_PROFILE", "cpu")
    monkeypatch.setenv("AUTORESEARCH_DATA", str(tmp_path))
    with pytest.raises(HarnessError, match=r"autoresearch prepare --profile cpu"):
        start_run()


def test_data_prepared_for_another_profile_is_refused(monkeypatch, small_prepared):
    monkeypatch.setenv("AUTORESEARCH_PROFILE", "cpu")
    monkeypatch.setenv("AUTORESEARCH_DATA", str(small_prepared.path))  # vocab 512, cpu needs 2048
    with pytest.raises(HarnessError, match="built for another profile"):
        start_run()


def test_an_unknown_profile_lists_the_known_ones(monkeypatch):
    monkeypatch.setenv("AUTORESEARCH_PROFILE", "h200")
    with pytest.raises(ValueError, match="unknown profile 'h200'; choose one of: h100, gpu24, cpu"):
        start_run()


def test_the_train_loader_gives_batches_of_the_profiles_sequence_length(run):
    batches = run.train_loader(batch_size=4, seed=0)
    for _ in range(3):
        inputs, targets, epoch = next(batches)
        assert inputs.shape == targets.shape == (4, 256)
        assert inputs.dtype == torch.int64 and inputs.device.type == "cpu"
        assert torch.equal(inputs[:, 1:], targets[:, :-1])
        assert (inputs[:, 0] == run.bos_id).all()
        assert epoch == 0


def test_the_eval_rows_are_capped_by_the_profile_and_fixed(run):
    rows = run.eval_rows()
    assert rows.shape == (PROFILES["cpu"].eval_tokens // 256, 257)  # the val split holds more
    assert torch.equal(rows, run.eval_rows())
    assert run.eval_rows("test").shape[1] == 257


def test_an_untrained_model_scores_about_log2_vocab_bits_per_token(run, uniform_bpb):
    # 11 bits per token at ~3.7 bytes per token: about 3 bits per byte.
    assert 2.9 < uniform_bpb < 3.1
    bpb = run.evaluate_bpb(TinyLM(), batch_size=64)
    assert 2 < bpb < 6
    assert bpb == pytest.approx(uniform_bpb, rel=0.05)


def test_a_model_that_knows_the_unigram_distribution_beats_one_that_knows_nothing(run, uniform_bpb):
    bpb = run.evaluate_bpb(Unigram(run.data.tokens("train"), run.vocab_size), batch_size=128)
    assert bpb < 0.9 * uniform_bpb


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # torch's own, on importing the compiler
def test_save_checkpoint_writes_the_config_and_the_weights_without_the_compile_prefix(run):
    model = TinyLM(vocab=64, width=8)
    compiled = torch.compile(model)  # wraps without compiling until called
    assert all(k.startswith("_orig_mod.") for k in compiled.state_dict())
    config = {"depth": 1, "width": 8, "vocab_size": 64}
    path = run.save_checkpoint(compiled, config)
    assert path == run.output_dir / CHECKPOINT_FILE
    saved = torch.load(path, weights_only=True)  # plain tensors and data: no pickled code
    assert saved["config"] == config and saved["profile"] == "cpu"
    assert list(saved["state_dict"]) == list(model.state_dict()) == ["embed.weight", "head.weight", "head.bias"]
    for name, tensor in model.state_dict().items():
        assert torch.equal(saved["state_dict"][name], tensor)
    reloaded = TinyLM(vocab=64, width=8)
    reloaded.load_state_dict(saved["state_dict"])
    assert sorted(p.name for p in run.output_dir.iterdir()) == [CHECKPOINT_FILE]  # no temporary left


def test_write_result_writes_the_summary_as_json(run):
    path = run.write_result(SUMMARY)
    assert path == run.output_dir / RESULT_FILE
    assert json.loads(path.read_text()) == {**SUMMARY, "profile": "cpu", "device": "cpu"}


def test_a_run_needs_no_rustbpe(run_env):
    """train.py runs where rustbpe is not installed: starting, loading and packing need tiktoken only."""
    script = textwrap.dedent("""
        import json, sys
        sys.modules["rustbpe"] = None
        from autoresearch.harness import start_run
        run = start_run()
        inputs, targets, epoch = next(run.train_loader(batch_size=2))
        rows = run.eval_rows()
        print(json.dumps({"shape": list(inputs.shape), "rows": rows.sum().item(),
                          "bytes": int(run.token_bytes()[rows[:, 1:]].sum())}))
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    here = start_run()
    rows = here.eval_rows()
    assert json.loads(done.stdout) == {"shape": [2, 256], "rows": rows.sum().item(),
                                       "bytes": int(here.token_bytes()[rows[:, 1:]].sum())}
