"""The report's numbers as markdown: printed to the terminal and saved as report.md."""
from __future__ import annotations

import time

from .data import Analysis, crash_detail, duration
from .plots import BAND_SIGMAS
from .testeval import TestResult

TERMINAL_DIFF_LINES = 30


def bpb(value: float | None) -> str:
    return f"{value:.6f}" if value is not None else "-"


def signed(value: float | None, digits: int = 6) -> str:
    return f"{value:+.{digits}f}" if value is not None else "-"


def headline(a: Analysis) -> list[str]:
    """Baseline, best, improvement and its uncertainty: the lines a reader wants first."""
    lines = []
    if not a.baseline_values:
        return ["No baseline has finished yet."]
    n_b = len(a.baseline_values)
    sig = f"σ = {a.sigma:.6f} (spread of the {n_b} baseline seeds)" if a.sigma is not None else \
        "σ unknown (a single baseline run: no noise estimate)"
    lines.append(f"- **baseline** `{(a.baseline_commit or '')[:7]}`: val_bpb **{bpb(a.baseline_mean)}** over {n_b} run(s); "
                 f"noise floor {sig}")
    if a.best_commit and a.best_commit != a.baseline_commit:
        imp, se = a.improvement, a.improvement_se
        rel = f" ({100 * imp / a.baseline_mean:.2f}%)" if imp is not None and a.baseline_mean else ""
        unc = f" ± {se:.6f} (1 SE = σ·√(1/{n_b} + 1/{len(a.best_values)}); {imp / se:.1f} SE)" if se else \
            " (uncertainty unknown: no σ)"
        lines.append(f"- **best** `{a.best_commit[:7]}`: val_bpb **{bpb(a.best_mean)}** over {len(a.best_values)} run(s)")
        lines.append(f"- **improvement**: {signed(imp)} bpb{rel}{unc}")
    else:
        lines.append("- **best**: still the baseline (no change has been kept yet)")
    return lines


def test_lines(results: list[TestResult]) -> list[str]:
    if not results:
        return ["- sealed test: nothing to evaluate yet"]
    lines = []
    by_role = {r.role: r for r in results}
    for r in results:
        where = f" (trial {r.trial_id}; {r.note})" if r.note else ""
        lines.append(f"- sealed test, {r.role} `{(r.commit or '')[:7]}`: "
                     f"{'**' + bpb(r.test_bpb) + '**' if r.test_bpb is not None else 'n/a'}{where}")
    base, best = by_role.get("baseline"), by_role.get("best")
    if base and best and base.test_bpb is not None and best.test_bpb is not None:
        lines.append(f"- sealed test improvement: {signed(base.test_bpb - best.test_bpb)} bpb "
                     "(one checkpoint each: no error bar; compare with the val improvement above)")
    return lines


def pace_lines(a: Analysis) -> list[str]:
    counts, kinds = a.counts(), a.kinds()
    kind_text = ", ".join(f"{n} {k}" for k, n in sorted(kinds.items(), key=lambda kv: -kv[1]))
    lines = [f"- trials: {len(a.trials)} ({kind_text}); status {counts['keep']} keep, {counts['discard']} discard, "
             f"{counts['crash']} crash" + (f", {counts['running']} running" if counts["running"] else "")]
    if a.keep_rate is not None:
        lines.append(f"- keep rate: {len(a.kept_candidates)}/{len(a.finished_candidates)} candidates "
                     f"({100 * a.keep_rate:.0f}%)")
    if a.trials_per_hour is not None:
        lines.append(f"- pace: {a.trials_per_hour:.1f} trials per hour over {duration(a.span_seconds)}; "
                     f"{a.compute_seconds / 3600:.2f} {a.accelerator}-hours (sum of trial wall times: "
                     f"{duration(a.compute_seconds)})")
    lines.append(f"- hardware: {a.hardware_text}")
    return lines


def kept_lines(a: Analysis, max_diff_lines: int | None) -> list[str]:
    if not a.kept_changes:
        return ["No change has been kept yet."]
    lines = []
    for rank, k in enumerate(a.kept_changes, 1):
        t = k.trial
        z = f", {k.z:.1f} SE" if k.z is not None else ""
        lines.append(f"{rank}. **{signed(k.delta)}** bpb{z} — trial {t.id} `{t.short_sha}` {t.description} "
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
           "Effect = mean val_bpb of the best before the change minus the change's own (positive is better), "
           "in bits per byte and in standard errors of that difference.",
           "",
           *kept_lines(a, max_diff_lines),
           "",
           "## Crashes, by reason",
           *crash_lines(a),
           "",
           f"The plot's band is the baseline mean ± {BAND_SIGMAS:g}σ.",
           ]
    return "\n".join(out) + "\n"
