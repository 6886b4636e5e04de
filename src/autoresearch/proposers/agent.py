"""A coding-agent CLI as the proposer: Claude Code, Codex, aider, or any command.

Once per proposal the agent runs headless in the workspace, in a process group of its own, with
the whole environment passed through (it needs its API key, unlike the trainer). It is told the
protocol, the history and the task (prompt.py), edits train.py itself, and says what it did.

Files of proposal N (N is the ledger id of the row that will record it) live in
`.autoresearch/agent/N/` of the working tree the agent edits (the workspace, or with several trial
slots its slot's worktree, since an agent's own sandbox may let it write only there): `prompt.md`,
the agent's `stdout.txt` and `stderr.txt`, and the `description.txt` it is asked to write.
`.autoresearch/` is ignored by git, so none of this counts as an edit. With several slots, one
agent runs per slot at once, and each prompt lists what the others are trying (`ctx.in_flight`).

The description is, in order of preference: the first line of that file; the last
`DESCRIPTION: ...` line of the agent's final message (Codex writes it to a file), then of its
stdout (Claude Code's JSON result text, aider's reply); one derived from the change to train.py.

Whatever the agent leaves running is killed when it ends: its process group, and any process that
left the group but carries the workspace in AUTORESEARCH_AGENT (including one left by a lab that
died mid-proposal, killed before the next agent starts). An agent that exits non-zero or runs past
`timeout` makes propose() raise: the lab records a crashed proposal and goes on. One that edits
nothing, or edits other files, is left to the lab's audit ("no change", "rejected edit").
propose() never returns None: an agent that stops does not stop the loop. After `backoff_after`
failed proposals in a row the lab waits (`failure_backoff` seconds, doubling up to 10 minutes)
before the next, so a broken key overnight costs a row every few minutes rather than thousands.

If the agent commits (aider does unless told not to), the commit is undone with `git reset
--soft`, so the change is in the working tree for the lab to audit and commit itself.
"""
from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

from autoresearch.lab.ledger import Trial
from autoresearch.lab.processes import group_alive, kill_tagged
from autoresearch.lab.proposer import ProposalContext, Proposer, check_settings
from autoresearch.lab.workspace import git

from .edits import DESCRIPTION_LINE, describe_change
from .prompt import RECENT, agent_prompt, next_trial_id, one_line

AGENT_DIR = ".autoresearch/agent"
AGENT_ENV = "AUTORESEARCH_AGENT"  # the workspace, in the agent's environment: it runs under the loop

# Claude Code: `-p` is headless. `--dangerously-skip-permissions` (bypassPermissions) refuses to run
# as root, so edits are allowed by the acceptEdits mode instead, and the tools are limited to
# reading and editing files: the agent has no shell, so it cannot run trials, train or use git.
# Codex: `exec` is headless; the workspace-write sandbox lets it edit the workspace, approval
# "never" means it never waits for a person, and its final message goes to a file.
# aider: one message and exit; no commits, no .gitignore edit, its history files in the proposal's
# folder, no repository map (whose cache would be an untracked file in the workspace).
PRESETS: dict[str, list[str]] = {
    "claude": ["claude", "-p", "{prompt}", "--permission-mode", "acceptEdits",
               "--allowedTools", "Read,Edit,Write,Glob,Grep", "--output-format", "json"],
    "codex": ["codex", "exec", "--sandbox", "workspace-write", "-c", 'approval_policy="never"',
              "--skip-git-repo-check", "--cd", "{workspace}", "--output-last-message", "{last_message_file}",
              "{prompt}"],
    "aider": ["aider", "--yes-always", "--no-auto-commits", "--no-dirty-commits", "--no-gitignore",
              "--no-check-update", "--no-show-model-warnings", "--analytics-disable", "--no-pretty",
              "--map-tokens", "0", "--chat-history-file", "{proposal_dir}/aider.chat.history.md",
              "--input-history-file", "{proposal_dir}/aider.input.history", "--message-file", "{prompt_file}",
              "train.py"],
}
MODEL_FLAG = "--model"  # the same in every preset
PLACEHOLDERS = ("prompt", "prompt_file", "workspace", "description_file", "last_message_file", "proposal_dir")
DESCRIPTION_CHARS = 200
MAX_ARG_BYTES = 120_000  # Linux refuses a single argument over 128 KiB


