"""`autoresearch dashboard`: a live page on 127.0.0.1 while the loop runs.

A stdlib ThreadingHTTPServer serves one page (static/index.html, app.js, style.css: plain JS and
SVG, nothing from the internet) and JSON endpoints the page polls every 2 s:

    GET /api/trials       workspace, headline numbers, every trial (no diffs), a stamp that changes
                          when the ledger does
    GET /api/current      the running trial (with several slots: the latest begun), else the last one
                          with a result, and its progress points (step, loss, tokens/s, MFU, time left)
                          parsed from its train.log; when idle, also the latest trial if it ended
                          without a result (crashed, stopped, ...)
    GET /api/slots        every trial slot of the run (an older ledger: one), what it runs now with its
                          latest progress point, and its share of the run:
                          {"now", "shown" (the page lists the slots: several, or one lost), "recorded"
                          (the ledger names its slots), "run_started", "span_seconds", "busy_fraction",
                          "accelerator" ("GPU"/"CPU": what device_hours count), "device_hours",
                          "slots": [{"slot", "where" (in words), "device", "gpus", "threads", "executor",
                          "node", "host", "device_class", "state" ("running"/"idle"/"lost"),
                          "lost_reason", "trial" (the running one, as in /api/current, or null),
                          "progress" ({step, progress_pct, loss, tok_per_s, mfu_pct, remaining_s} or
                          null), "on_cpu", "trials", "finished", "busy_seconds", "busy_fraction",
                          "device_hours", "trials_per_hour"}]}
    GET /api/trial/<id>   one trial in full: diff, reason, decision, the end of its train.log
    GET /api/health       {"ok": true}

Read-only: the ledger is opened with SQLite's `mode=ro` and re-read only when its files change;
train.log files are followed incrementally. Requests whose Host is not this machine's loopback
are refused (a web page elsewhere cannot read the run through DNS rebinding). To watch a remote GPU
box, forward the port (`ssh -L 8765:127.0.0.1:8765 gpubox`) rather than serving beyond loopback;
`host="0.0.0.0"` does that on purpose, for a trusted network only, and then drops the Host check.
"""
from __future__ import annotations

import errno
import json
import math
import re
import socket
import sys
import threading
import time
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from pathlib import Path

from autoresearch.lab.ledger import Trial
from autoresearch.lab.outcomes import Kind
from autoresearch.lab.workspace import Workspace

from .data import (Analysis, LogFollower, ReportError, SlotState, downsample, failure_name, find_workspace,
                   ledger_stamp, load, read_tail, unsandboxed_text)

DEFAULT_PORT = 8765
STATIC = {"index.html": "text/html; charset=utf-8", "app.js": "text/javascript; charset=utf-8",
          "style.css": "text/css; charset=utf-8"}
RELOAD_SECONDS = 10.0  # re-read the ledger at least this often, changed or not
FOLLOWED_LOGS = 16  # train.logs followed at once beyond one per slot; past that, they are read afresh
PROGRESS_KEYS = ("step", "progress_pct", "loss", "lrm", "dt_ms", "tok_per_s", "mfu_pct", "epoch", "remaining_s")
LOG_TAIL_BYTES = 8192
CSP = "default-src 'self'; img-src 'self' data:; style-src 'self'; script-src 'self'; connect-src 'self'"


class PortInUse(ReportError):
    pass


