"""The report's numbers as markdown: printed to the terminal and saved as report.md."""
from __future__ import annotations

import time

from autoresearch.lab.confirm import CONFIRMATION, Confirmation, summary
from autoresearch.lab.ledger import Trial
from autoresearch.lab.outcomes import Status
from autoresearch.lab.sealed import Role

from .data import (COUNTED, Analysis, KeptChange, SlotState, SlotView, crash_detail, detectable_text, duration,
                   mfu_text, percent, sigma_text, slot_now_text, tokens_per_second, unsandboxed_text)
from .plots import BAND_SIGMAS
from .sealed_results import TestResult

TERMINAL_DIFF_LINES = 30


def bpb(value: float | None) -> str:
    return f"{value:.6f}" if value is not None else "-"


def signed(value: float | None, digits: int = 6) -> str:
    return f"{value:+.{digits}f}" if value is not None else "-"


def interval_text(low: float | None, high: float | None) -> str:
    return f"95% interval {signed(low)} to {signed(high)}"


def noise_line(a: Analysis) -> str:
    """sigma with its df, and the smallest gain the rule can see at that noise."""
    hidden = detectable_text(a)
    return f"- **noise**: {sigma_text(a)}" + (f"; {hidden}" if hidden else "")


def headline(a: Analysis) -> list[str]:
    """Baseline, best, improvement and its uncertainty, and the noise: the lines a reader wants first."""
    if not a.baseline_values:
        return ["No baseline has finished yet.", noise_line(a)]
    n_b = len(a.baseline_values)
    lines = [f"- **baseline** `{(a.baseline_commit or '')[:7]}`: val_bpb **{bpb(a.baseline_mean)}** over {n_b} run(s)"]
    if a.best_commit and not a.best_is_baseline:
        imp, se, interval = a.improvement, a.improvement_se, a.improvement_interval
        rel = f" ({100 * imp / a.baseline_mean:.2f}%)" if imp is not None and a.baseline_mean else ""
        unc = (f" ± {se:.6f} (1 SE = σ·√(1/{n_b} + 1/{len(a.best_values)}); {imp / se:.1f} SE)" if se else
               " (uncertainty unknown: no σ)")
        if interval is not None and interval.low is not None:
            unc += f"; {interval_text(interval.low, interval.high)}"
        lines.append(f"- **best** `{a.best_commit[:7]}`: val_bpb **{bpb(a.best_mean)}** over "
                     f"{len(a.best_values)} run(s)")
        lines.append(f"- **improvement**: {signed(imp)} bpb{rel}{unc}")
    else:
        lines.append("- **best**: still the baseline (no change has been kept yet)")
    lines.append(noise_line(a))
    if a.unsandboxed:
        lines.append(f"- **WARNING**: {unsandboxed_text(a)}")
    return lines


def test_lines(results: list[TestResult]) -> list[str]:
    if not results:
        return ["- sealed test: nothing to score yet"]
    lines = []
    by_role = {r.role: r for r in results}
    for r in results:
        where = f" ({f'trial {r.trial_id}; ' if r.trial_id is not None else ''}{r.note})" if r.note else ""
        lines.append(f"- sealed test, {r.role} `{(r.commit or '')[:7]}`: "
                     f"{'**' + bpb(r.test_bpb) + '**' if r.test_bpb is not None else 'n/a'}{where}")
    base, best = by_role.get(Role.BASELINE), by_role.get(Role.BEST)
    if base and best and base.test_bpb is not None and best.test_bpb is not None:
        lines.append(f"- sealed test improvement: {signed(base.test_bpb - best.test_bpb)} bpb "
                     "(one checkpoint each: no error bar; compare with the val improvement above)")
    return lines


def uncounted_text(a: Analysis) -> str:
    """The finished candidates the keep rate leaves out, in words (`1 stopped, 2 empty`), or '': stopped
    or lost ones are run again, and an empty proposal tried nothing."""
    left_out = [x.status for x in a.candidates if x.status not in COUNTED and x.status != Status.RUNNING]
    return ", ".join(f"{left_out.count(s)} {s}" for s in Status if s in left_out)


def throughput(a: Analysis) -> tuple[str, str, Trial] | None:
    """How fast the best trains, from its latest kept run: (tokens/s, MFU, that run) in words."""
    run = a.best_run
    if run is None:
        return None
    speed = tokens_per_second(run)
    return (f"{speed:,.0f} tokens/s" if speed else "tokens/s not recorded",
            f"MFU {mfu_text(run.mfu_percent, a.on_cpu(run))}", run)


def pace_lines(a: Analysis) -> list[str]:
    kinds = a.kinds()
    kind_text = ", ".join(f"{n} {k}" for k, n in sorted(kinds.items(), key=lambda kv: -kv[1]))
    tally = ", ".join(f"{n} {status}" for status, n in a.tally())
    lines = [f"- trials: {len(a.trials)} ({kind_text}); status {tally}"]
    if a.keep_rate is not None:
        uncounted = uncounted_text(a)
        lines.append(f"- keep rate: {len(a.kept_candidates)}/{len(a.counted_candidates)} candidates "
                     f"({100 * a.keep_rate:.0f}%)" + (f"; not counted: {uncounted}" if uncounted else ""))
    if a.trials_per_hour is not None:
        lines.append(f"- pace: {a.trials_per_hour:.1f} trials per hour over {duration(a.span_seconds)}; "
                     f"{a.device_hours:.2f} {a.accelerator}-hours ({a.device_hours_basis}: "
                     f"{duration(a.device_hours * 3600)})")
    lines.extend(slot_lines(a))
    speed = throughput(a)
    if speed:
        tokens, mfu, run = speed
        lines.append(f"- throughput of the best: {tokens}, {mfu} (trial {run.id})")
    lines.append(f"- hardware: {a.hardware_text}")
    return lines


