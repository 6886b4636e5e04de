"""The train.py template: the research surface every proposer edits.

Specifications: its constants are plain one-line literals; importing it trains nothing;
build_model gives the reference's model (parameters, windows, value embeddings, soft-capped fp32
logits) and it is causal; every attention path computes the same function; its MFU is against the
harness's peak-FLOPs table; a real short CPU run by hand prints progress lines and the summary block,
trains up to the budget and no further, and hands in a checkpoint that build_model rebuilds and the
harness's scorer scores as the summary says; and a broken edit (a batch size that does not divide,
divergence, out of memory, a syntax error), run as the lab runs it, ends with the exit code that
names the failure and a last line a proposer can act on.
"""
import ast
import dataclasses
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import autoresearch
from autoresearch import harness
from autoresearch.harness import run as harness_run
from autoresearch.harness import wire
from lab_helpers import TEMPLATE, load_script

SRC = Path(autoresearch.__file__).parent.parent
CONSTANTS = ("DEPTH ASPECT_RATIO HEAD_DIM N_KV_HEAD WINDOW_PATTERN TOTAL_BATCH_SIZE DEVICE_BATCH_SIZE EMBEDDING_LR "
             "UNEMBEDDING_LR MATRIX_LR SCALAR_LR WEIGHT_DECAY ADAM_BETAS WARMUP_RATIO WARMDOWN_RATIO FINAL_LR_FRAC SEED").split()
SUMMARY_KEYS = "val_bpb training_seconds total_seconds peak_vram_mb mfu_percent total_tokens_M num_steps num_params_M depth".split()
# A model small enough that a whole run, evaluation included, takes seconds on two cores.
TINY = dict(DEPTH=2, ASPECT_RATIO=32, HEAD_DIM=32, WINDOW_PATTERN="SL", TOTAL_BATCH_SIZE=2048, DEVICE_BATCH_SIZE=8)


def render_profile(profile_name: str, extra: dict | None = None) -> str:
    """train.py as a workspace for `profile_name` gets it, with `extra` constants written over it too."""
    profile = harness.get_profile(profile_name)
    text = harness.render_trainer(profile)
    return harness.render_trainer(dataclasses.replace(profile, trainer=extra), source=text) if extra else text


@pytest.fixture(scope="module")
def train():
    return load_script()


def small_config(**kw):
    cfg = dict(vocab_size=256, seq_len=32, n_layer=4, n_embd=64, n_head=4, n_kv_head=4, head_dim=16, window_pattern="SSSL")
    cfg.update(kw)
    return cfg


# ---- the script as text ------------------------------------------------------------------------

def test_hyperparameters_are_single_line_literals():
    tree = ast.parse(TEMPLATE.read_text())
    assigned = {}
    for node in tree.body:
        if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
            assigned.setdefault(node.targets[0].id, []).append(node)
    for name in CONSTANTS:
        assert len(assigned.get(name, [])) == 1, f"{name} must be assigned once at the top level"
        node = assigned[name][0]
        assert node.lineno == node.end_lineno, f"{name} must fit on one line"
        ast.literal_eval(node.value)  # a plain literal, which a search can parse and rewrite


def test_profile_overrides_render_to_a_valid_script():
    for name, profile in harness.PROFILES.items():
        text = render_profile(name)
        ast.parse(text)
        module_consts = {n.targets[0].id: ast.literal_eval(n.value) for n in ast.parse(text).body
                         if isinstance(n, ast.Assign) and getattr(n.targets[0], "id", None) in CONSTANTS}
        for key, value in profile.trainer.items():
            assert module_consts[key] == value, (name, key)


def test_cpu_profile_fits_its_batch():
    consts = harness.get_profile("cpu").trainer
    seq = harness.get_profile("cpu").seq_len
    assert consts["TOTAL_BATCH_SIZE"] % (consts["DEVICE_BATCH_SIZE"] * seq) == 0


def test_import_does_not_train(monkeypatch):
    def refuse():
        raise AssertionError("importing train.py must not start a run")

    monkeypatch.setattr(harness, "start_run", refuse)
    module = load_script(name="train_import_only")
    assert callable(module.build_model) and callable(module.main)


# ---- the model ---------------------------------------------------------------------------------

