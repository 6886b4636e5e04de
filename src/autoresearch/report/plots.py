"""progress.png: every trial's val_bpb against its trial number, the way a researcher reads a run.

- every measured trial is a point: baseline seeds blue, discarded candidates grey, reruns, the
  best or the baseline measured again (drift checks, confirmations) and ablations as hollow
  markers, kept candidates green, larger, and labelled with their description;
- the running best (the lab's best as it stood after each trial: the mean of the best commit's runs)
  is a step line;
- the noise band is the baseline mean +- 2 sigma, sigma being the lab's noise estimate (pooled over
  every commit run more than once, lab.noise);
- crashes have no val_bpb: they are red crosses on a row of their own along the bottom;
- trials far worse than the baseline are clipped to the top edge (a triangle) so that the
  interesting range stays readable.

Drawn with matplotlib's object API on an Agg canvas: no pyplot, no global backend switch.
"""
from __future__ import annotations

import textwrap
from pathlib import Path

from autoresearch.lab.outcomes import Kind, Status

from .data import Analysis

BAND_SIGMAS = 2.0
COLORS = {"baseline": "#1f77b4", "keep": "#2ca02c", "discard": "#9e9e9e", "crash": "#d62728", "best": "#2ca02c",
          Kind.RERUN: "#7f7f7f", Kind.DRIFT: "#9467bd", Kind.CONFIRM: "#9467bd", Kind.ABLATION: "#8c564b",
          "band": "#1f77b4"}
# Runs that decide nothing by themselves (a candidate's reruns, the best or the baseline measured again, the
# best without one of its changes): hollow markers.
HOLLOW = (Kind.RERUN, Kind.DRIFT, Kind.CONFIRM, Kind.ABLATION)


def _limits(a: Analysis, values: list[float]) -> tuple[float, float]:
    """A y range around the interesting part: the best, the baseline and its noise band."""
    interesting = list(a.baseline_values) + [v for v in a.running_best.values() if v is not None]
    if a.sigma and a.baseline_mean is not None:
        interesting += [a.baseline_mean - BAND_SIGMAS * a.sigma, a.baseline_mean + BAND_SIGMAS * a.sigma]
    interesting += [x.val_bpb for x in a.trials if x.status == Status.KEEP and x.val_bpb is not None]
    if not interesting:
        interesting = values
    lo, hi = min(interesting + [min(values)]), max(interesting)
    span = max(hi - lo, 1e-4, abs(hi) * 1e-4)
    # Room above for candidates a little worse than the baseline; beyond that, clip.
    top = max(hi + 0.15 * span, min(max(values), hi + 0.6 * span))
    bottom = lo - 0.18 * span  # room for the crash row
    return bottom, top + 0.08 * span