def _clean(value):
    """JSON without NaN or infinities (the browser's JSON.parse refuses them)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    return value


class DashboardState:
    """The workspace as the page sees it, re-read when the ledger's files change."""

    def __init__(self, ws: Workspace):
        self.ws = ws
        self.lock = threading.Lock()
        self._stamp = None
        self._loaded_at = 0.0
        self._analysis: Analysis | None = None
        self._error: str | None = None
        self._version = 0
        self._followers: dict[Path, LogFollower] = {}

    def analysis(self) -> Analysis:
        with self.lock:
            stamp = ledger_stamp(self.ws.ledger_path)
            now = time.monotonic()
            if self._analysis is None or stamp != self._stamp or now - self._loaded_at > RELOAD_SECONDS:
                try:
                    fresh = load(self.ws, retry_seconds=2.0)
                except ReportError as e:
                    if self._analysis is None:
                        raise
                    self._error = str(e)  # serve the last good state, and say why it is old
                else:
                    key = [(t.id, t.status, t.val_bpb, t.ended_at) for t in fresh.trials]
                    old = [(t.id, t.status, t.val_bpb, t.ended_at) for t in self._analysis.trials] if self._analysis else None
                    if key != old or fresh.meta != (self._analysis.meta if self._analysis else None):
                        self._version += 1
                    self._analysis, self._error = fresh, None
                self._stamp, self._loaded_at = stamp, now
            return self._analysis

    def follower(self, path: Path, slots: int = 1) -> LogFollower:
        with self.lock:
            if path not in self._followers:
                if len(self._followers) > FOLLOWED_LOGS + slots:  # every slot's log stays followed
                    self._followers.clear()
                self._followers[path] = LogFollower(path)
            return self._followers[path]

    # --- payloads ---------------------------------------------------------------------------------
    def trials_payload(self) -> dict:
        a = self.analysis()
        now = time.time()
        trials = []
        for t in a.trials:
            seconds = ((t.ended_at or now) - t.started_at) if t.started_at else None
            trials.append({
                "id": t.id, "kind": t.kind, "status": t.status, "commit": t.short_sha, "description": t.description,
                "val_bpb": t.val_bpb, "delta": a.delta_of(t) if t.kind == Kind.CANDIDATE else None,
                "failure": failure_name(t), "reason": t.reason, "stale": t in a.stale_running,
                "why": t.decision.get("why", "") if isinstance(t.decision, dict) else "",
                "proposer": t.proposer, "seed": t.seed, "started_at": t.started_at, "ended_at": t.ended_at,
                "seconds": seconds, "running_best": a.running_best.get(t.id), "num_steps": t.num_steps,
                "sandboxed": t.sandboxed,
            })
        cfg = a.ws.config
        interval = a.improvement_interval
        summary = {
            "total": len(a.trials), "counts": a.counts(), "tally": a.tally(), "baseline_mean": a.baseline_mean,
            "baseline_n": len(a.baseline_values), "sigma": a.sigma, "sigma_df": a.sigma_df, "noise_since": a.since,
            "unsandboxed": unsandboxed_text(a),
            "detectable_gain": a.detectable_gain, "detect_against": a.detect_against, "best_commit": a.best_commit,
            "best_mean": a.best_mean, "best_n": len(a.best_values),
            "best_is_baseline": a.best_is_baseline if a.best_commit else None,
            "improvement": a.improvement, "improvement_se": a.improvement_se,
            "improvement_low": interval.low if interval else None,
            "improvement_high": interval.high if interval else None,
            "keep_rate": a.keep_rate,
            "kept_candidates": len(a.kept_candidates), "counted_candidates": len(a.counted_candidates),
            "trials_per_hour": a.trials_per_hour, "compute_hours": a.device_hours,
            "compute_basis": a.device_hours_basis, "slots": len(a.slots),
            "accelerator": a.accelerator, "hardware": a.hardware_text if a.hardware else "",
        }
        workspace = {"root": str(a.ws.root), "tag": cfg.get("tag", ""), "branch": cfg.get("branch", ""),
                     "profile": cfg.get("profile", ""), "budget": a.time_budget, "ledger": str(a.ws.ledger_path)}
        return {"workspace": workspace, "summary": summary, "trials": trials, "stamp": self._version,
                "stale": self._error, "now": now}

    def current_payload(self) -> dict:
        """The trial running now, with its curve. With none running (idle, or only a row a dead lab left
        running), the last trial that ended with a result, with its curve, and the latest trial besides
        when it ended without one: a dead trial's curve is never shown as the current one."""
        a = self.analysis()
        now = time.time()
        running = a.live_running[-1] if a.live_running else None
        shown = running or a.last_result
        latest = a.trials[-1] if a.trials else None
        payload = {"running": running is not None, "trial": None, "points": [], "last": None, "now": now,
                   "on_cpu": a.on_cpu(shown), "stale": [t.id for t in a.stale_running],
                   "latest": None if running or latest is None or latest is shown else self._brief(latest, now, a)}
        if shown is not None:
            points = self.follower(a.log_path(shown), len(a.slots)).poll()
            slim = [{k: p.get(k) for k in PROGRESS_KEYS if k in p} for p in downsample(points)]
            payload.update(trial=self._brief(shown, now, a), points=slim, last=slim[-1] if slim else None)
        return payload

    def slots_payload(self) -> dict:
        """Every slot of the run: where it is, what it runs now with its latest progress point, idle or lost,
        and its share of the run (busy, finished trials, device-hours)."""
        a = self.analysis()
        now = time.time()
        slots = []
        for s in a.slots:
            entry = {"slot": s.index, "where": s.where, "device": s.device, "gpus": s.gpus, "threads": s.threads,
                     "executor": s.executor, "node": s.node, "host": s.host, "device_class": s.device_class,
                     "state": s.state, "lost_reason": s.lost_reason, "trial": None, "progress": None,
                     "on_cpu": s.device == "cpu" if s.device else a.accelerator == "CPU",
                     "trials": len(s.trials), "finished": len(s.finished), "busy_seconds": s.busy_seconds,
                     "busy_fraction": s.busy_fraction, "device_hours": s.device_hours,
                     "trials_per_hour": s.trials_per_hour}
            if s.state == SlotState.RUNNING:
                points = self.follower(a.log_path(s.running), len(a.slots)).poll()
                entry["trial"] = self._brief(s.running, now, a)
                entry["progress"] = {k: points[-1].get(k) for k in PROGRESS_KEYS if k in points[-1]} if points else None
            slots.append(entry)
        return {"now": now, "shown": a.slots_worth_showing, "recorded": a.slots_recorded,
                "run_started": a.run_started, "span_seconds": a.run_span_seconds,
                "busy_fraction": a.slots_busy_fraction, "accelerator": a.accelerator, "device_hours": a.device_hours,
                "slots": slots}

    @staticmethod
    def _brief(trial: Trial, now: float, a: Analysis) -> dict:
        slot = a.slot_of_trial(trial)
        return {"id": trial.id, "kind": trial.kind, "status": trial.status, "description": trial.description,
                "started_at": trial.started_at, "val_bpb": trial.val_bpb, "reason": trial.reason,
                "failure": failure_name(trial), "slot": slot.index if slot else None,
                "seconds": ((trial.ended_at or now) - trial.started_at) if trial.started_at else None}

    def trial_payload(self, trial_id: int) -> dict | None:
        a = self.analysis()
        trial = next((t for t in a.trials if t.id == trial_id), None)
        if trial is None:
            return None
        tail = "\n".join((read_tail(a.log_path(trial), LOG_TAIL_BYTES) or "").splitlines()[-40:])
        return {"id": trial.id, "kind": trial.kind, "status": trial.status, "commit": trial.commit_sha,
                "parent": trial.parent_sha, "proposer": trial.proposer, "description": trial.description,
                "diff": trial.diff, "seed": trial.seed, "reason": trial.reason, "decision": trial.decision,
                "val_bpb": trial.val_bpb, "summary": trial.trainer_summary if not trial.reason else
                {k: v for k, v in trial.trainer_summary.items() if k != "log_tail"},
                "num_steps": trial.num_steps, "total_tokens_m": trial.total_tokens_m,
                "peak_vram_mb": trial.peak_vram_mb, "mfu_percent": trial.mfu_percent, "on_cpu": a.on_cpu(trial),
                "failure": failure_name(trial), "hardware": trial.hardware,
                "started_at": trial.started_at, "ended_at": trial.ended_at, "log_tail": tail}


