"""What the fake coding agents do, shared by the executables beside this file.

Each executable (`claude`, `codex`, `aider`, `custom-agent`) parses its own command line the way
the real tool does, then calls `act()`. Which behaviour an invocation shows comes from the
environment (the agent proposer passes the environment through):

    FAKE_AGENT_PLAN   comma-separated behaviours, one per invocation (the last one repeats);
                      default "good"
    FAKE_AGENT_STATE  a file counting invocations (needed with a plan of several)
    FAKE_AGENT_LOG    a file to which each invocation appends a JSON line: argv, cwd, behaviour,
                      whether FAKE_SECRET_API_KEY and AUTORESEARCH_AGENT reached it
    FAKE_AGENT_PIDS   a file to which a hanging or straggling agent writes the pids it leaves
    FAKE_AGENT_WATCH  a pid whose liveness each invocation logs as it starts

Behaviours: good (edit train.py, write the description file the prompt names), stdout (edit, say
`DESCRIPTION: ...` in the final answer), silent (edit, say nothing), nothing (edit nothing),
forbidden (edit program.md too), fail (exit 1), hang (sleep, with a child, past any limit),
commit (edit and git-commit it), straggler (edit, leave a background process running), escaper
(edit, leave a background process running in a session of its own, outside the agent's group).
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

LR = re.compile(r"^LR = ([0-9.e-]+)", re.MULTILINE)


def behaviour() -> str:
    plan = [p.strip() for p in os.environ.get("FAKE_AGENT_PLAN", "good").split(",") if p.strip()] or ["good"]
    state = os.environ.get("FAKE_AGENT_STATE")
    n = 0
    if state:
        path = Path(state)
        n = int(path.read_text()) if path.exists() else 0
        path.write_text(str(n + 1))
    return plan[min(n, len(plan) - 1)]


def log(kind: str, what: str) -> None:
    path = os.environ.get("FAKE_AGENT_LOG")
    if path:
        with open(path, "a") as f:
            f.write(json.dumps({"agent": kind, "argv": sys.argv[1:], "cwd": os.getcwd(), "behaviour": what,
                                "secret": os.environ.get("FAKE_SECRET_API_KEY"),
                                "agent_env": os.environ.get("AUTORESEARCH_AGENT"),
                                "watched_alive": running(os.environ.get("FAKE_AGENT_WATCH"))}) + "\n")


def running(pid: str | None) -> bool | None:
    """Whether the process runs (a zombie, killed and waiting for its parent, does not)."""
    if not pid:
        return None
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def edit_train(workspace: Path) -> str:
    """Raise LR tenfold, the way an agent would change a constant; returns the description."""
    train = workspace / "train.py"
    text = train.read_text()
    match = LR.search(text)
    if match is None:
        train.write_text(text + "\n# tried something\n")
        return "add a comment"
    old = match.group(1)
    new = repr(float(old) * 10)
    train.write_text(text[:match.start(1)] + new + text[match.end(1):])
    return f"raise LR from {old} to {new}"


def description_file(prompt: str) -> str | None:
    match = re.search(r"the file `([^`]+)`", prompt)
    return match.group(1) if match else None


def record_pid(pid: int) -> None:
    path = os.environ.get("FAKE_AGENT_PIDS")
    if path:
        with open(path, "a") as f:
            f.write(f"{pid}\n")


def act(kind: str, prompt: str, workspace: Path, can_edit: bool = True) -> tuple[int, str]:
    """Do this invocation's behaviour; returns (exit code, the agent's final answer)."""
    what = behaviour()
    log(kind, what)
    if what == "fail":
        print("fake agent: the API rejected the key", file=sys.stderr)
        return 1, ""
    if what == "hang":
        child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
        record_pid(child.pid)
        record_pid(os.getpid())
        print("thinking...", flush=True)
        time.sleep(600)
        return 0, ""
    if what == "nothing" or not can_edit:
        return 0, "I looked at train.py and have nothing to change."
    description = edit_train(workspace)
    answer = "I changed train.py."
    if what == "good":
        target = description_file(prompt)
        if target:
            (workspace / target).parent.mkdir(parents=True, exist_ok=True)
            (workspace / target).write_text(description + "\n")
    elif what == "stdout":
        answer += f"\nDESCRIPTION: {description}"
    elif what == "forbidden":
        with open(workspace / "program.md", "a") as f:
            f.write("\nAlso, the agent may edit this file.\n")
        answer += f"\nDESCRIPTION: {description} (and relax the rules)"
    elif what == "commit":
        subprocess.run(["git", "commit", "-qam", description], cwd=workspace, check=True)
        answer += f"\nDESCRIPTION: {description}"
    elif what in ("straggler", "escaper"):
        child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"],
                                 start_new_session=what == "escaper")
        record_pid(child.pid)
        answer += f"\nDESCRIPTION: {description}"
    elif what != "silent":
        raise SystemExit(f"fake agent: unknown behaviour {what!r}")
    return 0, answer
