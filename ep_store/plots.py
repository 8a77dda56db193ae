"""Plots for the reports (matplotlib, Agg backend, PNG files). Pure: data in, file out."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def _save(fig, path: Path) -> str:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path.name


def saturation_curve(tokens, regions, new_regions, path: Path, title: str) -> str:
    fig, ax = plt.subplots(figsize=(6, 3.2))
    ax.plot(tokens, regions, marker="o", ms=3, label="regions")
    ax2 = ax.twinx()
    ax2.bar(tokens, new_regions, width=(tokens[0] if len(tokens) else 1) * 0.6, alpha=0.3, color="C1",
            label="new per batch")
    ax.set_xlabel("tokens streamed")
    ax.set_ylabel("regions")
    ax2.set_ylabel("new regions per batch")
    ax.set_title(title)
    return _save(fig, path)


def size_histogram(sizes, path: Path, title: str) -> str:
    fig, ax = plt.subplots(figsize=(6, 3.2))
    sizes = np.asarray(sizes)
    if sizes.size:
        bins = np.unique(np.logspace(0, np.log10(max(sizes.max(), 2)), 30).astype(int))
        ax.hist(sizes, bins=bins)
        ax.set_xscale("log")
        ax.set_yscale("log")
    ax.set_xlabel("tokens in region")
    ax.set_ylabel("regions")
    ax.set_title(title)
    return _save(fig, path)


def bar_histogram(left_edges, counts, width: float, path: Path, title: str, xlabel: str, ylabel: str,
                  vline: float | None = None) -> str:
    fig, ax = plt.subplots(figsize=(6, 3.2))
    ax.bar(left_edges, counts, width=width, align="edge")
    if vline is not None:
        ax.axvline(vline, color="C3", ls="--", label=f"{vline:.3g}")
        ax.legend()
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    return _save(fig, path)


def lines(x, series: dict[str, list], path: Path, title: str, xlabel: str, ylabel: str,
          styles: dict[str, dict] | None = None) -> str:
    fig, ax = plt.subplots(figsize=(6, 3.2))
    for name, ys in series.items():
        ax.plot(x, ys, label=name, **(styles or {}).get(name, {"marker": "o"}))
    ax.legend()
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    return _save(fig, path)