def test_reference_model_at_depth_8(train):
    cfg = train.model_config(vocab_size=8192, seq_len=2048)
    assert (cfg["n_embd"], cfg["n_head"], cfg["n_kv_head"], cfg["head_dim"]) == (512, 4, 4, 128)
    with torch.device("meta"):
        model = train.build_model(cfg)
    n_params = sum(p.numel() for p in model.parameters())
    # wte 4.19M + head 4.19M + 4 value embeddings 16.78M + 8 blocks of 3.15M + gates and scalars
    assert n_params == 50_332_176
    assert round(n_params / 1e6, 1) == 50.3
    assert sorted(int(k) for k in model.value_embeds) == [1, 3, 5, 7]  # alternating, the last included
    assert model.windows == [1024, 1024, 1024, 2048, 1024, 1024, 1024, 2048]
    assert train.flops_per_token(model) == pytest.approx(2.39e8, rel=0.01)  # the reference's ~2.4e8
    assert train.flops_per_token(model, exact=True) < train.flops_per_token(model)


def test_window_pattern_last_layer_is_always_long(train):
    model = train.build_model(small_config(n_layer=3, window_pattern="S"))
    assert model.windows == [16, 16, 32]
    with pytest.raises(ValueError):
        train.build_model(small_config(window_pattern="SX"))


def test_initial_state(train):
    torch.manual_seed(0)
    model = train.build_model(small_config())
    assert torch.all(model.resid_lambdas == 1.0) and torch.allclose(model.x0_lambdas, torch.full((4,), 0.1))
    for i, block in enumerate(model.blocks):
        assert torch.all(block.attn.c_proj.weight == 0) and torch.all(block.mlp.c_proj.weight == 0)
        gate = block.attn.ve_gate
        assert (gate is not None) == (str(i) in model.value_embeds)
        if gate is not None:
            # Zero-initialised gate weights: the gate 2 sigmoid(W x) is exactly 1 for every input, so
            # at the start the value embedding enters V unscaled, and the gate learns from there.
            assert torch.all(gate.weight == 0)
            x = torch.randn(2, 5, 64)
            assert torch.all(2 * torch.sigmoid(gate(x[..., : train.VE_GATE_CHANNELS])) == 1.0)
    # With every block the identity at start, the logits are the head of the normed embedding (mixed
    # back in by the lambdas), soft-capped.
    idx = torch.randint(0, 256, (2, 32))
    x = torch.nn.functional.rms_norm(model.wte(idx), (64,))
    for i in range(4):
        x = model.resid_lambdas[i] * x + model.x0_lambdas[i] * torch.nn.functional.rms_norm(model.wte(idx), (64,))
    expected = model.lm_head(torch.nn.functional.rms_norm(x, (64,)))
    expected = 15 * torch.tanh(expected / 15)
    assert torch.allclose(model(idx), expected, atol=1e-5)


def test_logits_are_soft_capped_fp32(train):
    model = train.build_model(small_config())
    with torch.no_grad():
        model.lm_head.weight.normal_(std=10.0)
    logits = model(torch.randint(0, 256, (2, 32)))
    assert logits.dtype == torch.float32 and logits.shape == (2, 32, 256)
    assert logits.abs().max() <= 15.0 and logits.abs().max() > 14.0


def test_rope_rotates_each_pair_by_its_angle(train):
    model = train.build_model(small_config())  # head_dim 16: pairs (i, i + 8)
    x = torch.randn(2, 32, 4, 16)
    out = train.rotate(x, model.cos, model.sin)
    t, i = 5, 3
    angle = torch.tensor(t * train.ROPE_BASE ** (-i / 8))
    x1, x2 = x[:, t, :, i], x[:, t, :, i + 8]
    assert torch.allclose(out[:, t, :, i], x1 * angle.cos() - x2 * angle.sin(), atol=1e-5)
    assert torch.allclose(out[:, t, :, i + 8], x1 * angle.sin() + x2 * angle.cos(), atol=1e-5)
    assert torch.allclose(out[:, 0], x[:, 0])  # position 0 is not rotated
    assert torch.allclose(out.norm(dim=-1), x.norm(dim=-1), atol=1e-5)