class AgentError(RuntimeError):
    """The agent failed this proposal; the message (recorded as the crash reason) says how."""


@dataclass
class AgentProposer(Proposer):
    command: list[str]  # with placeholders {prompt} {prompt_file} {workspace} {description_file} ...
    preset: str = "custom"  # claude, codex, aider or custom: for the record
    timeout: float = 900.0  # seconds per proposal; then the agent's process group is killed
    env: dict[str, str] = field(default_factory=dict)  # set on top of the inherited environment
    recent_trials: int = RECENT
    failure_backoff: float = 60.0  # seconds; 0: never wait
    backoff_after: int = 3
    name: str = "agent"
    concurrent = True  # one agent per slot, each in its slot's own worktree

    @classmethod
    def from_settings(cls, workspace: Path, settings: dict) -> "AgentProposer":
        """From the `[agent]` table of autoresearch.toml. Keys (defaults): preset (claude, codex or
        aider) or command (a command line or list, with placeholders {prompt} {prompt_file}
        {workspace} {description_file} {last_message_file} {proposal_dir}); model (the agent's);
        args (extra arguments for a preset); timeout (900 s); env ({}: set for the agent);
        recent_trials (20); failure_backoff (60 s); backoff_after (3). ValueError if unusable."""
        settings = dict(settings or {})
        known = {"preset", "command", "model", "args", "timeout", "env", "recent_trials", "failure_backoff",
                 "backoff_after"}
        check_settings("agent", settings, known)
        command = settings.get("command")
        preset = settings.get("preset") or ("custom" if command else None)
        if preset is None:
            raise ValueError("[agent] needs `preset` (claude, codex or aider) or `command` (a command line with "
                             "placeholders such as {prompt_file} and {workspace})")
        if command:
            argv = shlex.split(command) if isinstance(command, str) else [str(a) for a in command]
        elif preset in PRESETS:
            argv = list(PRESETS[preset])
        else:
            raise ValueError(f"[agent] preset {preset!r} is unknown: use one of {', '.join(PRESETS)}, or give "
                             "`command`")
        if not argv:
            raise ValueError("[agent] command is empty")
        extra = settings.get("args") or []
        extra = shlex.split(extra) if isinstance(extra, str) else [str(a) for a in extra]
        if settings.get("model"):
            if preset not in PRESETS:
                raise ValueError("[agent] `model` works with the claude, codex and aider presets; put the model "
                                 "into `command` for a custom agent")
            extra = [MODEL_FLAG, str(settings["model"]), *extra]
        if extra:  # before the prompt for codex (its last argument), at the end otherwise
            at = len(argv) - 1 if preset == "codex" and not command else len(argv)
            argv[at:at] = extra
        for arg in argv:
            for name in re.findall(r"\{(\w+)\}", arg):
                if name not in PLACEHOLDERS:
                    raise ValueError(f"[agent] command has an unknown placeholder {{{name}}}; known: "
                                     + ", ".join(f"{{{p}}}" for p in PLACEHOLDERS))
        env = {str(k): str(v) for k, v in (settings.get("env") or {}).items()}
        path = env.get("PATH", os.environ.get("PATH"))
        if shutil.which(argv[0], path=path) is None:
            raise ValueError(f"the agent command {argv[0]!r} is not installed (not found on PATH)"
                             + ("; install it or set [agent] command" if preset != "custom" else ""))
        timeout = float(settings.get("timeout", cls.timeout))
        if timeout <= 0:
            raise ValueError("[agent] timeout must be positive (seconds per proposal)")
        return cls(argv, preset, timeout, env, int(settings.get("recent_trials", RECENT)),
                   float(settings.get("failure_backoff", cls.failure_backoff)),
                   int(settings.get("backoff_after", cls.backoff_after)))

    # --- one proposal -----------------------------------------------------------------------------
    def propose(self, ctx: ProposalContext) -> str:
        workspace = Path(ctx.workspace).resolve()
        proposal_id = next_trial_id(ctx)
        rel_dir = f"{AGENT_DIR}/{proposal_id:05d}"
        folder = workspace / rel_dir
        if folder.exists():  # a proposal interrupted before it was recorded: start it afresh
            shutil.rmtree(folder)
        folder.mkdir(parents=True)
        values = {
            "workspace": str(workspace),
            "proposal_dir": str(folder),
            "prompt_file": str(folder / "prompt.md"),
            "description_file": f"{rel_dir}/description.txt",
            "last_message_file": str(folder / "last_message.txt"),
        }
        prompt = agent_prompt(ctx, values["description_file"], self.recent_trials)
        (folder / "prompt.md").write_text(prompt)
        values["prompt"] = prompt
        argv = [_fill(arg, values) for arg in self.command]
        if any(len(arg.encode()) > MAX_ARG_BYTES for arg in argv):
            raise AgentError(f"the prompt ({len(prompt.encode())} bytes) is too long to pass as one argument; "
                             "give the agent {prompt_file} instead of {prompt}, or lower recent_trials")

        train = workspace / "train.py"
        before = train.read_text() if train.exists() else ""
        head_before = git(workspace, "rev-parse", "HEAD", check=False)
        branch_before = git(workspace, "symbolic-ref", "-q", "HEAD", check=False)
        # The workspace marks its agent's processes wherever they go. One still alive now was left by
        # a lab that died (kill -9) during a proposal: it would go on editing the workspace.
        token = str(workspace)
        kill_tagged(AGENT_ENV, token)
        env = {**os.environ, **self.env, AGENT_ENV: token}
        self.last_usage = {"agent": self.preset, "seconds": 0.0}
        started = time.monotonic()
        with open(folder / "stdout.txt", "wb") as out, open(folder / "stderr.txt", "wb") as err:
            try:
                proc = subprocess.Popen(argv, cwd=workspace, env=env, stdin=subprocess.DEVNULL, stdout=out,
                                        stderr=err, start_new_session=True)
            except OSError as e:
                raise AgentError(f"could not start the agent {argv[0]!r}: {e}") from None
            try:
                code = proc.wait(timeout=self.timeout)
                timed_out = False
            except subprocess.TimeoutExpired:
                timed_out = True
                code = None
            finally:  # on a timeout, on Ctrl-C, and after a normal exit: whatever it left running
                _stop(proc, token)
        seconds = round(time.monotonic() - started, 3)
        self.last_usage = {"agent": self.preset, "seconds": seconds, "exit_code": code}
        stdout = (folder / "stdout.txt").read_text(errors="replace")
        stderr = (folder / "stderr.txt").read_text(errors="replace")
        message, cost = _result_text(stdout)
        if cost:
            self.last_usage.update(cost)

        if timed_out:
            self.last_usage["timed_out"] = True
            raise AgentError(f"the agent ran past its time limit of {self.timeout:g} s and was stopped"
                             + _tail(message or stdout, stderr))
        if code != 0:
            raise AgentError(f"the agent exited with code {code}" + _tail(message or stdout, stderr))

        branch_after = git(workspace, "symbolic-ref", "-q", "HEAD", check=False)
        if branch_after != branch_before:
            if branch_before:
                git(workspace, "checkout", "-q", "-f", branch_before.removeprefix("refs/heads/"), check=False)
            raise AgentError(f"the agent switched git from {branch_before or 'a detached HEAD'} to "
                             f"{branch_after or 'a detached HEAD'}; switched back, its edit is dropped")
        if head_before and git(workspace, "rev-parse", "HEAD", check=False) != head_before:
            git(workspace, "reset", "-q", "--soft", head_before, check=False)  # the lab commits, not the agent
            self.last_usage["agent_committed"] = True

        after = train.read_text() if train.exists() else ""
        description, source = _description(folder, message, stdout)
        if not description:
            description, source = (describe_change(before, after) if after != before else "no change"), "diff"
        self.last_usage["description_from"] = source
        return description

    def tell(self, trial: Trial) -> None:
        pass


