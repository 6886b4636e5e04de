"""The sandbox around proposer-written code: what a process inside can see, write, reach and leave behind.

Each test runs real Python in a real bubblewrap sandbox (lab.sandbox), as root on CI, the way the
lab runs the trainer and the model being scored. The attacks through a whole trial are in
test_lab_guards.py; here is the sandbox alone, property by property.
"""
from __future__ import annotations

import json
import os
import pwd
import shutil
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import pytest

from autoresearch.lab import devices, sandbox
from lab_helpers import alive


@pytest.fixture
def box(tmp_path):
    """A sandbox spec with a trial folder and a private /tmp, and a runner that returns (exit code, output)."""
    work, tmp = tmp_path / "work", tmp_path / "tmp"
    work.mkdir()
    tmp.mkdir()

    def run(code: str, *, timeout: float = 60, **spec) -> tuple[int, str]:
        spec = sandbox.Spec(cwd="/trial", writable={"/trial": work, "/tmp": tmp}, **spec)
        proc = sandbox.start(spec, [sys.executable, "-c", textwrap.dedent(code)], stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT)
        out, _ = proc.communicate(timeout=timeout)
        return proc.returncode, out.decode()

    run.work, run.tmp = work, tmp
    return run


def test_a_sandbox_can_be_made_here():
    assert "bubblewrap" in sandbox.check()


def test_the_lab_the_data_and_the_home_folder_are_out_of_sight(box, tmp_path):
    secret = tmp_path / "secret-workspace"
    (secret / ".autoresearch").mkdir(parents=True)
    (secret / ".autoresearch" / "ledger.db").write_text("rows")
    home = Path.home()
    code, out = box(f"""
        import json, os
        paths = [{str(secret)!r}, "/etc/shadow", "/root/.ssh", "/home", "/var", "/run", "/srv", "/mnt"]
        print(json.dumps({{p: os.path.exists(p) for p in paths}}))
        print(json.dumps(sorted(os.listdir({str(home)!r})) if os.path.isdir({str(home)!r}) else []))
        print(json.dumps(sorted(os.listdir("/"))))
    """, hidden=(secret, home))
    assert code == 0, out
    seen, in_home, root = (json.loads(line) for line in out.splitlines())
    assert not any(seen.values()), seen
    # Of the home folder, only the way to a Python installation bound from inside it shows.
    bound_in_home = {p.relative_to(home).parts[0] for p in sandbox.runtime_paths() if home in p.parents}
    assert set(in_home) <= bound_in_home
    assert set(root) <= {"usr", "bin", "sbin", "lib", "lib32", "lib64", "libx32", "etc", "proc", "dev", "tmp", "trial",
                         "sys"} | {p.parts[1] for p in sandbox.runtime_paths()}


def test_the_system_and_the_installation_are_read_only(box):
    import autoresearch

    package = Path(autoresearch.__file__).parent
    code, out = box(f"""
        for path in ["/usr/x", {str(package / 'x.py')!r}, {str(Path(sys.prefix) / 'x')!r}, "/etc/x"]:
            try:
                open(path, "w").write("x")
                print("WROTE", path)
            except OSError as e:
                print("refused", path, type(e).__name__)
        import autoresearch.harness.scoring  # the package imports from inside
        print("imported")
    """.replace("sys.prefix", repr(sys.prefix)))
    assert code == 0, out
    assert "WROTE" not in out and "imported" in out


def test_it_writes_only_its_own_folder_and_a_private_tmp(box):
    code, out = box("""
        open("/trial/out.txt", "w").write("mine")
        open("/tmp/scratch", "w").write("mine")
        open("/dev/shm/scratch", "w").write("mine")
        print("ok")
    """)
    assert code == 0, out
    assert (box.work / "out.txt").read_text() == "mine"
    assert (box.tmp / "scratch").read_text() == "mine"