@pytest.mark.parametrize("n_kv_head", [4, 2])
def test_causal(train, n_kv_head):
    torch.manual_seed(1)
    model = train.build_model(small_config(n_kv_head=n_kv_head))
    for p in model.parameters():  # the zero-initialised projections would hide attention entirely
        torch.nn.init.normal_(p, std=0.3)
    idx = torch.randint(0, 256, (2, 32))
    changed = idx.clone()
    changed[:, 20:] = torch.randint(0, 256, (2, 12))
    with torch.no_grad():
        a, b = model(idx), model(changed)
    assert torch.allclose(a[:, :20], b[:, :20], atol=1e-5)
    assert not torch.allclose(a[:, 20:], b[:, 20:], atol=1e-3)


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
@pytest.mark.parametrize("window", [32, 16, 5])
@pytest.mark.parametrize("kv_heads", [4, 2])
def test_attention_paths_agree(train, window, kv_heads):
    from torch.nn.attention.flex_attention import flex_attention

    torch.manual_seed(2)
    B, H, T, D = 2, 4, 32, 16
    q = torch.randn(B, H, T, D)
    k, v = torch.randn(B, kv_heads, T, D), torch.randn(B, kv_heads, T, D)
    plain = train.attention(q, k, v, window, path="plain")
    sdpa = train.attention(q, k, v, window, path="sdpa")
    assert torch.allclose(sdpa, plain, atol=1e-5)
    # FlexAttention with the block mask the model builds (eager here; compiled on CUDA).
    model = train.build_model(small_config(seq_len=T, n_layer=2, window_pattern="S"))
    model.windows = [window, T]
    model.use_flex_attention("cpu")
    if window < T:
        flex = flex_attention(q, k, v, block_mask=model.block_masks[window], enable_gqa=kv_heads != H)
        assert torch.allclose(flex, plain, atol=1e-5)
    # The query sees itself and the `window` keys before it, as FlashAttention's window_size=(window, 0).
    mask = train.window_mask(T, window, "cpu")
    assert mask.sum(dim=1).tolist() == [min(i + 1, window + 1) for i in range(T)]


def test_window_changes_the_function(train):
    torch.manual_seed(3)
    q, k, v = torch.randn(1, 2, 32, 8), torch.randn(1, 2, 32, 8), torch.randn(1, 2, 32, 8)
    full, short = train.attention(q, k, v, 32), train.attention(q, k, v, 8)
    assert torch.allclose(full[:, :, :9], short[:, :, :9], atol=1e-6)  # identical while i <= window
    assert not torch.allclose(full[:, :, 9], short[:, :, 9], atol=1e-3)  # query 9 no longer sees key 0


def test_schedules(train):
    assert train.lr_multiplier(0.0) == 1.0 and train.lr_multiplier(0.49) == 1.0
    assert train.lr_multiplier(0.75) == pytest.approx(0.5)
    assert train.lr_multiplier(1.0) == pytest.approx(train.FINAL_LR_FRAC)
    assert train.muon_momentum(0) == pytest.approx(0.85)
    assert train.muon_momentum(150) == pytest.approx(0.90)
    assert train.muon_momentum(300) == train.muon_momentum(5000) == pytest.approx(0.95)


def test_mfu_is_measured_against_the_harness_peak_flops_table(train):
    """The progress line's MFU divides by the harness's dense bf16 peak for the device's name
    (harness.peak_flops, first match wins): the table is bookkeeping a proposer does not edit, so it
    lives in the harness, not in train.py. Unknown devices, a CPU among them, have no peak: 0."""
    from autoresearch.harness import hardware

    expect = {
        "NVIDIA H100 80GB HBM3": 989.5e12, "NVIDIA H100 PCIe": 756e12, "NVIDIA H200": 989.5e12,
        "NVIDIA A100-SXM4-80GB": 312e12, "NVIDIA L40S": 362e12, "NVIDIA GeForce RTX 4090": 165.2e12,
        "NVIDIA GeForce RTX 3090": 71e12, "Some Other GPU": 0.0,
    }
    for name, flops in expect.items():
        assert harness.peak_flops(name) == flops, name
    assert harness.peak_flops(hardware.device_name(torch.device("cpu"))) == 0.0
    assert not hasattr(train, "peak_flops") and not hasattr(train, "PEAK_FLOPS")


# ---- real runs of train.py on the CPU ----------------------------------------------------------

@pytest.fixture(scope="module")
def cpu_data(cpu_prepared):
    """The cpu profile's prepared data (the embedded default corpus), from conftest's session fixture."""
    return cpu_prepared


