"""Figures for reports and the demo: a few axial slices of input, counterfactual, heat, lesions, truth."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def key_slices(labels: np.ndarray, truth: np.ndarray | None = None, count: int = 4) -> list[int]:
    """Axial slices (k) through the largest lesions (predicted, then ground truth), else evenly spaced."""
    chosen: list[int] = []
    for lab in (truth, labels):
        if lab is None:
            continue
        ids, sizes = np.unique(lab[lab > 0], return_counts=True)
        for i in ids[np.argsort(-sizes)]:
            k = int(np.round(np.mean(np.nonzero(lab == i)[0])))
            if all(abs(k - c) > 2 for c in chosen):
                chosen.append(k)
            if len(chosen) >= count:
                return sorted(chosen)
    n = labels.shape[0]
    extra = [int(v) for v in np.linspace(n * 0.2, n * 0.8, count)]
    for k in extra:
        if len(chosen) >= count:
            break
        if all(abs(k - c) > 2 for c in chosen):
            chosen.append(k)
    return sorted(chosen)


def overview_png(path: str | Path, image: np.ndarray, counterfactual: np.ndarray | None, heat: np.ndarray,
                 labels: np.ndarray, truth: np.ndarray | None = None, slices: list[int] | None = None,
                 title: str = "", vmax: float | None = None, aspect: float = 1.0) -> Path:
    """Write a PNG grid: one column per key slice; rows input, counterfactual, heat map, lesions (+ truth).

    Arrays are [k, j, i] on the same grid; slices are shown as stored (for DICOM-ordered axial data
    that is the radiological view, patient left on the right). ``aspect`` = row / column spacing.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    slices = slices or key_slices(labels, truth)
    vmax = vmax or float(np.percentile(image, 99.5)) or 1.0
    hmax = float(heat.max()) or 1.0
    rows = [("input", image, "gray_r", 0, vmax)]
    if counterfactual is not None:
        rows.append(("counterfactual", counterfactual, "gray_r", 0, vmax))
    rows.append(("heat map", heat, "inferno", 0, hmax))
    rows.append(("lesions (red) / truth (green)" if truth is not None else "lesions", image, "gray_r", 0, vmax))
    fig, axes = plt.subplots(len(rows), len(slices), figsize=(2.6 * len(slices), 2.6 * len(rows)), squeeze=False)
    for c, k in enumerate(slices):
        for r, (name, arr, cmap, lo, hi) in enumerate(rows):
            ax = axes[r, c]
            ax.imshow(arr[k], cmap=cmap, vmin=lo, vmax=hi, aspect=aspect, interpolation="nearest")
            if r == len(rows) - 1:
                if labels[k].any():
                    ax.contour(labels[k] > 0, levels=[0.5], colors="red", linewidths=1.0)
                if truth is not None and truth[k].any():
                    ax.contour(truth[k] > 0, levels=[0.5], colors="lime", linewidths=0.8, linestyles="dashed")
            ax.set_xticks([])
            ax.set_yticks([])
            if c == 0:
                ax.set_ylabel(name, fontsize=8)
            if r == 0:
                ax.set_title(f"slice k={k}", fontsize=8)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path
