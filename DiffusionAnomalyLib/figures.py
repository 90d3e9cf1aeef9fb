"""Figures for reports, the demo and evaluation: key axial slices (input, counterfactual, heat, lesions, truth)
with the classifier's per-slice confidence; FROC; methods side by side with their metric table; sweep grids.

Colours: the Okabe-Ito palette (:data:`OKABE_ITO`) for lines and contours, perceptually uniform colour maps
for values, so the figures read the same with colour-vision deficiency.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

#: Okabe & Ito's colour-blind-safe palette: blue, orange, bluish green, reddish purple, sky blue, vermillion,
#: yellow, black (lines of several methods take them in this order).
OKABE_ITO: tuple[str, ...] = ("#0072B2", "#E69F00", "#009E73", "#CC79A7", "#56B4E9", "#D55E00", "#F0E442", "#000000")


def _pyplot():
    """matplotlib's pyplot on the non-interactive Agg backend (figures are written to files only)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: str | Path, dpi: int) -> Path:
    path = Path(path)
    fig.savefig(path, dpi=dpi, format="png")
    _pyplot().close(fig)
    return path


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
                 title: str = "", vmax: float | None = None, aspect: float = 1.0,
                 confidence: np.ndarray | None = None, confidence_unhealthy: np.ndarray | None = None,
                 vmin: float = 0.0, image_cmap: str = "gray_r") -> Path:
    """Write a PNG grid: one column per key slice; rows input, counterfactual, heat map, lesions (+ truth).

    Arrays are [k, j, i] on the same grid; slices are shown as stored (for DICOM-ordered axial data
    that is the radiological view, patient left on the right). ``aspect`` = row / column spacing.
    ``confidence``: the guidance classifier's p(unhealthy) per model slice (inferior to superior;
    NaN where not computed), drawn as a curve in a panel below; ``confidence_unhealthy`` (bool per
    model slice) marks the slices the ground truth calls unhealthy. ``vmin``..``vmax`` and ``image_cmap``: how
    the input and counterfactual are shown (PET: inverted grey from 0; CT: grey in a window).
    """
    plt = _pyplot()
    slices = slices or key_slices(labels, truth)
    vmax = vmax or float(np.percentile(image, 99.5)) or 1.0
    hmax = float(heat.max()) or 1.0
    rows = [("input", image, image_cmap, vmin, vmax)]
    if counterfactual is not None:
        rows.append(("counterfactual", counterfactual, image_cmap, vmin, vmax))
    rows.append(("heat map", heat, "inferno", 0, hmax))
    rows.append(("lesions (red) / truth (green)" if truth is not None else "lesions", image, image_cmap, vmin, vmax))
    extra = 0 if confidence is None else 1
    width = 2.6 * len(slices) if confidence is None else max(2.6 * len(slices), 5.2)
    fig = plt.figure(figsize=(width, 2.6 * len(rows) + 1.8 * extra))
    grid = fig.add_gridspec(len(rows) + extra, len(slices), height_ratios=[1.0] * len(rows) + [0.7] * extra)
    for c, k in enumerate(slices):
        for r, (name, arr, cmap, lo, hi) in enumerate(rows):
            ax = fig.add_subplot(grid[r, c])
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
    if confidence is not None:
        _confidence_panel(fig.add_subplot(grid[len(rows), :]), confidence, confidence_unhealthy)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return _save(fig, path, dpi=90)


def _confidence_panel(ax, confidence: np.ndarray, unhealthy: np.ndarray | None) -> None:
    """p(unhealthy) against model slice; truth-unhealthy slices shaded (vermillion), the 0.5 line dashed."""
    p = np.asarray(confidence, dtype=np.float64).ravel()
    position = np.arange(p.size)
    if unhealthy is not None:
        marked = np.asarray(unhealthy, dtype=bool).ravel()
        for k in np.flatnonzero(marked):
            ax.axvspan(k - 0.5, k + 0.5, color=OKABE_ITO[5], alpha=0.25, linewidth=0)
        ax.plot([], [], color=OKABE_ITO[5], alpha=0.4, linewidth=6, label="unhealthy (ground truth)")
    ax.plot(position, p, color=OKABE_ITO[0], marker=".", markersize=3, linewidth=1.2, label="p(unhealthy)")
    ax.axhline(0.5, color="0.4", linestyle="--", linewidth=0.8)
    ax.set_xlim(-0.5, max(p.size - 0.5, 0.5))
    ax.set_ylim(-0.02, 1.02)
    ax.set_xlabel("model slice (inferior to superior)", fontsize=8)
    ax.set_ylabel("classifier\np(unhealthy)", fontsize=8)
    ax.tick_params(labelsize=7)
    ax.legend(fontsize=7, loc="lower right", bbox_to_anchor=(1.0, 1.0), ncol=2, frameon=False)


