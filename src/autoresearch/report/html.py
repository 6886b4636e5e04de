"""report.html: one self-contained file (the plot inlined as base64, CSS inline, no script, no CDN)
that can be mailed, archived or opened offline years later."""
from __future__ import annotations

import base64
import html
import time
from pathlib import Path

from autoresearch.lab.outcomes import Kind

from .data import (UNSANDBOXED_NOTE, Analysis, SlotState, crash_detail, detectable_text, duration, percent,
                   reason_text, sigma_basis, sigma_text, slot_now_text, unsandboxed_text)
from .plots import BAND_SIGMAS
from .sealed_results import TestResult
from .summary import (bpb, confirmation_lines, effect_uncertainty, interval_text, run_started_text, signed,
                      throughput, uncounted_text)

CSS = """
:root { --fg:#1d2330; --muted:#667085; --line:#e4e7ec; --keep:#2ca02c; --discard:#9e9e9e; --crash:#d62728;
        --base:#1f77b4; --bg:#fff; --card:#f8f9fb; }
* { box-sizing: border-box; }
body { font: 14px/1.45 -apple-system, BlinkMacSystemFont, "Segoe UI", Roboto, Helvetica, Arial, sans-serif;
       color: var(--fg); background: var(--bg); margin: 0 auto; max-width: 1200px; padding: 24px; }
h1 { font-size: 22px; margin: 0 0 4px; } h2 { font-size: 17px; margin: 28px 0 10px; border-bottom: 1px solid var(--line);
     padding-bottom: 4px; }
.muted { color: var(--muted); }
.cards { display: grid; grid-template-columns: repeat(auto-fit, minmax(200px, 1fr)); gap: 12px; margin: 16px 0; }
.card { background: var(--card); border: 1px solid var(--line); border-radius: 8px; padding: 10px 14px; }
.card .label { color: var(--muted); font-size: 12px; text-transform: uppercase; letter-spacing: .04em; }
.card .value { font-size: 20px; font-weight: 600; font-variant-numeric: tabular-nums; }
.card .sub { color: var(--muted); font-size: 12px; }
img.plot { width: 100%; border: 1px solid var(--line); border-radius: 8px; }
table { border-collapse: collapse; width: 100%; font-size: 13px; }
th, td { text-align: left; padding: 4px 8px; border-bottom: 1px solid var(--line); vertical-align: top; }
th { background: var(--card); position: sticky; top: 0; }
td.num { text-align: right; font-variant-numeric: tabular-nums; font-family: ui-monospace, Menlo, Consolas, monospace; }
code, pre { font-family: ui-monospace, SFMono-Regular, Menlo, Consolas, monospace; font-size: 12px; }
pre.diff { background: #fbfbfc; border: 1px solid var(--line); border-radius: 6px; padding: 8px; overflow-x: auto; margin: 6px 0 0; }
/* A line's colour spans the width, yet the line stays inline: a block inside <pre> would add a blank
   line at the newline after it. */
pre.diff span { display: inline-block; min-width: 100%; }
pre.diff .add { color: #116329; background: #dafbe1; }
pre.diff .del { color: #82071e; background: #ffebe9; }
pre.diff .hunk { color: #6639ba; }
.status { font-weight: 600; } .status.keep { color: var(--keep); } .status.discard { color: var(--discard); }
.status.crash { color: var(--crash); } .status.running { color: #ff9800; }
.status.stopped, .status.lost { color: #b26a00; } .status.empty { color: var(--discard); font-weight: 400; }
.status.superseded { color: #00838f; }
details summary { cursor: pointer; }
li { margin: 4px 0; }
.reason { color: var(--muted); font-size: 12px; }
.warning { border: 1px solid #c0392b; color: #c0392b; padding: 8px 12px; border-radius: 6px; }
.busy { display: inline-block; width: 80px; height: 8px; background: var(--line); border-radius: 4px;
        vertical-align: middle; margin-right: 6px; overflow: hidden; }
.busy span { display: block; height: 100%; background: var(--base); }
.slot-lost { color: #b26a00; }
"""


def esc(value) -> str:
    return html.escape(str(value), quote=True)


def diff_html(diff: str) -> str:
    out = []
    for line in diff.rstrip("\n").splitlines():
        cls = ""
        if line.startswith("+") and not line.startswith("+++"):
            cls = "add"
        elif line.startswith("-") and not line.startswith("---"):
            cls = "del"
        elif line.startswith("@@"):
            cls = "hunk"
        out.append(f'<span class="{cls}">{esc(line) or " "}</span>' if cls else esc(line))
    return '<pre class="diff">' + "\n".join(out) + "</pre>"