def test_packages_installed_under_tmp_are_importable_read_only_beside_the_private_tmp(box, monkeypatch):
    # The GPU machine installs its wheels into /tmp/site, and a checkout under /tmp has its virtualenv
    # there: the private /tmp must not hide them, nor the folders on the way to them.
    outer = Path(tempfile.mkdtemp(prefix="autoresearch-checkout-", dir="/tmp"))
    outer.chmod(0o755)
    site = outer / "venv" / "site"
    site.mkdir(parents=True)
    try:
        (site / "probe_package_in_tmp.py").write_text("ANSWER = 42\n")
        monkeypatch.syspath_prepend(str(site))
        monkeypatch.setenv("PYTHONPATH", str(site))
        code, out = box(f"""
            import probe_package_in_tmp
            print("imported", probe_package_in_tmp.ANSWER)
            try:
                open({str(site / 'x.py')!r}, "w").write("x")
                print("WROTE")
            except OSError:
                print("refused")
            open("/tmp/scratch", "w").write("mine")
        """)
        assert code == 0, out
        assert "imported 42" in out and "refused" in out and "WROTE" not in out
        assert (box.tmp / "scratch").read_text() == "mine" and not (site / "scratch").exists()
    finally:
        shutil.rmtree(outer)


def test_host_settings_of_the_kernel_are_not_writable_even_for_a_root_lab(box):
    code, out = box("""
        try:
            open("/proc/sys/vm/swappiness", "w").write(open("/proc/sys/vm/swappiness").read())
            print("WROTE")
        except OSError as e:
            print("refused", type(e).__name__)
        import os
        print("uid", os.getuid())
    """)
    assert code == 0, out
    assert "WROTE" not in out
    if os.geteuid() == 0:  # a fresh unprivileged uid, not root
        assert "uid 0" not in out


def test_there_is_no_network(box):
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    port = server.getsockname()[1]
    try:
        code, out = box(f"""
            import socket
            for host in ["127.0.0.1", "1.1.1.1"]:
                s = socket.socket()
                s.settimeout(2)
                print(host, s.connect_ex((host, {port} if host == "127.0.0.1" else 80)))
        """)
    finally:
        server.close()
    assert code == 0, out
    for line in out.splitlines():
        assert not line.endswith(" 0"), out  # 0 would be a connection


