"""The report's figures: quality against size (KLD and PPL, markers by kind of variant, the Pareto front),
generation speed against size, and the fine-tuning loss. Each takes the report's table rows (metric_table names,
plus `variant` and `kind`) and writes one PNG; matplotlib loads inside the functions."""
from __future__ import annotations

from pathlib import Path

KINDS = {  # variants.Kind → (marker, colour, legend); base is drawn apart
    "plain": ("o", "tab:blue", "llama.cpp level"),
    "imatrix": ("^", "tab:green", "level + imatrix"),
    "i-quant": ("D", "tab:purple", "i-quant + imatrix"),
    "autoround": ("P", "tab:orange", "level rounded by AutoRound"),
    "gptq": ("X", "tab:brown", "level rounded by GPTQ"),
    "recipe": ("*", "tab:red", "recipe / searched"),
    "reference": ("s", "black", "finetuned (reference)"),
}


def error_bars(rows: list[dict], key: str) -> list[list[float]]:
    """matplotlib's (below, above) distances from each row's value to its interval's ends (0 where it has none)."""
    lows, highs = [], []
    for r in rows:
        lo, hi = r.get("ci", {}).get(key, (r[key], r[key]))
        lows.append(max(0.0, r[key] - lo))
        highs.append(max(0.0, hi - r[key]))
    return [lows, highs]


def pareto(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """The points no other point beats on both size and the quality loss (lower is better for both)."""
    front, best = [], float("inf")
    for x, y in sorted(points):
        if y < best:
            front.append((x, y))
            best = y
    return front


def quality(rows: list[dict], path: Path) -> None:
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.6))
    for ax, key, label in ((axes[0], "kld_mean", "mean KLD vs finetuned"), (axes[1], "ppl", "response PPL")):
        for k, (marker, colour, legend) in KINDS.items():
            mine = [r for r in rows if r["kind"] == k]
            if mine:
                ax.errorbar([r["size_mb"] for r in mine], [r[key] for r in mine], yerr=error_bars(mine, key),
                            fmt=marker, color=colour, label=legend, ms=9 if marker == "*" else 5, capsize=2, lw=0.8)
        front = pareto([(r["size_mb"], r[key]) for r in rows if r["kind"] != "base"])
        ax.plot(*zip(*front, strict=True), color="tab:orange", lw=1, label="Pareto front")
        for r in rows:
            if r["kind"] == "base":
                ax.errorbar([r["size_mb"]], [r[key]], yerr=error_bars([r], key), fmt="x", color="tab:gray",
                            label="base", capsize=2, lw=0.8)
            ax.annotate(r["variant"], (r["size_mb"], r[key]), fontsize=7, xytext=(3, 3), textcoords="offset points")
        if key == "kld_mean":
            ax.set_yscale("symlog", linthresh=1e-4)
        ax.set_xlabel("GGUF size (MB)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle("Quality against size (lower-left is better; bars: 95% intervals over records)")
    fig.tight_layout()
    save(fig, path)


def speed(rows: list[dict], hf: dict, path: Path) -> None:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    ax.errorbar([r["size_mb"] for r in rows], [r["gen_tps"] for r in rows], yerr=error_bars(rows, "gen_tps"),
                fmt="o", color="tab:green", capsize=2, lw=0.8, label="llama-cpp-python (bars: range of runs)")
    for r in rows:
        ax.annotate(r["variant"], (r["size_mb"], r["gen_tps"]), fontsize=7, xytext=(3, 3), textcoords="offset points")
    if "gen_tps" in hf:  # skipped where the fp32 model does not fit
        ax.axhline(hf["gen_tps"], color="tab:red", ls="--", lw=1,
                   label=f"transformers fp32 ({hf['gen_tps']:.1f} tok/s)")
    ax.set_xlabel("GGUF size (MB)")
    ax.set_ylabel(f"generation tok/s ({hf['threads']} threads)")
    ax.set_title("Generation speed against size (llama-cpp-python)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    save(fig, path)


def loss(series: dict[str, list[tuple[float, float]]], path: Path) -> None:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    for name, pts in series.items():
        ax.plot(*zip(*sorted(pts), strict=True), label=name, marker="." if len(pts) < 30 else None)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title("Fine-tuning loss")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    save(fig, path)


def save(fig, path: Path) -> None:
    import matplotlib.pyplot as plt

    fig.savefig(path, dpi=110)
    plt.close(fig)
