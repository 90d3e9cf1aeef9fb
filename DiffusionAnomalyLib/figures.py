"""Figures for reports, the demo and evaluation: key axial slices (input, counterfactual, heat, lesions, truth); FROC."""

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


def froc_png(path: str | Path, curves: list[dict], title: str = "", max_fp: float = 8.0) -> Path:
    """Write a FROC figure: lesion sensitivity against false candidates per volume, one line per curve.

    The dots are the thresholds themselves; they need not be monotonic (at IoU >= 0.2 a lower threshold
    can merge or grow candidates past a lesion). The line is their upper-left envelope: the best
    sensitivity some threshold reaches with at most x false candidates per volume.
    ``curves``: dicts with ``label``, ``fp`` and ``sensitivity`` (the points, in threshold order),
    ``operating_point`` (fp, sensitivity; a large circle), and optionally ``baseline`` (orange,
    else blue) and ``excluded`` (solid line, else dashed). The x axis runs from 0 to ``max_fp``; an
    operating point beyond it is drawn as an arrow at the edge with its value.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 5.4))
    off_axis = 0
    for n, curve in enumerate(curves):
        colour = ("tab:orange" if curve["baseline"] else "tab:blue") if "baseline" in curve else f"C{n}"
        fp_points, sens_points = np.asarray(curve["fp"], float), np.asarray(curve["sensitivity"], float)
        order = np.argsort(fp_points, kind="stable")
        ax.plot(fp_points, sens_points, linestyle="none", marker=".", markersize=4, color=colour, alpha=0.4)
        envelope_x = np.append(fp_points[order], max(max_fp, fp_points.max(initial=0.0)))
        envelope_y = np.maximum.accumulate(sens_points[order])
        if envelope_y.size:
            ax.plot(envelope_x, np.append(envelope_y, envelope_y[-1:]), "-" if curve.get("excluded") else "--",
                    drawstyle="steps-post", color=colour, label=curve["label"])
        fp, sens = curve["operating_point"]
        if fp <= max_fp:
            ax.plot([fp], [sens], marker="o", markersize=9, markerfacecolor="none", markeredgewidth=1.8,
                    color=colour, linestyle="none")
        else:  # off the axis: an arrow at the edge, with the number
            ax.plot([max_fp], [sens], marker=">", markersize=9, color=colour, linestyle="none", clip_on=False)
            ax.annotate(f"{fp:.1f}", (max_fp, sens), textcoords="offset points", xytext=(-8, 6 + 9 * off_axis),
                        ha="right", fontsize=7, color=colour)
            off_axis += 1
    ax.plot([], [], marker="o", markersize=8, markerfacecolor="none", color="gray", linestyle="none",
            label="default operating point")
    ax.set_xlim(0, max_fp)
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("false candidates per volume")
    ax.set_ylabel("lesion sensitivity")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.13), ncol=2, frameon=False)
    if title:
        ax.set_title(title, fontsize=8)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=100, format="png")
    plt.close(fig)
    return path