def run_script(workdir: Path, text: str, data, budget: float = 2.0, as_the_lab_does: bool = False,
               timeout: float = 120) -> subprocess.CompletedProcess:
    """Write `text` to workdir/train.py and run it on the CPU with the cpu profile's data: by hand
    (`python train.py`: the harness serves the run in-process, writes ./run_output/checkpoint.pt, scores
    it and prints the summary), or as the lab runs it (`python -m autoresearch.harness.run train.py`:
    a failure is told by the exit code and a `FAIL: ...` line)."""
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "train.py").write_text(text)
    env = {k: v for k, v in os.environ.items() if k not in (wire.SOCKET_ENV, wire.KEY_ENV)}  # no lab around it
    env.update({"AUTORESEARCH_PROFILE": "cpu", "AUTORESEARCH_DATA": str(data.path), "AUTORESEARCH_DEVICE": "cpu",
                "AUTORESEARCH_TIME_BUDGET": str(budget),
                "OMP_NUM_THREADS": "1",  # steadier than two spinning threads on a busy two-core CI machine
                "PYTHONPATH": os.pathsep.join(filter(None, [str(SRC), os.environ.get("PYTHONPATH")]))})
    command = ["-m", "autoresearch.harness.run", "train.py"] if as_the_lab_does else ["train.py"]
    return subprocess.run([sys.executable, *command], cwd=workdir, env=env, capture_output=True, text=True,
                          timeout=timeout)


def edited(text: str, old: str, new: str) -> str:
    assert old in text, old
    return text.replace(old, new, 1)


def last_line(stream: str) -> str:
    """What the lab reports of a failed run: the last line train.py's process wrote."""
    return stream.strip().splitlines()[-1]


def test_short_cpu_run_end_to_end(tmp_path, cpu_data):
    proc = run_script(tmp_path, render_profile("cpu", TINY), cpu_data)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = proc.stdout
    assert "\r" not in out
    progress = [l for l in out.splitlines() if l.startswith("train ")]
    line_re = (r"train step=\d+ progress_pct=[\d.]+ loss=[\d.]+ lrm=[\d.]+ dt_ms=\d+ tok_per_s=\d+ mfu_pct=[\d.]+ "
               r"epoch=\d+ remaining_s=\d+")
    assert progress and all(re.fullmatch(line_re, l) for l in progress), progress
    # The summary block: `---`, then the nine keys in order, `key:` padded to 18 columns.
    lines = out.splitlines()
    block = lines[lines.index("---") + 1 :]
    assert [l.split(":")[0] for l in block] == SUMMARY_KEYS
    assert all(l[:18] == (l.split(":")[0] + ":").ljust(18) and re.fullmatch(r"\S+", l[18:]) for l in block), block
    assert re.fullmatch(r"val_bpb: {10}\d+\.\d{6}", block[0])
    values = {l.split(":")[0]: l.split(":")[1].strip() for l in block}
    # A CPU has no peak-FLOPs figure, so no MFU.
    assert values["mfu_percent"] == "n/a" and int(values["depth"]) == 2 and int(values["num_steps"]) > 2
    # It trains up to the budget and stops before a step would overrun it, by its own estimate of the next
    # step: on a busy machine a step may run longer than that, never by more than the longest step.
    longest = max(int(re.search(r"dt_ms=(\d+)", l).group(1)) for l in progress) / 1000
    assert 1.0 <= float(values["training_seconds"]) <= 2.0 + longest and 0 < float(values["val_bpb"]) < 5

    # The checkpoint handed in is the weights and the config that build_model rebuilds, in a fresh import.
    from autoresearch.harness.loader import eval_rows
    from autoresearch.harness.model_server import LocalModel, load_model
    from autoresearch.harness.scoring import TOLERANCE, Scorer, eval_batch_size

    profile = harness.get_profile("cpu")
    checkpoint = tmp_path / "run_output" / "checkpoint.pt"
    ckpt = torch.load(checkpoint, map_location="cpu", weights_only=True)
    rebuilt = load_script(tmp_path / "train.py", name="train_rebuilt")
    assert ckpt["profile"] == "cpu" and ckpt["config"] == rebuilt.model_config(profile.vocab_size, profile.seq_len)
    model = rebuilt.build_model(ckpt["config"])
    model.load_state_dict(ckpt["state_dict"])  # strict: every weight, and nothing else
    assert float(values["num_params_M"]) == round(sum(p.numel() for p in model.parameters()) / 1e6, 1)

    # Scored again by the harness's scorer, as the lab scores it (rebuilt through load_model, probed
    # for reading ahead), it gets the val_bpb the summary printed.
    rows = np.asarray(eval_rows(cpu_data.tokens("val"), cpu_data.doc_starts("val"), profile.seq_len,
                                cpu_data.tokenizer.bos_id, profile.eval_rows))
    device = torch.device("cpu")
    scorer = Scorer(rows, cpu_data.tokenizer.token_bytes(), eval_batch_size("cpu", profile.seq_len, profile.vocab_size),
                    TOLERANCE["cpu"])
    score = scorer.score(LocalModel(load_model(tmp_path / "train.py", checkpoint, device), device, profile.vocab_size))
    assert score.probes > 0 and score.worst_difference <= score.tolerance  # causal: no probe saw it read ahead
    assert score.bpb == pytest.approx(float(values["val_bpb"]), abs=1e-6)