def render_progress(a: Analysis, path: Path, *, title: str | None = None, dpi: int = 150) -> Path:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    fig = Figure(figsize=(13, 6.5), dpi=dpi)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    measured = [x for x in a.trials if x.val_bpb is not None]
    ids = [x.id for x in a.trials]
    if not measured:
        ax.text(0.5, 0.5, "no measured trials yet", ha="center", va="center", transform=ax.transAxes, fontsize=14)
        ax.set_axis_off()
        fig.savefig(path)
        return path

    values = [x.val_bpb for x in measured]
    bottom, top = _limits(a, values)
    span = top - bottom
    crash_y = bottom + 0.04 * span
    ax.set_ylim(bottom, top)
    xmax = max(ids) if ids else 1
    ax.set_xlim(0.3, xmax + 0.7 + max(1, xmax * 0.02))

    # noise band around the baseline
    if a.baseline_mean is not None:
        ax.axhline(a.baseline_mean, color=COLORS["band"], lw=1, ls="--", alpha=0.7, zorder=1)
        if a.sigma:
            ax.axhspan(a.baseline_mean - BAND_SIGMAS * a.sigma, a.baseline_mean + BAND_SIGMAS * a.sigma,
                       color=COLORS["band"], alpha=0.10, lw=0, zorder=0)

    # the running best as a step line
    steps = [(i, v) for i, v in sorted(a.running_best.items()) if v is not None]
    if steps:
        xs = [i for i, _ in steps] + [xmax + 0.5]
        ys = [v for _, v in steps] + [steps[-1][1]]
        ax.step(xs, ys, where="post", color=COLORS["best"], lw=2, alpha=0.9, zorder=2)

    def clip(v):
        return min(v, top - 0.02 * span)

    clipped = 0
    for x in measured:
        y = clip(x.val_bpb)
        off = x.val_bpb > top - 0.02 * span
        clipped += off
        marker = "^" if off else "o"
        if x.kind == Kind.BASELINE:
            ax.scatter([x.id], [y], s=42, color=COLORS["baseline"], marker=marker, zorder=4, edgecolors="white", lw=0.6)
        elif x.kind in HOLLOW:
            color = COLORS["keep"] if (x.status == Status.KEEP and x.kind == Kind.RERUN) else COLORS[x.kind]
            ax.scatter([x.id], [y], s=36, facecolors="none", edgecolors=color, marker=marker, lw=1.4, zorder=4)
        elif x.status == Status.KEEP:
            ax.scatter([x.id], [y], s=90, color=COLORS["keep"], marker=marker, zorder=5, edgecolors="black", lw=0.8)
        else:
            ax.scatter([x.id], [y], s=26, color=COLORS["discard"], marker=marker, zorder=3, alpha=0.9)

    # labels of the kept changes: beside their point, moved along until they overlap no other label
    kept = [x for x in a.kept_candidates if x.val_bpb is not None]
    renderer = fig.canvas.get_renderer()
    placed = []
    for x in kept:
        label = textwrap.shorten(x.description, 48, placeholder="...")
        offsets = ((8, 10), (8, -18), (8, 24), (8, -32), (8, 38), (8, -46), (8, 52))
        for n, (dx, dy) in enumerate(offsets):
            note = ax.annotate(label, (x.id, clip(x.val_bpb)), xytext=(dx, dy), textcoords="offset points",
                               fontsize=8, color="#1b5e20", zorder=6,
                               arrowprops={"arrowstyle": "-", "color": "#1b5e20", "lw": 0.5, "alpha": 0.6},
                               bbox={"boxstyle": "round,pad=0.15", "fc": "white", "ec": "none", "alpha": 0.8})
            box = note.get_window_extent(renderer).expanded(1.02, 1.1)
            if n == len(offsets) - 1 or not any(box.overlaps(other) for other in placed):
                break
            note.remove()
        placed.append(box)

    # crashes on a row of their own (a stopped or lost trial is no crash: it is run again)
    crashes = [x.id for x in a.crashes]
    if crashes:
        ax.axhline(crash_y, color=COLORS["crash"], lw=0.5, alpha=0.3, zorder=1)
        ax.scatter(crashes, [crash_y] * len(crashes), marker="x", s=40, color=COLORS["crash"], zorder=4, lw=1.6)
        ax.text(0.005, crash_y, " crashes", transform=ax.get_yaxis_transform(), va="bottom", ha="left",
                fontsize=8, color=COLORS["crash"])

    # the trial in flight (not a row a dead lab left running)
    for x in a.live_running:
        ax.axvline(x.id, color="#ff9800", lw=1, ls=":", zorder=1)

    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("trial")
    ax.set_ylabel("val_bpb (lower is better)")
    ax.grid(True, alpha=0.25)
    sig = f"{a.sigma:.2g}, {a.sigma_df} df" if a.sigma else "n/a"
    handles = [
        Line2D([], [], marker="o", ls="", color=COLORS["baseline"], label=f"baseline seeds ({len(a.baseline_values)})"),
        Line2D([], [], marker="o", ls="", color=COLORS["keep"], mec="black", ms=8,
               label=f"kept ({len(a.kept_candidates)})"),
        Line2D([], [], marker="o", ls="", color=COLORS["discard"],
               label=f"discarded ({sum(x.kind == Kind.CANDIDATE and x.status == Status.DISCARD for x in a.trials)})"),
        Line2D([], [], marker="o", ls="", mfc="none", color=COLORS[Kind.RERUN], label="rerun"),
        Line2D([], [], marker="o", ls="", mfc="none", color=COLORS[Kind.DRIFT], label="best or baseline again"),
        Line2D([], [], color=COLORS["best"], lw=2, label="running best"),
        Patch(color=COLORS["band"], alpha=0.15, label=f"baseline mean ± {BAND_SIGMAS:g}σ (σ = {sig})"),
        Line2D([], [], marker="x", ls="", color=COLORS["crash"], label=f"crash ({len(a.crashes)})"),
    ]
    if any(x.kind == Kind.ABLATION for x in measured):
        handles.append(Line2D([], [], marker="o", ls="", mfc="none", color=COLORS[Kind.ABLATION],
                              label="best without one kept change"))
    if clipped:
        handles.append(Line2D([], [], marker="^", ls="", color="#616161", label=f"off scale ({clipped})"))
    ax.legend(handles=handles, loc="upper right", fontsize=8, framealpha=0.9, ncol=2)
    if title is None:
        cfg = a.ws.config
        best = f"best {a.best_mean:.6f}" if a.best_mean is not None else "no best yet"
        base = f"baseline {a.baseline_mean:.6f}" if a.baseline_mean is not None else "no baseline yet"
        title = (f"autoresearch {cfg.get('tag', '')} · profile {cfg.get('profile', '?')} · "
                 f"{len(a.trials)} trials · {base} → {best}")
    ax.set_title(title, fontsize=11)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    fig.savefig(tmp, format="png")
    tmp.replace(path)
    return path