def froc_png(path: str | Path, curves: list[dict], title: str = "", max_fp: float = 8.0) -> Path:
    """Write a FROC figure: lesion sensitivity against false candidates per volume, one line per curve.

    The dots are the thresholds themselves; they need not be monotonic (at IoU >= 0.2 a lower threshold
    can merge or grow candidates past a lesion). The line is their upper-left envelope: the best
    sensitivity some threshold reaches with at most x false candidates per volume.
    ``curves``: dicts with ``label``, ``fp`` and ``sensitivity`` (the points, in threshold order),
    ``operating_point`` (fp, sensitivity; a large circle), and optionally ``group`` (curves of one
    group, e.g. one method with and without an organ exclusion, share a colour of :data:`OKABE_ITO`,
    groups in order of appearance) and ``excluded`` (solid line, else dashed). The x axis runs from
    0 to ``max_fp``; an operating point beyond it is drawn as an arrow at the edge with its value.
    ``ci`` (optional): {"fp", "low", "high"}, a confidence interval of the sensitivity at those false
    candidate counts, drawn as vertical bars.
    """
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 5.4 + 0.15 * max(len(curves) - 4, 0)))
    off_axis = 0
    groups: list = []
    for n, curve in enumerate(curves):
        group = curve.get("group", n)
        if group not in groups:
            groups.append(group)
        colour = OKABE_ITO[groups.index(group) % len(OKABE_ITO)]
        fp_points, sens_points = np.asarray(curve["fp"], float), np.asarray(curve["sensitivity"], float)
        order = np.argsort(fp_points, kind="stable")
        ax.plot(fp_points, sens_points, linestyle="none", marker=".", markersize=4, color=colour, alpha=0.4)
        envelope_x = np.append(fp_points[order], max(max_fp, fp_points.max(initial=0.0)))
        envelope_y = np.maximum.accumulate(sens_points[order])
        if envelope_y.size:
            ax.plot(envelope_x, np.append(envelope_y, envelope_y[-1:]), "-" if curve.get("excluded") else "--",
                    drawstyle="steps-post", color=colour, label=curve["label"])
        if curve.get("ci"):  # bootstrap interval of the sensitivity read at a few false-candidate counts
            ci = curve["ci"]
            x, lo, hi = (np.asarray(ci[k], float) for k in ("fp", "low", "high"))
            ok = np.isfinite(lo) & np.isfinite(hi) & (x <= max_fp)
            ax.vlines(x[ok], lo[ok], hi[ok], color=colour, linewidth=2.0, alpha=0.6)
            ax.plot(np.r_[x[ok], x[ok]], np.r_[lo[ok], hi[ok]], linestyle="none", marker="_", markersize=8,
                    color=colour, alpha=0.8)
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
    return _save(fig, path, dpi=100)



