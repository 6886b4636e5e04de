"""The loss curve of one train.py run, from its log (the `train step=...` progress lines).

    python bench/plot_train_log.py RUN_LOG OUT.png [--title TEXT]

Plots the smoothed training loss against counted training time, with the learning-rate multiplier
on a second axis; the summary block's val_bpb goes into the title when the log has one.
"""
import argparse
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from autoresearch.lab.trial import parse_summary  # noqa: E402
from autoresearch.report.data import parse_progress_line  # noqa: E402


def read_log(path):
    """The progress points of a train.py log and its summary block, parsed as the lab and report do."""
    text = Path(path).read_text(errors="replace")
    points = [p for p in map(parse_progress_line, text.splitlines()) if p and p.get("loss") is not None]
    return points, parse_summary(text)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("log")
    ap.add_argument("out")
    ap.add_argument("--title", default="train.py")
    args = ap.parse_args()
    points, summary = read_log(args.log)
    if not points:
        raise SystemExit(f"{args.log}: no `train step=` lines")
    budget = summary.get("training_seconds", 100.0)
    seconds = [p["progress_pct"] / 100 * budget for p in points]
    loss, lrm = [p["loss"] for p in points], [p["lrm"] for p in points]
    fig, ax = plt.subplots(figsize=(8, 4.5))
    ax.plot(seconds, loss, color="tab:blue", label="training loss (smoothed)")
    ax.set_xlabel("training seconds (the lab's clock)")
    ax.set_ylabel("training loss, nats per token")
    ax.set_ylim(bottom=min(loss) * 0.9, top=min(max(loss), 10))
    ax.grid(alpha=0.3)
    lr_ax = ax.twinx()
    lr_ax.plot(seconds, lrm, color="tab:orange", alpha=0.6, label="learning-rate multiplier")
    lr_ax.set_ylabel("learning-rate multiplier")
    lr_ax.set_ylim(0, 1.05)
    title = args.title
    if "val_bpb" in summary:
        title += f": val_bpb {summary['val_bpb']:.4f} after {summary.get('num_steps', points[-1]['step']):.0f} steps"
    ax.set_title(title)
    lines = ax.get_lines() + lr_ax.get_lines()
    ax.legend(lines, [line.get_label() for line in lines], loc="upper right")
    fig.tight_layout()
    fig.savefig(args.out, dpi=110)
    print(f"wrote {args.out} ({len(points)} points)")


if __name__ == "__main__":
    main()
