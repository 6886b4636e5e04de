"""The `autoresearch` command, run as a user runs it: in a process of its own."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest


@pytest.fixture
def autoresearch(cache, tmp_path):
    """Runs `python -m autoresearch ARGS` with this test's cache; returns the CompletedProcess."""

    def run(*args, env=None):
        return subprocess.run([sys.executable, "-m", "autoresearch", *args], capture_output=True, text=True,
                              cwd=tmp_path, env={**os.environ, **(env or {})}, timeout=300)

    return run


def assert_one_paragraph_error(done, *parts):
    assert done.returncode == 2
    assert done.stdout == ""
    assert "Traceback" not in done.stderr
    message = done.stderr.strip()
    assert message.startswith("autoresearch: error: ")
    assert "\n" not in message
    for part in parts:
        assert part in message, f"{part!r} missing from: {message}"


def test_help_lists_the_commands(autoresearch):
    done = autoresearch("--help")
    assert done.returncode == 0
    assert "prepare" in done.stdout and "profiles" in done.stdout
    assert "val_bpb" in done.stdout


def test_prepare_help_describes_its_options(autoresearch):
    done = autoresearch("prepare", "--help")
    assert done.returncode == 0
    text = " ".join(done.stdout.split())
    for option in ("--profile {cpu,gpu24,h100}", "--source", "--num-shards", "--cache-dir", "--quiet"):
        assert option in text
    assert "`default` (embedded, offline)" in text
    assert "$AUTORESEARCH_CACHE" in text
    assert "Running it again does nothing" in text


def test_profiles_lists_every_profile_and_its_constants(autoresearch):
    done = autoresearch("profiles")
    assert done.returncode == 0
    names = [line.split()[0] for line in done.stdout.splitlines() if not line.startswith(" ")]
    assert names == ["h100", "gpu24", "cpu"]
    assert "seq_len 2048, budget 300s, eval cap 20,971,520 tokens, vocab 8192" in done.stdout


def test_version(autoresearch):
    from autoresearch import __version__

    done = autoresearch("--version")
    assert done.returncode == 0 and done.stdout.strip() == f"autoresearch {__version__}"


def test_prepare_the_embedded_default_for_cpu_then_again(autoresearch, cache):
    first = autoresearch("prepare", "--profile", "cpu", "--quiet")
    assert first.returncode == 0, first.stderr
    out = first.stdout
    assert out.startswith(f"prepared: {cache / 'prepared' / 'default-v2048'}\n")
    assert "profile   cpu: seq_len 256, budget 60s, vocab 2048, eval cap 131,072 tokens" in out
    assert "State of the Union" in out
    assert "tokenizer 2048 tokens, sha256 " in out
    lines = {line.split()[0]: line for line in out.splitlines()[1:]}
    assert "225 documents" in lines["train"]
    assert "12 documents" in lines["val"] and "(evaluated: 131,072 tokens)" in lines["val"]
    assert "12 documents" in lines["test"] and "sealed" in lines["test"]
    assert "took" in lines
    assert first.stderr == ""  # --quiet: no progress

    files = sorted((cache / "prepared" / "default-v2048").iterdir())
    mtimes = [p.stat().st_mtime_ns for p in files]
    second = autoresearch("prepare", "--profile", "cpu")
    assert second.returncode == 0, second.stderr
    assert second.stdout.startswith("already prepared (nothing to do): ")
    assert "took" not in second.stdout
    assert second.stdout.splitlines()[1:] == [line for line in out.splitlines()[1:] if not line.startswith("  took")]
    assert sorted((cache / "prepared" / "default-v2048").iterdir()) == files
    assert [p.stat().st_mtime_ns for p in files] == mtimes


def test_prepare_with_a_cache_dir_option(autoresearch, tmp_path, cache):
    # --cache-dir wins over AUTORESEARCH_CACHE; a missing source fails before anything is made there.
    done = autoresearch("prepare", "--source", str(tmp_path / "nowhere"), "--cache-dir", str(tmp_path / "elsewhere"))
    assert_one_paragraph_error(done, str(tmp_path / "nowhere"), "does not exist")
    assert not (tmp_path / "elsewhere").exists()


def test_a_bad_source_is_one_paragraph_on_stderr_and_exit_code_2(autoresearch, tmp_path):
    done = autoresearch("prepare", "--source", str(tmp_path / "no-such-corpus"))
    assert_one_paragraph_error(done, str(tmp_path / "no-such-corpus"), "does not exist", "`default`")


def test_an_unwritable_cache_is_one_paragraph_on_stderr(autoresearch, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    done = autoresearch("prepare", "--quiet", env={"AUTORESEARCH_CACHE": str(blocker / "cache")})
    assert_one_paragraph_error(done, str(blocker), "Cannot write", "AUTORESEARCH_CACHE")


def test_an_unknown_profile_is_a_usage_error(autoresearch):
    done = autoresearch("prepare", "--profile", "h200")
    assert done.returncode == 2
    assert "invalid choice: 'h200'" in done.stderr
    assert "Traceback" not in done.stderr


def test_a_command_is_required(autoresearch):
    done = autoresearch()
    assert done.returncode == 2
    assert "required: COMMAND" in done.stderr


def test_init_in_a_repository_says_that_the_person_s_other_files_are_safe(autoresearch, cpu_cache, tmp_path):
    from lab_helpers import make_repository

    repo = make_repository(tmp_path / "repo", {".gitignore": "data/\n"})
    (repo / "notes.txt").write_text("mine\n")
    (repo / "data").mkdir()
    (repo / "data" / "shard.bin").write_bytes(b"\0")
    done = autoresearch("init", str(repo), "--profile", "cpu", "--budget", "5",
                        env={"AUTORESEARCH_CACHE": str(cpu_cache)})
    assert done.returncode == 0, done.stderr
    assert "note: 2 untracked or ignored file(s) here (data/, notes.txt) are safe" in done.stdout
    assert "budget 5s" in done.stdout
    assert (repo / "notes.txt").read_text() == "mine\n" and (repo / "data" / "shard.bin").read_bytes() == b"\0"