class Handler(BaseHTTPRequestHandler):
    server: "DashboardServer"
    protocol_version = "HTTP/1.1"

    def log_message(self, format, *args):  # quiet; errors are sent to the page
        if self.server.verbose:
            super().log_message(format, *args)

    def _send(self, status: int, body: bytes, content_type: str, cache: bool = False) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "max-age=60" if cache else "no-store")
        self.send_header("Content-Security-Policy", CSP)
        self.send_header("X-Content-Type-Options", "nosniff")
        self.send_header("Referrer-Policy", "no-referrer")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _json(self, payload, status: int = 200) -> None:
        body = json.dumps(_clean(payload), allow_nan=False, separators=(",", ":")).encode()
        self._send(status, body, "application/json; charset=utf-8")

    def _host_ok(self) -> bool:
        if not self.server.loopback:
            return True  # served beyond this machine on purpose (--host): any name may reach it
        host = (self.headers.get("Host") or "").strip().lower()
        name = host.rsplit(":", 1)[0] if not host.endswith("]") else host
        return name in ("127.0.0.1", "localhost", "[::1]", self.server.host.lower())

    def do_HEAD(self):
        self.do_GET()

    def do_GET(self):
        if not self._host_ok():
            return self._json({"error": "this dashboard answers only to 127.0.0.1 / localhost"}, HTTPStatus.FORBIDDEN)
        path = self.path.split("?", 1)[0]
        state = self.server.state
        try:
            if path in ("/", "/index.html"):
                return self._static("index.html")
            if path.startswith("/static/"):
                name = path[len("/static/"):]
                if name in STATIC:
                    return self._static(name)
                return self._json({"error": f"no such file: {path}"}, HTTPStatus.NOT_FOUND)
            if path == "/api/health":
                return self._json({"ok": True})
            if path == "/api/trials":
                return self._json(state.trials_payload())
            if path == "/api/current":
                return self._json(state.current_payload())
            if path == "/api/slots":
                return self._json(state.slots_payload())
            match = re.fullmatch(r"/api/trial/(\d+)", path)
            if match:
                payload = state.trial_payload(int(match.group(1)))
                if payload is None:
                    return self._json({"error": f"no trial {match.group(1)}"}, HTTPStatus.NOT_FOUND)
                return self._json(payload)
            return self._json({"error": f"no such page: {path}"}, HTTPStatus.NOT_FOUND)
        except ReportError as e:
            return self._json({"error": str(e)}, HTTPStatus.SERVICE_UNAVAILABLE)
        except (BrokenPipeError, ConnectionResetError):
            return None

    def _static(self, name: str) -> None:
        body = resources.files("autoresearch.report").joinpath("static", name).read_bytes()
        self._send(200, body, STATIC[name])