# --- helpers --------------------------------------------------------------------------------------
def _fill(arg: str, values: dict[str, str]) -> str:
    for name, value in values.items():
        arg = arg.replace("{" + name + "}", value)
    return arg


def _stop(proc: subprocess.Popen, token: str) -> None:
    """SIGTERM to the agent's process group, SIGKILL to what is left after a grace period, and to
    whatever left the group but carries the workspace's token."""
    try:
        os.killpg(proc.pid, signal.SIGTERM)
    except (ProcessLookupError, PermissionError):
        pass
    else:
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            pass
        deadline = time.monotonic() + 2
        while time.monotonic() < deadline and group_alive(proc.pid):
            time.sleep(0.05)
    kill_tagged(AGENT_ENV, token, proc.pid)
    try:
        proc.wait(timeout=5)
    except subprocess.TimeoutExpired:
        pass


def _tail(stdout: str, stderr: str, lines: int = 4, chars: int = 400) -> str:
    """The last lines of what the agent printed, on one line, for the crash reason."""
    parts = []
    for name, text in (("stdout", stdout), ("stderr", stderr)):
        shown = " | ".join([line.strip() for line in text.splitlines() if line.strip()][-lines:])
        if len(shown) > chars:
            shown = "..." + shown[-(chars - 3):]
        if shown:
            parts.append(f"its {name} ends: {shown}")
    return ("; " + "; ".join(parts)) if parts else "; it printed nothing"