def _card(label: str, value: str, sub: str = "") -> str:
    return (f'<div class="card"><div class="label">{esc(label)}</div><div class="value">{esc(value)}</div>'
            f'<div class="sub">{esc(sub)}</div></div>')


def slots_section(a: Analysis) -> str:
    """The run's slots, one row each: where, how busy, what each finished and its device-hours, and what it
    does now. Empty for an older ledger, which records no slots."""
    if not a.slots_recorded:
        return ""
    rows = []
    for s in a.slots:
        fraction = s.busy_fraction or 0.0
        now = slot_now_text(a, s)
        rows.append(
            f'<tr data-slot="{s.index}"><td class=num>{s.index}</td><td>{esc(s.where)}</td>'
            f'<td><span class="busy"><span style="width:{100 * fraction:.1f}%"></span></span>'
            f"{percent(s.busy_fraction)}</td><td class=num>{len(s.finished)}</td>"
            f"<td class=num>{f'{s.trials_per_hour:.1f}' if s.trials_per_hour is not None else '-'}</td>"
            f"<td class=num>{s.device_hours:.2f}</td>"
            f'<td{" class=slot-lost" if s.state == SlotState.LOST else ""}>{esc(now)}</td></tr>')
    return (f"<h2>Slots</h2><p class=muted>{len(a.slots)} slot(s), busy {percent(a.slots_busy_fraction)} of the "
            f"run's {duration(a.run_span_seconds)} since {esc(run_started_text(a))}. Busy: the share of the run a "
            f"trial was in flight there; {esc(a.accelerator)}-hours: {esc(a.device_hours_basis)}.</p>"
            f"<table><thead><tr><th>slot</th><th>where</th><th>busy</th><th>trials finished</th><th>trials/h</th>"
            f"<th>{esc(a.accelerator)}-hours</th><th>now</th></tr></thead><tbody>{''.join(rows)}</tbody></table>")