class DashboardServer(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True  # a restart right after a stop finds the port free (TIME_WAIT)

    def __init__(self, state: DashboardState, host: str, port: int, verbose: bool = False):
        self.state, self.host, self.verbose = state, host, verbose
        self.loopback = host in ("127.0.0.1", "localhost", "::1")
        if host == "::1" or ":" in host:
            self.address_family = socket.AF_INET6
        super().__init__((host, port), Handler)

    @property
    def port(self) -> int:
        return self.server_address[1]

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/"


def make_server(workspace: str | Path | Workspace | None = None, port: int = DEFAULT_PORT,
                host: str = "127.0.0.1", verbose: bool = False) -> DashboardServer:
    """A server bound to host:port (port 0: any free one), not yet serving. Raises PortInUse."""
    ws = workspace if isinstance(workspace, Workspace) else find_workspace(workspace)
    state = DashboardState(ws)
    try:
        return DashboardServer(state, host, port, verbose)
    except OSError as e:
        if e.errno in (errno.EADDRINUSE, errno.EACCES):
            why = "is in use (another dashboard, or another program)" if e.errno == errno.EADDRINUSE else \
                "may not be opened by this user"
            raise PortInUse(f"Port {port} on {host} {why}. Choose another with --port, e.g. "
                            f"`autoresearch dashboard --port {port + 1 if port else DEFAULT_PORT + 1}`.") from None
        raise ReportError(f"Cannot serve the dashboard on {host}:{port}: {e}") from None


def dashboard(workspace: str | Path | None = None, *, port: int = DEFAULT_PORT, host: str = "127.0.0.1",
              open_browser: bool = False, stream=None) -> int:
    """What `autoresearch dashboard [WORKSPACE] [--port N] [--open]` does: serve until Ctrl-C; 0."""
    stream = stream or sys.stdout
    server = make_server(workspace, port, host)
    ws = server.state.ws
    print(f"dashboard for {ws.root}: {server.url}  (read-only; Ctrl-C to stop)", file=stream, flush=True)
    if open_browser:
        import webbrowser

        threading.Timer(0.3, lambda: webbrowser.open(server.url)).start()
    try:
        server.serve_forever(poll_interval=0.25)
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0
