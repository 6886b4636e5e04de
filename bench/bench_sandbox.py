"""The same work natively and inside the lab's sandbox, in turn: what the sandbox costs it.

    PYTHONPATH=src python bench/bench_sandbox.py --workload step [--rounds 2] [--modes native,sandboxed]
    python bench/bench_sandbox.py --workload compile --rounds 2          # on a CPU

Workloads, each in a process of its own with a cold Inductor cache:
  step     bench/bench_train_gpu.py's `ref` variant: the train.py template's training step at the reference
           configuration on random tokens (a GPU); the figure is its median step time
  compile  torch.compile of a small MLP, one forward and backward (compilation), then 200 steps (a CPU)
Modes: native (started as it is); sandboxed (started by lab.sandbox exactly as the lab starts a trainer:
GPUs bound, a fresh uid as root, no network, the clean environment); and, to find which wall costs
time, sandboxed with one wall down: same-uid (as root, the command runs as root inside, without the fresh
uid), no-process-limit, no-pid-namespace, no-new-session, no-net-namespace. The rounds alternate the
order of the modes, so that a drift of the machine falls on all.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from autoresearch.lab import sandbox

BENCH = Path(__file__).resolve().parent
TEMPLATE = Path(sandbox.__file__).resolve().parents[1] / "templates" / "train.py"  # in the installation, bound
WITHOUT = {"no-pid-namespace": ["--unshare-pid"], "no-new-session": ["--new-session"], "no-net-namespace": ["--unshare-net"]}
COMPILE_PROBE = """
import json, time, torch
t0 = time.time()
model = torch.compile(torch.nn.Sequential(*[torch.nn.Linear(256, 256) for _ in range(8)]))
x = torch.randn(64, 256)
model(x).sum().backward()
t1 = time.time()
for _ in range(3):
    model(x).sum().backward()
t2 = time.time()
for _ in range(200):
    model(x).sum().backward()
print("RESULT " + json.dumps({"compile_s": round(t1 - t0, 3), "steps_s": round(time.time() - t2, 3)}))
"""
FIGURE = {"step": "step_ms_median", "compile": "compile_s"}


def without(cmd: list[str], mode: str) -> list[str]:
    """The sandbox's command line with one wall taken down (bench only)."""
    if mode == "same-uid":  # python -m autoresearch.lab.dropuid UID -- out of the line
        start = cmd.index("autoresearch.lab.dropuid") - 2
        return cmd[:start] + cmd[start + 5:]
    return [a for a in cmd if a not in WITHOUT.get(mode, [])]


def run(workload: str, mode: str, steps: int, warmup: int) -> dict:
    with tempfile.TemporaryDirectory(prefix="sandbox-bench-") as tmp:
        work, scratch = Path(tmp) / "work", Path(tmp) / "tmp"
        work.mkdir()
        scratch.mkdir()
        spec = sandbox.Spec(cwd="/trial", writable={"/trial": work, "/tmp": scratch}, readable={"/bench": BENCH},
                            env={"TORCHINDUCTOR_CACHE_DIR": "/tmp/inductor", "BENCH_TEMPLATE": str(TEMPLATE)},
                            gpus=workload == "step", sandboxed=mode != "native",
                            limits=sandbox.Limits(max_processes=None) if mode == "no-process-limit" else sandbox.Limits())
        if workload == "step":
            argv = [sys.executable, spec.where("/bench/bench_train_gpu.py"), "--one", "ref", "--steps", str(steps),
                    "--warmup", str(warmup)]
        else:
            (work / "probe.py").write_text(COMPILE_PROBE)
            argv = [sys.executable, "probe.py"]
        cmd, env = sandbox.command(spec, argv)
        if mode == "same-uid":  # the folders were given to the fresh uid; root without capabilities needs them back
            for folder in (work, scratch):
                os.chown(folder, 0, 0)
        proc = subprocess.Popen(without(cmd, mode), env=env, cwd=None if spec.sandboxed else str(work),
                                start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        out, err = proc.communicate(timeout=900)
    lines = [line for line in out.decode().splitlines() if line.startswith("RESULT ")]
    if proc.returncode or not lines:
        raise SystemExit(f"{mode}: exit {proc.returncode}\n{out.decode()[-2000:]}\n{err.decode()[-4000:]}")
    return json.loads(lines[-1][len("RESULT "):])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workload", choices=sorted(FIGURE), default="step")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--steps", type=int, default=15, help="timed steps of the step workload")
    ap.add_argument("--warmup", type=int, default=5, help="untimed steps of the step workload first")
    ap.add_argument("--modes", default="native,sandboxed",
                    help="native, sandboxed, same-uid, no-process-limit, " + ", ".join(WITHOUT)
                    + "; taken in turn, reversed every round")
    args = ap.parse_args()
    sandbox.check()
    modes, figure = args.modes.split(","), FIGURE[args.workload]
    results: dict[str, list[dict]] = {m: [] for m in modes}
    for i in range(args.rounds):
        for mode in (modes if i % 2 == 0 else modes[::-1]):
            r = run(args.workload, mode, args.steps, args.warmup)
            results[mode].append(r)
            print(f"round {i + 1} {mode}: {json.dumps(r)}", flush=True)
    first = statistics.median(r[figure] for r in results[modes[0]])
    for mode in modes:
        value = statistics.median(r[figure] for r in results[mode])
        print(f"median {figure} {mode}: {value}, {value / first:.4f} x {modes[0]}")


if __name__ == "__main__":
    sys.exit(main())