def run_started_text(a: Analysis) -> str:
    return time.strftime("%Y-%m-%d %H:%M", time.localtime(a.run_started)) if a.run_started else "its first trial"


def slot_facts(a: Analysis, slot: SlotView) -> str:
    """A slot's share of the run in words: how busy, what it finished, at what pace, in how many device-hours."""
    pace = f" ({slot.trials_per_hour:.1f} per hour)" if slot.trials_per_hour is not None else ""
    return (f"busy {percent(slot.busy_fraction)}, {len(slot.finished)} trial(s) finished{pace}, "
            f"{slot.device_hours:.2f} {a.accelerator}-hours")


def slot_lines(a: Analysis) -> list[str]:
    """Every slot of the latest run and its share of it, where the ledger records the run's slots (an older
    ledger does not: its trials ran one at a time, and the pace says it all)."""
    if not a.slots_recorded:
        return []
    lines = [f"- slots: {len(a.slots)}, busy {percent(a.slots_busy_fraction)} of the run's "
             f"{duration(a.run_span_seconds)} (since {run_started_text(a)})"]
    for slot in a.slots:
        now = "" if slot.state == SlotState.IDLE else f"; now {slot_now_text(a, slot)}"
        lines.append(f"  - slot {slot.index}, {slot.where}: {slot_facts(a, slot)}{now}")
    return lines


def effect_uncertainty(k: KeptChange) -> str:
    """A kept change's uncertainty: the interval its decision recorded, else (older ledgers) its size in SE."""
    if k.low is not None:
        return f", {interval_text(k.low, k.high)}"
    return f", {k.z:.1f} SE" if k.z is not None else ""


def kept_lines(a: Analysis, max_diff_lines: int | None) -> list[str]:
    if not a.kept_changes:
        return ["No change has been kept yet."]
    lines = []
    for rank, k in enumerate(a.kept_changes, 1):
        t = k.trial
        lines.append(f"{rank}. **{signed(k.delta)}** bpb{effect_uncertainty(k)} — trial {t.id} `{t.short_sha}` "
                     f"{t.description} "
                     f"(val_bpb {bpb(k.mean)} over {len(k.values)} run(s), "
                     f"best before {bpb(k.mean_before)})")
        diff = t.diff.rstrip("\n").splitlines()
        if diff:
            shown = diff if max_diff_lines is None else diff[:max_diff_lines]
            lines.append("")
            lines.append("   ```diff")
            lines.extend("   " + line for line in shown)
            if len(shown) < len(diff):
                lines.append(f"   ... {len(diff) - len(shown)} more line(s) in report.html")
            lines.append("   ```")
    return lines


def crash_lines(a: Analysis) -> list[str]:
    groups = a.crash_groups()
    if not groups:
        return ["No crashes."]
    lines = []
    for name, trials in groups:
        lines.append(f"- **{name}** ({len(trials)}): trials {', '.join(str(t.id) for t in trials)}")
        for t in trials[:3]:
            lines.append(f"  - {t.id} ({t.description[:60]}): {crash_detail(t.reason)[:160]}")
        if len(trials) > 3:
            lines.append(f"  - ... and {len(trials) - 3} more")
    return lines


def confirmation_lines(a: Analysis) -> list[str]:
    """The last confirmation of the best against the baseline, and the ablation of its kept changes."""
    stored = a.meta.get(CONFIRMATION)
    if not isinstance(stored, dict):
        return ["Not confirmed yet: `autoresearch confirm` runs the best and the baseline again under fresh seeds "
                "(`run` does so itself when it stops after --max-trials or --max-hours)."]
    try:
        result = Confirmation.from_dict(stored)
    except (KeyError, TypeError):
        return ["The stored confirmation cannot be read (written by another version)."]
    return [f"- {line.strip()}" for line in summary(result).splitlines()]


def markdown(a: Analysis, tests: list[TestResult], *, max_diff_lines: int | None = None) -> str:
    cfg = a.ws.config
    budget = a.time_budget
    out = [f"# autoresearch report: {cfg.get('tag', '?')}",
           "",
           f"Workspace `{a.ws.root}`, branch `{cfg.get('branch', '?')}`, profile `{cfg.get('profile', '?')}`"
           + (f", {budget:g}s training budget" if budget else "")
           + f", rule `{cfg.get('decision', {}).get('name', '?')}`. Generated {time.strftime('%Y-%m-%d %H:%M:%S')}.",
           "",
           "## Result",
           *headline(a),
           *test_lines(tests),
           "",
           "## Run",
           *pace_lines(a),
           "",
           "## Kept changes, by measured effect",
           "",
           "Effect = the gain the lab decided on: mean val_bpb of the best it was measured against minus the "
           "change's own (positive is better), in bits per byte, with the 95% interval of its decision (in "
           "older ledgers, its size in standard errors).",
           "",
           *kept_lines(a, max_diff_lines),
           "",
           "## Confirmation",
           "",
           "The best and the baseline run again under seeds neither had run; the gain from those runs alone, and the "
           "best with each kept change undone alone (positive: the change helps).",
           "",
           *confirmation_lines(a),
           "",
           "## Crashes, by reason",
           *crash_lines(a),
           "",
           f"The plot's band is the baseline mean ± {BAND_SIGMAS:g}σ.",
           ]
    return "\n".join(out) + "\n"