def test_batch_sizes_must_divide(tmp_path, cpu_data):
    """A TOTAL_BATCH_SIZE that is no whole number of device batches is refused before anything trains,
    and the lab's report of the failure (the last line) says what it must be a multiple of."""
    proc = run_script(tmp_path, render_profile("cpu", {**TINY, "TOTAL_BATCH_SIZE": 3000}), cpu_data,
                      as_the_lab_does=True)
    assert proc.returncode == harness_run.EXIT_ERROR, proc.stderr
    assert last_line(proc.stderr) == ("ValueError: TOTAL_BATCH_SIZE=3000 must be a multiple of DEVICE_BATCH_SIZE * "
                                      "seq_len = 8 * 256 = 2048")
    assert not [l for l in proc.stdout.splitlines() if l.startswith("train ")]


def test_divergence_fails_fast(tmp_path, cpu_data):
    """Learning rates that blow the loss up end the run at the first bad step, long before its budget,
    with the diverged exit code and no checkpoint handed in."""
    lrs = dict(EMBEDDING_LR=1e9, UNEMBEDDING_LR=1e9, MATRIX_LR=1e9, SCALAR_LR=1e9)
    proc = run_script(tmp_path, render_profile("cpu", {**TINY, **lrs}), cpu_data, budget=30, as_the_lab_does=True)
    assert proc.returncode == harness_run.EXIT_DIVERGED, proc.stderr
    fail = last_line(proc.stderr)
    assert re.fullmatch(r"FAIL: training loss is \S+ at step \d+: the run diverged\. Lower the learning rates "
                        r"\(MATRIX_LR, EMBEDDING_LR, UNEMBEDDING_LR, SCALAR_LR\), or undo the last change\.", fail), fail
    assert int(re.search(r"at step (\d+)", fail).group(1)) < 5
    assert not (tmp_path / "run_output" / "checkpoint.pt").exists()


def test_syntax_error_exits_nonzero(tmp_path, cpu_data):
    text = render_profile("cpu", TINY).replace("def norm(x):", "def norm(x)", 1)
    proc = run_script(tmp_path, text, cpu_data, as_the_lab_does=True)
    assert proc.returncode == harness_run.EXIT_ERROR and last_line(proc.stderr).startswith("SyntaxError")


def test_out_of_memory_message(tmp_path, cpu_data):
    """Running out of device memory in a training step (simulated here: a CPU run has no CUDA memory
    to exhaust) ends with the out-of-memory exit code, a FAIL line that says what to lower, and no
    checkpoint."""
    text = edited(render_profile("cpu", TINY), "                    loss = train_loss(inputs, targets)\n",
                  "                    raise torch.OutOfMemoryError('CUDA out of memory. Tried to allocate 8.00 GiB')\n")
    proc = run_script(tmp_path, text, cpu_data, as_the_lab_does=True)
    assert proc.returncode == harness_run.EXIT_OOM, proc.stderr
    assert "torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 8.00 GiB" in proc.stderr
    fail = last_line(proc.stderr)
    assert fail.startswith("FAIL: out of memory") and "Lower the device batch size" in fail, fail
    assert not (tmp_path / "run_output" / "checkpoint.pt").exists()