def render_html(a: Analysis, tests: list[TestResult], png: Path | None) -> str:
    cfg = a.ws.config
    budget = a.time_budget
    cards = [_card("baseline val_bpb", bpb(a.baseline_mean), f"{len(a.baseline_values)} run(s)")]
    if a.best_commit and not a.best_is_baseline:
        se, interval = a.improvement_se, a.improvement_interval
        cards.append(_card("best val_bpb", bpb(a.best_mean), f"{a.best_commit[:7]}, {len(a.best_values)} run(s)"))
        rel = f" ({100 * a.improvement / a.baseline_mean:.2f}%)" if a.improvement is not None and a.baseline_mean else ""
        spread = f"± {se:.6f} (1 SE, {a.improvement / se:.1f} SE)" if se else "no noise estimate"
        if interval is not None and interval.low is not None:
            spread += f"; {interval_text(interval.low, interval.high)}"
        cards.append(_card("improvement", signed(a.improvement) + rel, spread))
    else:
        cards.append(_card("best val_bpb", bpb(a.best_mean), "the baseline: nothing kept yet"))
    # "noise", not "noise σ": the cards' labels are upper-cased, and an upper-case σ is a sum.
    cards.append(_card("noise", f"σ {a.sigma:.6f}" if a.sigma is not None else "σ unknown",
                       "; ".join(filter(None, (sigma_basis(a) if a.sigma is not None else sigma_text(a),
                                               detectable_text(a))))))
    for r in tests:
        cards.append(_card(f"sealed test, {r.role}", bpb(r.test_bpb), f"{(r.commit or '')[:7]}: {r.note}"))
    if a.keep_rate is not None:
        uncounted = uncounted_text(a)
        cards.append(_card("keep rate", f"{100 * a.keep_rate:.0f}%",
                           f"{len(a.kept_candidates)} of {len(a.counted_candidates)} candidates"
                           + (f"; not counted: {uncounted}" if uncounted else "")))
    if a.trials_per_hour is not None:
        cards.append(_card("pace", f"{a.trials_per_hour:.1f} trials/h", f"over {duration(a.span_seconds)}"))
    cards.append(_card(f"{a.accelerator}-hours", f"{a.device_hours:.2f}", a.device_hours_basis))
    if a.slots_recorded:
        cards.append(_card("slots busy", percent(a.slots_busy_fraction),
                           f"{len(a.slots)} slot(s) over the run's {duration(a.run_span_seconds)}"))
    cards.append(_card("crashes", str(len(a.crashes)), f"{len(a.crash_groups())} kind(s)"))
    speed = throughput(a)
    if speed:
        tokens, mfu, run = speed
        cards.append(_card("throughput of the best", tokens, f"{mfu} · trial {run.id}"))

    plot = ""
    if png is not None and Path(png).is_file():
        data = base64.b64encode(Path(png).read_bytes()).decode()
        plot = (f'<img class="plot" alt="val_bpb of every trial" src="data:image/png;base64,{data}">'
                f'<p class="muted">Points: every measured trial. Green, labelled: kept. Step line: the running best. '
                f'Band: baseline mean ± {BAND_SIGMAS:g}σ. Red crosses along the bottom: crashes. Triangles at the top: '
                f'off the scale.</p>')

    kept = []
    for rank, k in enumerate(a.kept_changes, 1):
        t = k.trial
        kept.append(
            f"<li><b>{esc(signed(k.delta))}</b> bpb{esc(effect_uncertainty(k))} — trial {t.id} "
            f"<code>{esc(t.short_sha)}</code> "
            f"{esc(t.description)} <span class=muted>(val_bpb {bpb(k.mean)} "
            f"over {len(k.values)} run(s); best before "
            f"{bpb(k.mean_before)}; proposer {esc(t.proposer)})</span>"
            + (f"<details{' open' if rank <= 3 else ''}><summary>diff</summary>{diff_html(t.diff)}</details>" if t.diff else "")
            + "</li>")
    kept_html = f"<ol>{''.join(kept)}</ol>" if kept else "<p>No change has been kept yet.</p>"

    crashes = []
    for name, trials in a.crash_groups():
        items = "".join(f"<li>trial {t.id} <code>{esc(t.short_sha)}</code> {esc(t.description)}"
                        f"<div class=reason>{esc(crash_detail(t.reason))}</div></li>" for t in trials)
        crashes.append(f"<li><b>{esc(name)}</b> ({len(trials)})<ul>{items}</ul></li>")
    crash_html = f"<ul>{''.join(crashes)}</ul>" if crashes else "<p>No crashes.</p>"

    slots_html = slots_section(a)

    rows = []
    for t in a.trials:
        delta = a.delta_of(t) if t.kind == Kind.CANDIDATE else None
        secs = (t.ended_at - t.started_at) if t.ended_at else None
        why = t.decision.get("why", "") if isinstance(t.decision, dict) else ""
        note = reason_text(t) or (why if why != t.kind else "")
        if not t.sandboxed:
            note = f"[{UNSANDBOXED_NOTE}] {note}"
        rows.append(
            f"<tr><td class=num>{t.id}</td><td>{esc(t.kind)}</td><td><code>{esc(t.short_sha)}</code></td>"
            f'<td class="status {esc(t.status)}">{esc(t.status)}</td><td class=num>{bpb(t.val_bpb)}</td>'
            f"<td class=num>{signed(delta) if delta is not None else ''}</td><td class=num>{duration(secs)}</td>"
            f"<td>{esc(t.description)}<div class=reason>{esc(note)}</div></td></tr>")
    rule = cfg.get("decision", {})
    rule_text = ", ".join(f"{k} {v}" for k, v in rule.items())
    title = f"autoresearch report: {cfg.get('tag', '')}"
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
<title>{esc(title)}</title><style>{CSS}</style></head>
<body>
<h1>{esc(title)}</h1>
<div class="muted">workspace <code>{esc(a.ws.root)}</code> · branch <code>{esc(cfg.get('branch', '?'))}</code> ·
profile <code>{esc(cfg.get('profile', '?'))}</code>{f' · budget {budget:g}s' if budget else ''} ·
hardware {esc(a.hardware_text)} · generated {esc(time.strftime('%Y-%m-%d %H:%M:%S'))}</div>
{f'<p class="warning"><b>Warning</b>: {esc(unsandboxed_text(a))}</p>' if a.unsandboxed else ''}
<div class="cards">{''.join(cards)}</div>
<h2>Progress</h2>
{plot}
{slots_html}
<h2>Kept changes, by measured effect</h2>
<p class="muted">Effect: the gain the lab decided on, the mean val_bpb of the best the change was measured against
minus the change's own (positive is better), in bits per byte, with the 95% interval its decision recorded (in older
ledgers, its size in standard errors of that difference, σ·√(1/n<sub>before</sub> + 1/n<sub>change</sub>)).</p>
{kept_html}
<h2>Confirmation</h2>
<ul>{''.join(f"<li>{esc(line[2:] if line.startswith('- ') else line)}</li>" for line in confirmation_lines(a))}</ul>
<h2>Crashes, by reason</h2>
{crash_html}
<h2>All trials</h2>
<table><thead><tr><th>#</th><th>kind</th><th>commit</th><th>status</th><th>val_bpb</th><th>Δ vs best before</th>
<th>time</th><th>description / reason</th></tr></thead><tbody>
{''.join(rows)}
</tbody></table>
<h2>Settings</h2>
<p class="muted">decision rule: {esc(rule_text)}</p>
</body></html>
"""
