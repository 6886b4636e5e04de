"""`autoresearch status`: where the run stands, in the terminal.

The trial in flight (its step, loss, tokens/s, MFU and time left, from the last progress line of
its train.log), where the run has several trial slots every slot (what it runs, idle, or lost, and
how busy it has been), the best so far, the noise floor, and the last trials. Printed once by default;
`--watch` redraws it every few seconds (rich Live on a terminal, a fresh print per refresh when
the output is not one). Reads the ledger read-only: safe while the loop runs.
"""
from __future__ import annotations

import os
import sys
import time
from pathlib import Path

from rich import box
from rich.console import Console, Group
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from autoresearch.lab.outcomes import Kind, Status

from .data import (UNSANDBOXED_NOTE, Analysis, ReportError, SlotState, detectable_text, duration, find_workspace,
                   last_progress, load, mfu_text, percent, reason_text, sigma_text, slot_now_text, unsandboxed_text)

STATUS_STYLE = {Status.KEEP: "bold green", Status.DISCARD: "grey62", Status.CRASH: "bold red",
                Status.RUNNING: "bold yellow", Status.STOPPED: "yellow", Status.LOST: "yellow", Status.EMPTY: "grey62",
                Status.SUPERSEDED: "cyan"}
# Trials that ended without a decision of their own, listed with why.
EXPLAINED = (Status.CRASH, Status.STOPPED, Status.LOST, Status.EMPTY, Status.SUPERSEDED)
SLOT_STYLE = {SlotState.RUNNING: "yellow", SlotState.IDLE: "grey62", SlotState.LOST: "bold red"}


def _fmt(value, spec: str, missing: str = "-") -> str:
    if value is None or isinstance(value, str):
        return missing if value is None else value
    return format(value, spec)


def current_lines(a: Analysis) -> list[Text]:
    lines = []
    for t in a.running:
        elapsed = a.read_at - t.started_at if t.started_at else None
        head = Text.assemble(("now  ", "bold"), (f"trial {t.id} ", "bold yellow"), (f"[{t.kind}] ", "dim"),
                             (t.description, ""), (f"  running for {duration(elapsed)}", "dim"))
        slot = a.slot_of_trial(t)
        if a.several_slots and slot is not None:
            head.append(f" in slot {slot.index}", "dim")
        lines.append(head)
        if t in a.stale_running:
            lines.append(Text(f"     no trial runs this long: the lab stopped during it (kill -9, a reboot?); "
                              f"`autoresearch run {a.ws.root}` resumes and records it", style="red"))
            continue
        point = last_progress(a.log_path(t))
        if point:
            left = point.get("remaining_s")
            parts = [f"step {point.get('step')}"]
            if point.get("progress_pct") is not None:
                parts.append(f"{_fmt(point.get('progress_pct'), '.1f')}%")
            parts.append(f"loss {_fmt(point.get('loss'), '.4f')}")
            if point.get("tok_per_s") is not None:
                parts.append(f"{_fmt(point.get('tok_per_s'), ',.0f')} tok/s")
            parts.append(f"MFU {mfu_text(point.get('mfu_pct'), a.on_cpu(t))}")
            if point.get("epoch") is not None:
                parts.append(f"epoch {point.get('epoch')}")
            parts.append(f"{duration(left)} of training left" if isinstance(left, (int, float)) else "time left unknown")
            lines.append(Text("     " + " · ".join(parts)))
        else:
            budget = a.time_budget
            note = "no progress line yet (starting, compiling, or evaluating)"
            if budget and elapsed is not None:
                note += f"; budget {budget:g}s"
            lines.append(Text("     " + note, style="dim"))
    return lines


def slot_lines(a: Analysis) -> list[Text]:
    """Every slot of the run, where there are several (or the one was lost): where it is, what it runs
    now, and the share of the run it has been busy."""
    if not a.slots_worth_showing:
        return []
    head = Text.assemble(("slots", "bold"), f" {len(a.slots)}")
    if a.slots_busy_fraction is not None:
        head.append(f" · busy {percent(a.slots_busy_fraction)} of the run's {duration(a.run_span_seconds)}"
                    f" · {a.device_hours:.2f} {a.accelerator}-h")
    lines = [head]
    for slot in a.slots:
        line = Text.assemble(f"  slot {slot.index}  ", (slot.where, "bold"), "  ",
                             (slot_now_text(a, slot), SLOT_STYLE[slot.state]))
        if slot.busy_fraction is not None:
            line.append(f"  · busy {percent(slot.busy_fraction)}, {len(slot.finished)} finished", "dim")
        lines.append(line)
    return lines


