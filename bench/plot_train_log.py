"""The loss curve of one train.py run, from its log (the `train step=...` progress lines).

    python bench/plot_train_log.py RUN_LOG OUT.png [--title TEXT]

Plots the smoothed training loss against counted training time, with the learning-rate multiplier
on a second axis; the summary block's val_bpb goes into the title when the log has one.
"""
import argparse
import re
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

LINE = re.compile(r"^train step=(\d+) progress_pct=([\d.]+) loss=([\d.]+) lrm=([\d.]+)")


def read_log(path):
    steps, progress, loss, lrm = [], [], [], []
    summary = {}
    for line in Path(path).read_text().splitlines():
        m = LINE.match(line)
        if m:
            steps.append(int(m[1]))
            progress.append(float(m[2]))
            loss.append(float(m[3]))
            lrm.append(float(m[4]))
        elif re.match(r"^\w+:\s+\S+$", line):
            key, value = line.split(":", 1)
            summary[key] = value.strip()
    return steps, progress, loss, lrm, summary


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("log")
    ap.add_argument("out")
    ap.add_argument("--title", default="train.py")
    args = ap.parse_args()
    steps, progress, loss, lrm, summary = read_log(args.log)
    if not steps:
        raise SystemExit(f"{args.log}: no `train step=` lines")
    budget = float(summary.get("training_seconds", 100.0))
    seconds = [p / 100 * budget for p in progress]
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
        title += f": val_bpb {float(summary['val_bpb']):.4f} after {summary.get('num_steps', steps[-1])} steps"
    ax.set_title(title)
    lines = ax.get_lines() + lr_ax.get_lines()
    ax.legend(lines, [line.get_label() for line in lines], loc="upper right")
    fig.tight_layout()
    fig.savefig(args.out, dpi=110)
    print(f"wrote {args.out} ({len(steps)} points)")


if __name__ == "__main__":
    main()
