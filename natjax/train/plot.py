"""PNG of the training curves (loss and accuracy) from metrics.jsonl."""

from __future__ import annotations

from pathlib import Path

from natjax.train.metrics import read_jsonl


def plot_metrics(jsonl: str | Path, out_png: str | Path) -> Path:
    """Draws train/eval loss and accuracy against the step.

    Args:
      jsonl: the run's metrics.jsonl (the last record per (split, step) wins after resumes).
      out_png: output image path.

    Returns:
      The PNG path.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    latest: dict[tuple[str, int], dict] = {}
    for rec in read_jsonl(jsonl):
        latest[(rec["split"], rec["step"])] = rec
    series: dict[str, list[dict]] = {}
    for (split, _), rec in sorted(latest.items(), key=lambda kv: kv[0][1]):
        series.setdefault(split, []).append(rec)

    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(11, 4))
    for split, key_acc in (("train", "accuracy"), ("eval", "top1")):
        recs = series.get(split, [])
        if not recs:
            continue
        steps = [r["step"] for r in recs]
        ax_loss.plot(
            steps,
            [r["loss"] for r in recs],
            label=f"{split} loss",
            marker="." if split == "eval" else None,
        )
        ax_acc.plot(
            steps,
            [r[key_acc] for r in recs],
            label=f"{split} {'top-1' if split == 'eval' else 'acc (batch)'}",
            marker="." if split == "eval" else None,
        )
    ax_loss.set(xlabel="step", ylabel="cross-entropy", title="loss")
    ax_acc.set(xlabel="step", ylabel="accuracy", title="accuracy", ylim=(0, 1))
    for ax in (ax_loss, ax_acc):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    out_png = Path(out_png)
    fig.savefig(out_png, dpi=100)
    plt.close(fig)
    return out_png