def test_the_environment_is_clean_and_holds_no_secrets(box, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-secret")
    monkeypatch.setenv("HOME", "/root")
    monkeypatch.setenv("NCCL_NVLS_ENABLE", "0")  # how libraries run passes; who the user is does not
    code, out = box("""
        import os, json
        print(json.dumps(dict(os.environ)))
        found = []
        for pid in os.listdir("/proc"):
            if pid.isdigit():
                try:
                    if b"sk-secret" in open(f"/proc/{pid}/environ", "rb").read():
                        found.append(pid)
                except OSError:
                    pass
        print("found", found)
    """, env={"AUTORESEARCH_SOCKET": "/lab/lab.sock"})
    assert code == 0, out
    env = json.loads(out.splitlines()[0])
    assert "OPENAI_API_KEY" not in env and env["HOME"] == "/tmp"
    assert env["NCCL_NVLS_ENABLE"] == "0" and env["AUTORESEARCH_SOCKET"] == "/lab/lab.sock"
    assert out.splitlines()[1] == "found []"


def test_it_sees_no_process_of_the_host(box):
    code, out = box("""
        import os
        print(sorted(int(p) for p in os.listdir("/proc") if p.isdigit()))
    """)
    assert code == 0, out
    assert max(json.loads(out)) < 10  # its own few, numbered from 1 in its namespace
    assert os.getpid() not in json.loads(out) or os.getpid() < 10


DAEMON = """
import os, time
if os.fork():
    os._exit(0)
os.setsid()
if os.fork():
    os._exit(0)
while True:
    open("/trial/heartbeat", "a").write("x")
    time.sleep(0.05)
"""


def test_every_process_it_starts_dies_with_it_however_it_detaches(box):
    # A double-forked, setsid'd daemon with a clean environment, writing a heartbeat: the classic escape.
    code, out = box(f"""
        import subprocess, sys, time
        subprocess.Popen([sys.executable, "-c", {DAEMON!r}], env={{}}, start_new_session=True,
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(0.5)
        print("started")
    """)
    assert code == 0, out
    heartbeat = box.work / "heartbeat"
    assert heartbeat.exists()
    size = heartbeat.stat().st_size
    time.sleep(0.5)
    assert heartbeat.stat().st_size == size, "a process of the sandbox outlived it"


def test_a_killed_sandbox_takes_its_processes_with_it(box, tmp_path):
    spec = sandbox.Spec(cwd="/trial", writable={"/trial": box.work, "/tmp": box.tmp})
    proc = sandbox.start(spec, [sys.executable, "-c", "import subprocess, time; subprocess.Popen(['sleep', '300']); "
                                "open('/trial/ready', 'w').close(); time.sleep(300)"])
    deadline = time.monotonic() + 30
    while not (box.work / "ready").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    sleepers = _pids_of("sleep 300")
    assert sleepers, "the child did not start"
    os.killpg(proc.pid, 9)
    proc.wait()
    time.sleep(0.3)
    assert not any(alive(pid) for pid in sleepers)


def _pids_of(cmdline: str) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if (entry / "cmdline").read_bytes().replace(b"\0", b" ").strip() == cmdline.encode():
                    found.append(int(entry.name))
            except OSError:
                pass
    return found


@pytest.mark.skipif(not sandbox.gpu_devices(), reason="needs an NVIDIA GPU")
def test_the_gpus_it_was_given_are_reachable(box):
    code, out = box("""
        import torch
        x = torch.ones(1024, 1024, device="cuda")
        print(torch.cuda.get_device_name(), float((x @ x)[0, 0]))
    """, gpus=True, timeout=300)
    assert code == 0 and out.strip().endswith(" 1024.0"), out
    code, out = box("import torch; print(torch.cuda.is_available())")  # a sandbox given no GPU sees none
    assert (code, out.strip().splitlines()[-1]) == (0, "False"), out


@pytest.mark.skipif(not devices.gpus() or devices.gpus()[0].uuid is None, reason="needs an NVIDIA GPU")
def test_a_trial_slot_sees_only_its_own_gpu(box):
    """A slot's sandbox binds only its GPU's device node and names the GPU by UUID: the others'
    nodes are absent, so no setting of CUDA_VISIBLE_DEVICES inside could reach them."""
    gpu = devices.gpus()[-1]
    code, out = box("""
        import glob, torch
        print(sorted(glob.glob("/dev/nvidia[0-9]*")), torch.cuda.device_count(), torch.cuda.get_device_name(0))
    """, gpus=True, gpu_minors=(gpu.minor,), env={"CUDA_VISIBLE_DEVICES": gpu.uuid}, timeout=300)
    assert code == 0 and out.strip().splitlines()[-1] == f"['/dev/nvidia{gpu.minor}'] 1 {gpu.name}", out


def test_memory_is_limited(box):
    code, out = box("""
        try:
            block = bytearray(1 << 30)
            print("allocated")
        except MemoryError:
            print("refused")
    """, limits=sandbox.Limits(memory_bytes=512 << 20))
    assert "refused" in out, out


def test_processes_are_limited(box):
    code, out = box("""
        import subprocess
        started = 0
        children = []
        try:
            for _ in range(200):
                children.append(subprocess.Popen(["sleep", "30"]))
                started += 1
        except OSError as e:
            print("refused after", started, type(e).__name__)
        for c in children:
            c.kill()
    """, limits=sandbox.Limits(max_processes=40))
    assert "refused after" in out, out
    assert int(out.split("refused after")[1].split()[0]) < 40


def test_a_missing_bubblewrap_is_refused_with_the_fix(monkeypatch):
    monkeypatch.setenv("AUTORESEARCH_BWRAP", "/nonexistent/bwrap")
    sandbox.check.cache_clear()
    try:
        with pytest.raises(sandbox.SandboxUnavailable, match="--unsandboxed"):
            sandbox.check()
    finally:
        monkeypatch.delenv("AUTORESEARCH_BWRAP")
        sandbox.check.cache_clear()


def test_a_bubblewrap_that_cannot_make_namespaces_is_refused_with_the_cause_and_the_fix(tmp_path, monkeypatch):
    fake = tmp_path / "bwrap"
    fake.write_text("#!/bin/sh\necho 'bwrap: No permissions to create new namespace' >&2\nexit 1\n")
    fake.chmod(0o755)
    monkeypatch.setenv("AUTORESEARCH_BWRAP", str(fake))
    sandbox.check.cache_clear()
    try:
        with pytest.raises(sandbox.SandboxUnavailable, match="No permissions to create new namespace") as err:
            sandbox.check()
        assert "unprivileged_userns_clone" in str(err.value) and "--unsandboxed" in str(err.value)
    finally:
        monkeypatch.delenv("AUTORESEARCH_BWRAP")
        sandbox.check.cache_clear()


def test_unsandboxed_runs_the_same_command_with_the_same_clean_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-secret")
    work, tmp = tmp_path / "work", tmp_path / "tmp"
    work.mkdir()
    tmp.mkdir()
    spec = sandbox.Spec(cwd="/trial", writable={"/trial": work, "/tmp": tmp}, sandboxed=False,
                        env={"AUTORESEARCH_SOCKET": "/trial/lab.sock"})
    proc = sandbox.start(spec, [sys.executable, "-c", "import os, json; print(json.dumps([os.getcwd(), dict(os.environ)]))"],
                         stdout=subprocess.PIPE)
    cwd, env = json.loads(proc.communicate(timeout=60)[0])
    assert cwd == str(work) and env["TMPDIR"] == str(tmp)
    assert env["AUTORESEARCH_SOCKET"] == str(work / "lab.sock")  # paths are the host's
    assert "OPENAI_API_KEY" not in env


def _unprivileged_user() -> str | None:
    """A user that can run this Python, to try the sandbox as an ordinary user; None if there is none."""
    if os.geteuid() != 0 or not shutil.which("setpriv"):
        return None
    try:
        pwd.getpwnam("nobody")
    except KeyError:
        return None
    probe = subprocess.run(["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups", "--inh-caps=-all",
                            "--bounding-set=-all", sys.executable, "-c",
                            "import sys, autoresearch; print(sys.prefix, sys.base_prefix)"], capture_output=True, text=True)
    return "nobody" if probe.stdout.split() == [sys.prefix, sys.base_prefix] else None


@pytest.mark.skipif(_unprivileged_user() is None,
                    reason="no unprivileged user can run this Python here (it lives under a private home)")
def test_an_ordinary_user_gets_the_same_sandbox_where_user_namespaces_are_allowed():
    # Beside pytest's own folders, which are private to root, so that the ordinary user reaches it.
    outer = Path(tempfile.mkdtemp(prefix="autoresearch-nobody-"))
    os.chmod(outer, 0o755)
    work = outer / "work"
    work.mkdir()
    os.chmod(work, 0o777)
    script = textwrap.dedent(f"""
        import subprocess, sys
        from pathlib import Path
        from autoresearch.lab import devices, sandbox
        sandbox.check()
        spec = sandbox.Spec(cwd="/trial", writable={{"/trial": Path({str(work)!r}), "/tmp": Path({str(work)!r})}})
        proc = sandbox.start(spec, [sys.executable, "-c", "import os; print(os.path.exists('/root'), os.getpid())"],
                             stdout=subprocess.PIPE)
        print(proc.communicate(timeout=60)[0].decode())
    """)
    out = subprocess.run(["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups", "--inh-caps=-all", "--bounding-set=-all", sys.executable, "-c", script],
                         capture_output=True, text=True, timeout=120)
    shutil.rmtree(outer, ignore_errors=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split()[:1] == ["False"], out.stdout + out.stderr