def comparison_png(path: str | Path, images: np.ndarray, truths: np.ndarray, maps: dict[str, np.ndarray],
                   header: Sequence[str], rows: Sequence[Sequence[str]], slice_names: Sequence[str] = (),
                   title: str = "", aspect: float = 1.0) -> Path:
    """Write the methods side by side: one row per slice (input, ground truth, then each method's map)
    and their metric table below.

    ``images``, ``truths`` (bool) and each of ``maps`` (label -> array): (S, H, W), the same S slices;
    each map is shown from 0 to its own maximum over the S slices (the methods' maps have other units),
    with the ground truth's outline dashed on it. ``header`` and ``rows``: the table's cells as text.
    """
    plt = _pyplot()
    images, truths = np.asarray(images), np.asarray(truths, dtype=bool)
    n_slices, columns = len(images), 2 + len(maps)
    table_height = 0.35 * (len(rows) + 1) + 0.6
    fig = plt.figure(figsize=(max(1.9 * columns, 0.55 * len(header) + 1.0), 1.9 * max(n_slices, 1) + table_height))
    grid = fig.add_gridspec(max(n_slices, 1) + 1, columns,
                            height_ratios=[1.9] * max(n_slices, 1) + [table_height])
    vmax = float(np.percentile(images, 99.5)) if images.size else 1.0
    tops = {label: float(np.max(m)) if np.size(m) and np.max(m) > 0 else 1.0 for label, m in maps.items()}
    for r in range(n_slices):
        panels = [("input", images[r], "gray_r", vmax), ("ground truth", images[r], "gray_r", vmax)]
        panels += [(label, m[r], "inferno", tops[label]) for label, m in maps.items()]
        for c, (label, arr, cmap, hi) in enumerate(panels):
            ax = fig.add_subplot(grid[r, c])
            ax.imshow(arr, cmap=cmap, vmin=0, vmax=hi or 1.0, aspect=aspect, interpolation="nearest")
            if c >= 1 and truths[r].any():
                colour = OKABE_ITO[5] if c == 1 else OKABE_ITO[4]
                ax.contour(truths[r], levels=[0.5], colors=colour, linewidths=1.0 if c == 1 else 0.7,
                           linestyles="solid" if c == 1 else "dashed")
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(label, fontsize=8)
            if c == 0 and r < len(slice_names):
                ax.set_ylabel(slice_names[r], fontsize=7)
    ax = fig.add_subplot(grid[max(n_slices, 1), :])
    ax.axis("off")
    if rows:
        table = ax.table(cellText=[list(map(str, row)) for row in rows], colLabels=list(header), loc="center",
                         cellLoc="center")
        table.auto_set_font_size(False)
        table.set_fontsize(7)
        table.auto_set_column_width(list(range(len(header))))
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return _save(fig, path, dpi=90)


def sweep_png(path: str | Path, noise_levels: Sequence[float], guidance_values: Sequence[float],
              panels: dict[str, np.ndarray], noise_label: str = "noise level", guidance_label: str = "guidance",
              title: str = "") -> Path:
    """Write a sweep's grids as heat maps, one panel per metric (as the papers' hyperparameter figures).

    ``panels``: metric name -> array (len(noise_levels), len(guidance_values)), NaN for no value;
    each cell carries its value, the best (highest) is outlined.
    """
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(panels), squeeze=False,
                             figsize=(max(3.2, 0.8 * len(guidance_values) + 1.8) * len(panels),
                                      max(2.8, 0.5 * len(noise_levels) + 1.6)))
    for ax, (name, values) in zip(axes[0], panels.items()):
        values = np.asarray(values, dtype=np.float64)
        shown = np.ma.masked_invalid(values)
        image = ax.imshow(shown, cmap="viridis", origin="lower", aspect="auto", vmin=np.nanmin(values)
                          if np.isfinite(values).any() else 0.0, vmax=np.nanmax(values) if np.isfinite(values).any()
                          else 1.0)
        fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
        for (r, c), v in np.ndenumerate(values):
            if np.isfinite(v):
                ax.text(c, r, f"{v:.3f}", ha="center", va="center", fontsize=7,
                        color="white" if v < np.nanmean(values) else "black")
        if np.isfinite(values).any():
            r, c = np.unravel_index(np.nanargmax(values), values.shape)
            ax.add_patch(plt.Rectangle((c - 0.5, r - 0.5), 1, 1, fill=False, edgecolor=OKABE_ITO[5], linewidth=2))
        ax.set_xticks(range(len(guidance_values)), [f"{g:g}" for g in guidance_values], fontsize=7)
        ax.set_yticks(range(len(noise_levels)), [f"{d:g}" for d in noise_levels], fontsize=7)
        ax.set_xlabel(guidance_label, fontsize=8)
        ax.set_ylabel(noise_label, fontsize=8)
        ax.set_title(name, fontsize=9)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return _save(fig, path, dpi=100)