def summary_lines(a: Analysis) -> list[Text]:
    lines = []
    if a.best_mean is not None:
        best = Text.assemble(("best ", "bold"), (f"{a.best_mean:.6f}", "bold green"),
                             f"  {(a.best_commit or '')[:7]} over {len(a.best_values)} run(s)")
        if not a.best_is_baseline and a.improvement is not None:
            se = a.improvement_se
            best.append(f"  ({a.improvement:+.6f} vs baseline" + (f", {a.improvement / se:.1f} SE)" if se else ")"))
        else:
            best.append("  (the baseline: nothing kept yet)", style="dim")
        lines.append(best)
    if a.baseline_values:
        lines.append(Text.assemble(("base ", "bold"), f"{a.baseline_mean:.6f}  over {len(a.baseline_values)} run(s)"))
    elif a.trials:
        lines.append(Text("no baseline has finished yet", style="dim"))
    if a.trials:
        hidden = detectable_text(a, why=False)
        lines.append(Text.assemble(("noise", "bold"), f" {sigma_text(a)}"))
        if hidden:
            lines.append(Text(f"      {hidden}", style="dim"))
    if a.unsandboxed:
        lines.append(Text(f"WARNING: {unsandboxed_text(a)}", style="bold red"))
    tally = Text.assemble(("trials ", "bold"), f"{len(a.trials)}: ")
    for n, (status, count) in enumerate(a.tally()):
        tally.append(", " if n else "")
        tally.append(f"{count} {status}", STATUS_STYLE[status])
    if a.keep_rate is not None:
        tally.append(f"  · keep rate {100 * a.keep_rate:.0f}% of {len(a.counted_candidates)} candidates")
    if a.trials_per_hour is not None:
        tally.append(f"  · {a.trials_per_hour:.1f}/h  · {a.device_hours:.2f} {a.accelerator}-h")
    lines.append(tally)
    return lines


def trials_table(a: Analysis, last: int) -> Table:
    table = Table(box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False, expand=False)
    table.add_column("#", justify="right")
    table.add_column("kind")
    table.add_column("commit")
    table.add_column("status")
    table.add_column("val_bpb", justify="right")
    table.add_column("Δ best", justify="right")
    table.add_column("time", justify="right")
    table.add_column("description / reason", overflow="fold", min_width=24)
    for t in a.trials[-last:] if last > 0 else []:
        delta = a.delta_of(t) if t.kind == Kind.CANDIDATE else None
        secs = (t.ended_at or a.read_at) - t.started_at if t.started_at else None
        note = t.description + ("" if t.sandboxed else f"\n[{UNSANDBOXED_NOTE}]")
        why = reason_text(t) if t.status in EXPLAINED else ""
        if why:
            note += f"\n{why[:180]}"
        delta_text = Text(f"{delta:+.6f}" if delta is not None else "",
                          style="green" if delta is not None and delta > 0 else "")
        table.add_row(str(t.id), t.kind, t.short_sha, Text(t.status, style=STATUS_STYLE.get(t.status, "")),
                      f"{t.val_bpb:.6f}" if t.val_bpb is not None else "-", delta_text, duration(secs),
                      Text(note))  # Text: a description's [brackets] are not rich markup
    return table


def render_status(a: Analysis, last: int = 15):
    cfg = a.ws.config
    budget = a.time_budget
    title = (f"autoresearch · {cfg.get('tag', '?')} · {cfg.get('branch', '?')} · profile {cfg.get('profile', '?')}"
             + (f" · budget {budget:g}s" if budget else ""))
    parts: list = [Text(title, style="bold"), Text(str(a.ws.root), style="dim")]
    if not a.trials:
        parts.append(Text(f"No trials yet. Start the loop with `autoresearch run {a.ws.root}`.", style="yellow"))
        return Group(*parts)
    parts.append(Text(""))
    current = current_lines(a)
    if current:
        parts.append(Panel(Group(*current), box=box.ROUNDED, border_style="yellow", padding=(0, 1)))
    slots = slot_lines(a)
    if slots:
        parts.extend(slots)
        parts.append(Text(""))
    parts.extend(summary_lines(a))
    parts.append(Text(""))
    parts.append(trials_table(a, last))
    if a.hardware:
        parts.append(Text(f"hardware: {a.hardware_text}", style="dim"))
    return Group(*parts)


def _console(stream=None) -> Console:
    stream = stream or sys.stdout
    console = Console(file=stream)
    if not console.is_terminal and not os.environ.get("COLUMNS"):
        console = Console(file=stream, width=120)
    return console


def status(workspace: str | Path | None = None, *, last: int = 15, watch: bool = False, interval: float = 2.0,
           stream=None) -> int:
    """What `autoresearch status [WORKSPACE] [--last N] [--watch] [--interval S]` does. Returns 0 (also
    for a workspace with no trials yet, which it says); raises ReportError for one it cannot read."""
    ws = find_workspace(workspace)
    console = _console(stream)
    if not watch:
        console.print(render_status(load(ws), last))
        return 0
    interval = max(0.5, float(interval))

    def frame():
        try:
            return render_status(load(ws, retry_seconds=2.0), last)
        except ReportError as e:  # keep watching: the next refresh may read it
            return Text(f"{e}", style="red")

    try:
        if console.is_terminal:
            from rich.live import Live

            with Live(frame(), console=console, refresh_per_second=4, screen=False) as live:
                while True:
                    time.sleep(interval)
                    live.update(frame())
        else:
            while True:
                console.print(frame())
                console.rule(time.strftime("%H:%M:%S"))
                stream_flush = getattr(console.file, "flush", None)
                if stream_flush:
                    stream_flush()
                time.sleep(interval)
    except KeyboardInterrupt:
        return 0