def _result_text(stdout: str) -> tuple[str, dict]:
    """Claude Code's `--output-format json` result: (its final text, what it says it cost)."""
    text = stdout.strip()
    if not text.startswith("{"):
        return "", {}
    try:
        data = json.loads(text)
    except json.JSONDecodeError:
        return "", {}
    if not isinstance(data, dict):
        return "", {}
    cost = {}
    if isinstance(data.get("total_cost_usd"), (int, float)):
        cost["cost_usd"] = float(data["total_cost_usd"])
    usage = data.get("usage") if isinstance(data.get("usage"), dict) else {}
    for key in ("input_tokens", "output_tokens", "cache_read_input_tokens", "cache_creation_input_tokens"):
        if isinstance(usage.get(key), int):
            cost[key] = usage[key]
    if isinstance(data.get("num_turns"), int):
        cost["turns"] = data["num_turns"]
    return str(data.get("result") or ""), cost


def _description(folder: Path, message: str, stdout: str) -> tuple[str, str]:
    """The agent's own description and where it was found, or ('', '')."""
    path = folder / "description.txt"
    if path.is_file():
        line = next((line.strip() for line in path.read_text(errors="replace").splitlines() if line.strip()), "")
        line = _clean(DESCRIPTION_LINE.match(line).group("text") if DESCRIPTION_LINE.match(line) else line)
        if line:
            return line, "file"
    last_message = folder / "last_message.txt"
    sources = [("message", message), ("message", last_message.read_text(errors="replace")
                                      if last_message.is_file() else ""), ("stdout", stdout)]
    for source, text in sources:
        found = ""
        for line in text.splitlines():
            match = DESCRIPTION_LINE.match(line)
            if match and _clean(match.group("text")):
                found = _clean(match.group("text"))
        if found:
            return found, source
    return "", ""


def _clean(text: str) -> str:
    text = " ".join(text.split()).strip("`\"' ")
    if not text or text.startswith("<"):  # nothing, or the prompt's own example "<one line>" echoed
        return ""
    return one_line(text, DESCRIPTION_CHARS)
