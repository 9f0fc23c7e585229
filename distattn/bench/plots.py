"""PNG plots of ``distattn bench`` results (matplotlib, headless)."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path


def plot_results(rows: list[dict], out: Path) -> list[Path]:
    """time_vs_seq_len.png, tflops_vs_world_size.png and imbalance.png; [] without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    written = []
    masks = sorted({r["mask"] for r in rows})
    world = max(r["world_size"] for r in rows)
    longest = max(r["seq_len"] for r in rows)

    def lines(ax, x_key, y_key, pick):
        series = defaultdict(list)
        for r in rows:
            if pick(r):
                series[r["scheduler"]].append((r[x_key], r[y_key]))
        for name, pts in sorted(series.items()):
            pts.sort()
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=name)
        ax.set_xscale("log", base=2)
        ax.grid(alpha=0.3)

    for fname, x_key, y_key, pick, xlabel, ylabel in (
            ("time_vs_seq_len.png", "seq_len", "fwd_bwd_ms", lambda r, m: r["mask"] == m and r["world_size"] == world,
             "sequence length (tokens)", f"fwd+bwd ms, {world} ranks"),
            ("tflops_vs_world_size.png", "world_size", "tflops", lambda r, m: r["mask"] == m and r["seq_len"] == longest,
             "world size", f"TFLOP/s (all ranks), {longest} tokens")):
        fig, axes = plt.subplots(1, len(masks), figsize=(4 * len(masks), 3.6), squeeze=False)
        for ax, mask in zip(axes[0], masks):
            lines(ax, x_key, y_key, lambda r, m=mask: pick(r, m))
            ax.set_title(mask)
            ax.set_xlabel(xlabel)
        axes[0][0].set_ylabel(ylabel)
        axes[0][-1].legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(out / fname, dpi=110)
        plt.close(fig)
        written.append(out / fname)

    fig, ax = plt.subplots(figsize=(1.2 * len(masks) + 4, 3.6))
    names = sorted({r["scheduler"] for r in rows if r["world_size"] == world})
    width = 0.8 / max(1, len(names))
    for i, name in enumerate(names):
        vals = [max((r["flops_imbalance"] for r in rows if r["scheduler"] == name and r["mask"] == m
                     and r["world_size"] == world), default=0.0) for m in masks]
        ax.bar([j + i * width for j in range(len(masks))], vals, width, label=name)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(masks))], masks)
    ax.set_ylabel(f"attention FLOPs max/mean, {world} ranks")
    ax.axhline(1.0, color="k", lw=0.5)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "imbalance.png", dpi=110)
    plt.close(fig)
    written.append(out / "imbalance.png")
    return written
