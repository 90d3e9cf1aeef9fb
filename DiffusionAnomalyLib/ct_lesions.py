"""Kidney and pancreas lesions for CT in HU: shapes, attenuation by kind and phase, insertion into phantoms and real CT.

One owner for the CT lesion facts (issue 10): the phases, the lesion kinds per organ and their
diameter ranges, :class:`CtCase` (a CT with known lesions), :func:`draw_lesions` (seeded kinds,
sizes and centres inside an organ), :func:`insert_lesion` (one lesion into an HU array) and the
real-anatomy evaluation set (:func:`insert_into_real_ct`, :func:`real_anatomy_set`: lesions
inserted into the real CTs of ``shared/data/real-ct`` inside their TotalSegmentator kidneys and
pancreas; an evaluation set only, never trained on). ``ct_phantoms`` paints the anatomy and
calls these functions before its blur and noise. No torch.

A lesion is an added contrast field: inside its soft mask the scan's local anatomy (an in-plane
median, which keeps edges and drops noise) is replaced by the lesion's own attenuation pattern
while the scan's high-frequency texture (its noise) stays; the field is blurred by the scan's
point spread function. Attenuation is set relative to the organ's HU measured around the lesion
(the median of its parenchyma) and the phase, as :func:`insert_lesion` documents per kind.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping

import numpy as np
from scipy import ndimage
from scipy.spatial.distance import pdist

from .roi import OrganLabels, read_organ_labels
from .volume import Volume, read_volume

__all__ = [
    "CtCase",
    "DIAMETER_MM",
    "KIDNEY_DIAMETER_MM",
    "LESION_KINDS",
    "LESION_ORGANS",
    "PANCREAS_DIAMETER_MM",
    "PHASES",
    "REAL_CTS",
    "check_phase",
    "draw_lesions",
    "estimate_phase",
    "insert_into_real_ct",
    "insert_lesion",
    "insert_lesions",
    "largest_fitting_diameter",
    "lesion_family",
    "noise_hu",
    "real_anatomy_set",
]

PHASES = ("non-contrast", "portal-venous")
LESION_KINDS = {"kidney": ("simple-cyst", "complex-cyst", "solid", "necrotic"), "pancreas": ("hypo-mass",)}
#: largest diameter of a drawn lesion (mm): the issue's ranges (renal masses 5-70 mm, pancreatic masses 10-40 mm)
KIDNEY_DIAMETER_MM = (5.0, 70.0)
PANCREAS_DIAMETER_MM = (10.0, 40.0)
DIAMETER_MM = {"kidney": KIDNEY_DIAMETER_MM, "pancreas": PANCREAS_DIAMETER_MM}
#: the TotalSegmentator v2 organs that receive lesions, and their lesion family
LESION_ORGANS = {"kidney_left": "kidney", "kidney_right": "kidney", "pancreas": "pancreas"}


@dataclass
class CtCase:
    """One CT with known lesions (a phantom, or real anatomy with inserted lesions).

    ``ct``: HU, modality "CT", units "HU"; ``organs``: TotalSegmentator v2 labels on the same
    grid; ``lesion_labels``: 0 = none, n = lesion n, same grid; ``lesions``: one dict per lesion
    {"id", "organ", "kind", "diameter_mm" (largest, as drawn), "center_ras", "hu_mean" (measured
    after insertion), "voxels"}; ``phase``: one of :data:`PHASES`; ``source``: "phantom" or the
    real CT's file name.
    """

    ct: Volume
    organs: OrganLabels
    lesion_labels: Volume
    lesions: list[dict[str, Any]]
    seed: int
    phase: str
    source: str

    @property
    def lesion_mask(self) -> np.ndarray:
        return self.lesion_labels.voxels > 0


# =============================================================================================
# Checks
# =============================================================================================
def lesion_family(organ: str) -> str:
    """"kidney" or "pancreas" for a TotalSegmentator organ name that receives lesions."""
    if organ not in LESION_ORGANS:
        raise ValueError(f"CT lesions go into {', '.join(LESION_ORGANS)}, not {organ!r}; choose one of those organs.")
    return LESION_ORGANS[organ]


def _check_kind(organ: str, kind: str) -> str:
    family = lesion_family(organ)
    if kind not in LESION_KINDS[family]:
        raise ValueError(f"a {family} lesion is one of {', '.join(LESION_KINDS[family])}, not {kind!r}.")
    return family


def check_phase(phase: str) -> str:
    """``phase`` when it is one of :data:`PHASES`; else the one-sentence refusal."""
    if phase not in PHASES:
        raise ValueError(f"the CT phase is one of {', '.join(PHASES)}, not {phase!r}.")
    return phase


# =============================================================================================
# Shape
# =============================================================================================
#: per kind: (surface perturbation amplitude range, wave number range, edge width mm)
#: - simple-cyst: round or oval with a sharp, imperceptible wall (Bosniak I: smooth thin wall).
#: - complex-cyst: lobulated outline (Bosniak II-III: lobulated, septated, thin enhancing walls).
#: - solid: round to mildly irregular, well-marginated (renal cell carcinoma is usually expansile).
#: - necrotic: irregular (large aggressive tumours, necrosis makes the outline uneven).
#: - hypo-mass: irregular, ill-defined margin (pancreatic ductal adenocarcinoma infiltrates).
_SHAPE = {
    "simple-cyst": ((0.02, 0.05), (1.0, 2.0), 0.4),
    "complex-cyst": ((0.10, 0.20), (2.0, 3.5), 0.6),
    "solid": ((0.06, 0.14), (1.0, 2.5), 1.0),
    "necrotic": ((0.10, 0.20), (1.5, 3.0), 1.0),
    "hypo-mass": ((0.10, 0.22), (1.5, 3.0), 2.0),
}
_N_WAVES = 5


def _fibonacci_sphere(n: int) -> np.ndarray:
    i = np.arange(n) + 0.5
    z = 1 - 2 * i / n
    phi = np.pi * (1 + 5 ** 0.5) * i
    r = np.sqrt(1 - z * z)
    return np.stack([r * np.cos(phi), r * np.sin(phi), z], axis=1)


_DIRECTIONS = _fibonacci_sphere(400)


@dataclass
class _Shape:
    """An ellipsoid (axes in mm, rotated) whose radius varies smoothly with direction (sum of a few plane waves)."""

    rotation: np.ndarray  # columns: the ellipsoid axes in (k, j, i) millimetres
    axes: np.ndarray
    waves: np.ndarray  # (m, 3) wave vectors on the unit sphere of the ellipsoid frame
    phases: np.ndarray
    weights: np.ndarray  # sum |weights| = the amplitude, so the radius factor stays in 1 +- amplitude

    @classmethod
    def draw(cls, diameter_mm: float, kind: str, rng: np.random.Generator) -> "_Shape":
        (amp_lo, amp_hi), (w_lo, w_hi), _ = _SHAPE[kind]
        q, r = np.linalg.qr(rng.normal(size=(3, 3)))
        rotation = q * np.sign(np.diag(r))
        axes = np.array([1.0, rng.uniform(0.75, 1.0), rng.uniform(0.65, 1.0)])
        directions = rng.normal(size=(_N_WAVES, 3))
        waves = directions / np.linalg.norm(directions, axis=1, keepdims=True) * rng.uniform(w_lo, w_hi, (_N_WAVES, 1))
        phases = rng.uniform(0, 2 * np.pi, _N_WAVES)
        weights = rng.uniform(0.3, 1.0, _N_WAVES)
        weights *= rng.uniform(amp_lo, amp_hi) / weights.sum()
        shape = cls(rotation, axes, waves, phases, weights)
        # scale so the largest diameter (farthest pair of surface points) is exactly the one asked for
        surface = shape.axes * shape.factor(_DIRECTIONS)[:, None] * _DIRECTIONS
        shape.axes = shape.axes * (diameter_mm / pdist(surface).max())
        return shape

    def factor(self, u: np.ndarray) -> np.ndarray:
        """Radius factor for unit directions ``u`` (..., 3) of the ellipsoid frame."""
        return 1.0 + np.cos(u @ self.waves.T + self.phases) @ self.weights

    @property
    def reach_mm(self) -> float:
        return float(self.axes.max() * (1.0 + self.weights.sum()))

    def depth_mm(self, x: np.ndarray) -> np.ndarray:
        """Distance (mm) inside the surface along the ray from the centre (< 0 outside) for points ``x`` (..., 3) mm."""
        y = x @ self.rotation
        q = y / self.axes
        rho = np.linalg.norm(q, axis=-1)
        dist = np.linalg.norm(y, axis=-1)
        safe = np.maximum(rho, 1e-9)
        u = np.where(rho[..., None] > 1e-9, q / safe[..., None], np.array([1.0, 0.0, 0.0]))
        scale = np.where(rho > 1e-9, dist / safe, self.axes[0])  # mm per unit of the ellipsoid frame on this ray
        return self.factor(u) * scale - dist


# =============================================================================================
# Attenuation
# =============================================================================================
def _smooth_field(shape, spacing_kji, sigma_mm: float, rng: np.random.Generator) -> np.ndarray:
    """Unit-SD Gaussian random field with correlation length ``sigma_mm`` (lesion heterogeneity, irregular cores)."""
    field = ndimage.gaussian_filter(rng.standard_normal(shape).astype(np.float32),
                                    sigma_mm / np.asarray(spacing_kji), mode="reflect")
    return field / max(float(field.std()), 1e-6)


def _coverage(at_mm: np.ndarray, lo_mm, hi_mm, extent_mm) -> np.ndarray:
    """Fraction of a voxel of ``extent_mm`` (along the normal) centred at ``at_mm`` that lies in [lo_mm, hi_mm]:
    the partial-volume share of an edge, wall or septum: structures thinner than a voxel neither vanish nor fatten."""
    half = np.asarray(extent_mm) / 2
    return np.clip(np.minimum(at_mm + half, hi_mm) - np.maximum(at_mm - half, lo_mm), 0.0, None) / np.asarray(extent_mm)


def _solid_hu(phase, ref, cortex, field, rng) -> np.ndarray:
    """Enhancing solid tumour tissue (renal cell carcinoma)."""
    if phase == "non-contrast":
        # near-iso to parenchyma, slightly hypo (RCC 20-40 HU vs parenchyma 30-40 HU unenhanced; Israel & Bosniak 2005)
        return ref - rng.uniform(0.0, 10.0) + 6.0 * field
    # enhances (>= 20 HU over unenhanced is the threshold for enhancement), heterogeneously, but less than the
    # renal cortex in the portal-venous / nephrographic phase: masses are read as hypo-enhancing to cortex there
    return cortex - rng.uniform(40.0, 80.0) + 15.0 * field


def _target_hu(kind, phase, ref, cortex, depth, x, shape_box, spacing_kji, radius, rng) -> np.ndarray:
    """The lesion's own attenuation (HU) at every box voxel (only its inside is used).

    ``ref``: the organ parenchyma's median HU around the lesion, ``cortex``: its 75th percentile; ``depth``:
    mm inside the lesion's surface; ``x``: mm from the centre (k, j, i); ``radius``: mean semi-axis (mm).
    """
    if kind == "simple-cyst":
        # water-like fluid 0-15 HU, no enhancement in either phase (Bosniak I; Silverman et al., Radiology 2019:
        # -9..20 HU is simple fluid, enhancement means >= 20 HU change)
        return np.full(depth.shape, rng.uniform(0.0, 15.0), np.float32)
    if kind == "complex-cyst":
        # proteinaceous / haemorrhagic fluid 15-40 HU with a thin wall and 1-3 thin septa that enhance
        # (Bosniak II-III, Silverman et al., Radiology 2019: wall/septa <= 2 mm thin, 3 mm minimally thickened)
        fluid = rng.uniform(15.0, 40.0)
        sp = np.asarray(spacing_kji, dtype=np.float64)
        wall = _coverage(depth, -np.inf, rng.uniform(1.0, 2.0), float(sp.mean()))  # a 1-2 mm wall
        for _ in range(int(rng.integers(1, 4))):  # 1 mm septa through the lesion
            normal = rng.normal(size=3)
            normal /= np.linalg.norm(normal)
            wall = np.maximum(wall, _coverage(x @ normal - rng.uniform(-0.4, 0.4) * radius, -0.5, 0.5,
                                              float(np.abs(normal) @ sp)))
        if phase == "non-contrast":
            wall_hu = max(ref, fluid) + rng.uniform(0.0, 10.0)  # wall / septa: soft tissue, faintly denser than fluid
        else:
            wall_hu = ref - rng.uniform(0.0, 30.0)  # wall and septa enhance like parenchyma (measurable enhancement)
        return (fluid + (wall_hu - fluid) * wall).astype(np.float32)
    if kind == "solid":
        return _solid_hu(phase, ref, cortex, _smooth_field(shape_box, spacing_kji, 3.0, rng), rng).astype(np.float32)
    if kind == "necrotic":
        # enhancing solid rim (2.5 mm to a third of the radius) around a non-enhancing near-fluid necrotic core,
        # 5-20 HU and never denser than the viable rim (necrosis is the low-attenuation, non-enhancing part)
        rim = max(2.5, rng.uniform(0.2, 0.35) * radius)
        solid = _solid_hu(phase, ref, cortex, _smooth_field(shape_box, spacing_kji, 3.0, rng), rng)
        core_depth = depth + 0.3 * rim * _smooth_field(shape_box, spacing_kji, 4.0, rng)  # irregular core outline
        core = np.clip((core_depth - rim) / 1.5 + 0.5, 0.0, 1.0)
        core_hu = min(rng.uniform(5.0, 20.0), float(np.median(solid)) - 10.0)
        return (solid * (1 - core) + core_hu * core).astype(np.float32)
    # pancreatic ductal adenocarcinoma: hypo-attenuating to the enhanced parenchyma in about 90 % of cases
    # (Prokesch et al., Radiology 2002: 11 % isoattenuating); desmoplastic, hypovascular tissue enhances less, so
    # 30-60 HU below parenchyma in the portal-venous phase, only 5-15 HU below it unenhanced; mildly heterogeneous
    field = _smooth_field(shape_box, spacing_kji, 3.0, rng)
    if phase == "non-contrast":
        return (ref - rng.uniform(5.0, 15.0) + 4.0 * field).astype(np.float32)
    return (ref - rng.uniform(30.0, 60.0) + 8.0 * field).astype(np.float32)


#: in-plane width (mm) of the median that estimates the scan's local anatomy under a lesion; the rest is texture
_ANATOMY_MEDIAN_MM = 6.0
#: the organ's reference HU is measured in its voxels within this margin (mm) around the lesion's box
_REFERENCE_MARGIN_MM = 10.0


def _anatomy(hu: np.ndarray, spacing_kji) -> np.ndarray:
    """The scan's local anatomy: an in-plane median about 6 mm wide (keeps edges, drops the noise texture)."""
    size = max(3, int(round(_ANATOMY_MEDIAN_MM / float(np.mean(spacing_kji[1:])))) // 2 * 2 + 1)
    return ndimage.median_filter(hu, size=(1, size, size), mode="nearest")


#: texture beyond this many noise SDs is anatomy smaller than the median (a calcification, a small vessel), not noise
_TEXTURE_CLIP_SD = 3.0


def _texture(hu: np.ndarray, spacing_kji, inside: np.ndarray) -> np.ndarray:
    """The scan's noise texture: the residual after :func:`_anatomy`, clipped at 3 robust SDs (measured ``inside``)."""
    residual = hu - _anatomy(hu, spacing_kji)
    r = residual[inside] if inside.any() else residual
    limit = _TEXTURE_CLIP_SD * 1.4826 * float(np.median(np.abs(r - np.median(r))))
    return np.clip(residual, -limit, limit)


def _box(center_kji, reach_vox, shape) -> tuple[slice, ...]:
    return tuple(slice(max(int(np.floor(c - r)), 0), min(int(np.ceil(c + r)) + 1, n))
                 for c, r, n in zip(center_kji, reach_vox, shape))


#: organ voxels below this (HU) are fat inside the label (renal sinus, fatty pancreas, partial volume), not parenchyma
_FAT_HU = -30.0


def _parenchyma_hu(hu: np.ndarray, organ_mask: np.ndarray, near: tuple[slice, ...]) -> tuple[float, float]:
    """Median and 75th percentile of the organ's parenchyma (voxels denser than fat) near the lesion, else anywhere."""
    for values in (hu[near][organ_mask[near]], hu[organ_mask]):
        tissue = values[values > _FAT_HU]
        if tissue.size >= 10:
            break
    else:
        tissue = values
    median, upper = np.percentile(tissue, [50, 75])
    return float(median), float(upper)


def insert_lesion(hu: np.ndarray, organ_mask: np.ndarray, spacing_kji, *, organ: str, kind: str,
                  diameter_mm: float, center_kji, phase: str, rng: np.random.Generator,
                  blur_sigma_mm: float = 0.0) -> np.ndarray:
    """Adds one lesion to hu (float32 [k,j,i], modified in place) and returns its boolean mask. The attenuation is
    set relative to the organ's measured HU around the lesion and the phase; the existing noise texture is kept
    (the lesion is an added contrast field), blurred by blur_sigma_mm (0 for a clean phantom that is blurred later).

    Shape: an ellipsoid (axis ratios 0.65-1) with a smooth random radial perturbation, scaled so
    its largest diameter is ``diameter_mm``; its soft mask ramps over the kind's edge width
    combined with the voxel's extent (partial volume); the returned mask is where it is >= 0.5.
    Reference (``ref``): the median HU of the organ's parenchyma (voxels above -30 HU, so sinus
    or interlobular fat inside the label does not count) within 10 mm of the lesion's box;
    ``cortex``: their 75th percentile (the enhancing renal cortex). Inside the lesion the scan's
    anatomy (an in-plane median about 6 mm wide) is replaced by the lesion's pattern and the
    residual texture (clipped at 3 noise SDs, so a calcification or small vessel does not show
    through) stays. Kinds (numbers and sources in :func:`_target_hu`): simple-cyst 0-15 HU
    fluid, sharp wall, no enhancement; complex-cyst 15-40 HU fluid, 1-2 mm wall and 1-3 septa
    that enhance, lobulated; solid: non-contrast ref - 0..10 HU (+-6 HU heterogeneity),
    portal-venous cortex - 40..80 HU (+-15 HU); necrotic (drawn >= 20 mm): solid rim, 5-20 HU
    core; hypo-mass (pancreas): ref - 5..15 HU non-contrast, ref - 30..60 HU portal-venous,
    ill-defined 2 mm edge.
    """
    _check_kind(organ, kind)
    check_phase(phase)
    if hu.dtype != np.float32:
        raise ValueError(f"insert_lesion works on a float32 HU array, got {hu.dtype}; convert the CT first.")
    if organ_mask.shape != hu.shape or not organ_mask.any():
        raise ValueError(f"the {organ} mask is empty or not on the CT grid; give the organ's mask on the CT's grid.")
    sp = np.asarray(spacing_kji, dtype=np.float64)
    shape = _Shape.draw(float(diameter_mm), kind, rng)
    edge = _SHAPE[kind][2]
    reach = shape.reach_mm + edge + 3.0 * blur_sigma_mm + sp
    box = _box(center_kji, reach / sp, hu.shape)
    grids = np.meshgrid(*[(np.arange(b.start, b.stop) - c) * s for b, c, s in zip(box, center_kji, sp)], indexing="ij")
    x = np.stack(grids, axis=-1)
    depth = shape.depth_mm(x)
    radial = np.abs(x) / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-9)
    soft = _coverage(depth, 0.0, np.inf, np.hypot(edge, radial @ sp)).astype(np.float32)  # edge width + voxel extent

    ref, cortex = _parenchyma_hu(hu, organ_mask, _box(center_kji, (reach + _REFERENCE_MARGIN_MM) / sp, hu.shape))

    target = _target_hu(kind, phase, ref, cortex, depth, x, soft.shape, sp, float(shape.axes.mean()), rng)
    delta = soft * (target - hu[box] + _texture(hu[box], sp, soft >= 0.5))
    if blur_sigma_mm > 0:
        delta = ndimage.gaussian_filter(delta, blur_sigma_mm / sp, mode="constant")
    hu[box] += delta
    mask = np.zeros(hu.shape, dtype=bool)
    mask[box] = soft >= 0.5
    return mask


# =============================================================================================
# Drawing kinds, sizes and centres
# =============================================================================================
#: a lesion may bulge out of the organ: its radius is at most this multiple of the organ's deepest point (mm)
_FIT_FACTOR = 1.2
#: the centre lies at least this fraction of the radius deep in the organ (so most of the lesion lies inside)
_CENTRE_DEPTH = 0.6
#: necrosis develops in larger tumours: necrotic lesions are drawn at least this large (mm)
_NECROTIC_MIN_MM = 20.0


def _organ_depth(organ_mask: np.ndarray, sp: np.ndarray) -> tuple[tuple[slice, ...], np.ndarray]:
    """The organ's box and each voxel's distance (mm) to its surface; where the organ touches a face of the volume
    it continues beyond the field of view (padding repeats the face), so the face is no surface."""
    box = tuple(slice(max(s.start - 1, 0), s.stop + 1) for s in ndimage.find_objects(organ_mask.astype(np.uint8))[0])
    return box, ndimage.distance_transform_edt(np.pad(organ_mask[box], 1, mode="edge"), sampling=sp)[1:-1, 1:-1, 1:-1]


def largest_fitting_diameter(organ_mask: np.ndarray, spacing_kji) -> float:
    """The largest lesion diameter (mm) that fits the organ: twice :data:`_FIT_FACTOR` times its deepest point."""
    if not organ_mask.any():
        return 0.0
    return float(2 * _FIT_FACTOR * _organ_depth(organ_mask, np.asarray(spacing_kji, float))[1].max())


def draw_lesions(organ_mask, spacing_kji, organ: str, n: int, rng) -> list:
    """Seeded kinds / sizes / centres inside the organ (centre deep enough that most of the lesion lies in it).

    Returns up to ``n`` (kind, diameter_mm, center_kji) tuples. Kind: uniform over the organ's
    :data:`LESION_KINDS`. Diameter: uniform over the organ's range (so every size stratum is
    populated), necrotic ones from 20 mm, clipped to what fits the organ (radius <= 1.2 x its
    deepest point: a 70 mm mass does not fit a 110 x 60 mm kidney). Centre: a random organ
    voxel at least 0.6 x the radius deep and clear of the lesions already drawn; a lesion that
    finds no room shrinks (down to the range's minimum) or is left out, so fewer than ``n`` may come back.
    """
    family = lesion_family(organ)
    lo, hi = DIAMETER_MM[family]
    organ_mask = np.asarray(organ_mask, dtype=bool)
    if not organ_mask.any():
        raise ValueError(f"the CT holds no {organ} voxels; choose an organ inside the field of view.")
    sp = np.asarray(spacing_kji, dtype=np.float64)
    box, depth = _organ_depth(organ_mask, sp)
    fit = 2 * _FIT_FACTOR * float(depth.max())
    if fit < lo:
        raise ValueError(f"the {organ} in this CT is too thin for a {lo:.0f} mm lesion (at most {fit:.0f} mm fits); "
                         "choose another organ.")
    offset = np.array([b.start for b in box])
    coords = np.argwhere(depth > 0)
    depths = depth[depth > 0]
    placed: list[tuple[np.ndarray, float]] = []
    drawn = []
    for _ in range(int(n)):
        kind = LESION_KINDS[family][int(rng.integers(len(LESION_KINDS[family])))]
        low = max(lo, _NECROTIC_MIN_MM) if kind == "necrotic" else lo
        diameter = float(rng.uniform(min(low, fit), min(hi, fit)))
        while True:
            r = diameter / 2
            ok = depths >= min(_CENTRE_DEPTH * r, 0.95 * depths.max())
            for centre, r_other in placed:
                ok &= np.linalg.norm((coords - centre) * sp, axis=1) > r + r_other + 2.0
            if ok.any() or diameter <= lo:
                break
            diameter = max(lo, diameter * 0.8)
        if not ok.any():
            continue
        choice = coords[np.flatnonzero(ok)[int(rng.integers(int(ok.sum())))]]
        placed.append((choice, diameter / 2))
        drawn.append((kind, round(diameter, 2), tuple(int(v) for v in choice + offset)))
    return drawn


def insert_lesions(hu: np.ndarray, organs: OrganLabels, counts: Mapping[str, int], *, phase: str,
                   rng: np.random.Generator, blur_sigma_mm: float = 0.0) -> tuple[np.ndarray, list[dict]]:
    """Draw and insert ``counts[organ]`` lesions per organ into ``hu`` (float32, on ``organs``' grid, in place).

    Returns the lesion label array (0 = none, n = lesion n; a later lesion does not overwrite an
    earlier one) and the lesion records of :class:`CtCase` (``hu_mean`` measured after all
    insertions, ``center_ras`` of the drawn centre). The organ labels are left unchanged.
    """
    check_phase(phase)
    sp = organs.volume.spacing[::-1]
    labels = np.zeros(hu.shape, dtype=np.uint16 if sum(counts.values()) > 255 else np.uint8)
    lesions = []
    for organ, n in counts.items():
        lesion_family(organ)
        if n <= 0:
            continue
        mask = organs.mask(organ)
        for kind, diameter, centre in draw_lesions(mask, sp, organ, n, rng):
            got = insert_lesion(hu, mask, sp, organ=organ, kind=kind, diameter_mm=diameter, center_kji=centre,
                                phase=phase, rng=rng, blur_sigma_mm=blur_sigma_mm)
            lesion_id = len(lesions) + 1
            labels[got & (labels == 0)] = lesion_id
            ras = organs.volume.ijk_to_ras_points([centre[::-1]])[0]
            lesions.append({"id": lesion_id, "organ": organ, "kind": kind, "diameter_mm": diameter,
                            "center_ras": [round(float(v), 2) for v in ras]})
    for les in lesions:
        own = labels == les["id"]
        les["hu_mean"] = round(float(hu[own].mean()), 1) if own.any() else float("nan")
        les["voxels"] = int(own.sum())
    return labels, lesions


# =============================================================================================
# Real anatomy
# =============================================================================================
#: the real CTs and their TotalSegmentator labels in ``shared/data/real-ct`` (CT file or folder, labels file)
REAL_CTS = (("ct_abdomen_3mm.nii.gz", "ct_abdomen_3mm_totalseg.nii.gz"), ("ct_dicom", "ct_dicom_totalseg.nii.gz"))
#: the aorta's median above this (HU) means a contrast-enhanced (portal-venous) scan; unenhanced blood is 30-50 HU
_AORTA_CONTRAST_HU = 120.0
#: the scan's point spread function sigma as a fraction of its in-plane voxel size (a reconstructed CT's PSF
#: FWHM is about one voxel, so sigma ~ 0.45 x the spacing)
_PSF_FRACTION = 0.45
#: the real-anatomy lesion generator: np.random.default_rng([seed, _REAL_STREAM])
_REAL_STREAM = 0x1E5


def estimate_phase(hu: np.ndarray, organs: OrganLabels) -> str:
    """"portal-venous" when the aorta (TotalSegmentator id 52) has a median above 120 HU, else "non-contrast"."""
    if "aorta" not in organs.present:
        raise ValueError("the CT's organ labels hold no aorta, so its contrast phase cannot be told; "
                         "give a CT whose field of view includes the aorta.")
    return PHASES[1] if float(np.median(hu[organs.mask("aorta")])) > _AORTA_CONTRAST_HU else PHASES[0]


def noise_hu(hu: np.ndarray, organs: OrganLabels, spacing_kji) -> float:
    """The scan's noise SD (HU): 1.4826 x the MAD of the texture a lesion keeps (the residual after the in-plane
    median of :func:`insert_lesion`) inside the eroded liver, spleen, kidneys and pancreas, on up to 4 slices."""
    present = [o for o in ("liver", "spleen", "kidney_left", "kidney_right", "pancreas") if o in organs.present]
    inside = ndimage.binary_erosion(organs.mask(present), np.ones((1, 3, 3), bool)) if present else None
    if inside is None or not inside.any():
        raise ValueError("the CT's organ labels hold none of liver, spleen, kidneys or pancreas; "
                         "give the TotalSegmentator labels of this CT.")
    slices = np.flatnonzero(inside.any(axis=(1, 2)))
    slices = slices[np.linspace(0, len(slices) - 1, min(4, len(slices))).round().astype(int)]
    box = ndimage.find_objects(inside.astype(np.uint8))[0][1:]
    local = hu[(slices, *box)]
    residual = (local - _anatomy(local, spacing_kji))[inside[(slices, *box)]]
    return float(1.4826 * np.median(np.abs(residual - np.median(residual))))


def _organs_with_room(labels: OrganLabels, organs_to_use: tuple[str, ...], spacing_kji) -> list[str]:
    """The organs that hold their smallest lesion (:func:`largest_fitting_diameter`); a missing organ is refused."""
    for organ in organs_to_use:
        lesion_family(organ)
        if organ not in labels.present:
            raise ValueError(f"the CT's organ labels hold no {organ}, so no lesion can go there; "
                             "leave that organ out or give a CT that contains it.")
    return [o for o in organs_to_use
            if largest_fitting_diameter(labels.mask(o), spacing_kji) >= DIAMETER_MM[LESION_ORGANS[o]][0]]


def _check_ct(ct: Volume) -> None:
    if ct.modality not in (None, "CT") or ct.units not in (None, "HU"):
        raise ValueError(f"lesions go into a CT in HU, not a {ct.modality or 'volume'} in "
                         f"{ct.units or 'unknown units'}; give the CT.")


def insert_into_real_ct(ct: Volume, organs: OrganLabels, seed: int,
                        organs_to_use=("kidney_left", "kidney_right", "pancreas"), n_lesions=None) -> CtCase:
    """A real-anatomy evaluation case (never trained on): seeded lesions inserted into a copy of ``ct``.

    ``organs`` (TotalSegmentator labels, any grid) are carried onto the CT grid by physical
    coordinates (:meth:`.roi.OrganLabels.on_grid`; the ct_dicom labels' flipped y axis is handled
    there). Phase: from the aorta's median HU (> 120 HU = portal-venous, :func:`estimate_phase`).
    Blur: a Gaussian PSF of sigma 0.45 x the in-plane spacing (a reconstructed CT's PSF FWHM is
    about a voxel). Noise: none added, the lesion keeps the scan's texture; the measured SD
    (:func:`noise_hu`) goes into ``ct.meta["noise_hu"]``. Lesions: ``n_lesions`` (default 1-3,
    seeded) spread at random over the chosen organs that can hold one (an organ too thin for its
    smallest lesion gets none; an organ missing from the labels is refused), kinds and sizes drawn
    by :func:`draw_lesions` as for phantoms, clipped to fit the organ. The organ labels are not
    changed; ``source`` is the CT's file (or folder) name.
    """
    _check_ct(ct)
    labels = organs.on_grid(ct)
    sp = ct.spacing[::-1]
    room = _organs_with_room(labels, tuple(organs_to_use), sp)
    if not room:
        raise ValueError(f"none of {', '.join(organs_to_use)} in this CT is large enough for a lesion; "
                         "choose a CT or organ with more of the organ in view.")
    hu = np.array(ct.voxels, dtype=np.float32)  # a copy: the caller's CT (and its file) stay as they are
    phase = estimate_phase(hu, labels)
    rng = np.random.default_rng([int(seed), _REAL_STREAM])
    n = int(rng.integers(1, 4)) if n_lesions is None else int(n_lesions)
    picks = rng.integers(len(room), size=n)
    counts = {o: int((picks == i).sum()) for i, o in enumerate(room)}
    blur = _PSF_FRACTION * float(np.mean(ct.spacing[:2]))
    noise = noise_hu(hu, labels, sp)
    lesion_array, lesions = insert_lesions(hu, labels, counts, phase=phase, rng=rng, blur_sigma_mm=blur)
    source = Path(str(ct.meta.get("source", ""))).name
    meta = dict(ct.meta, noise_hu=round(noise, 2), blur_sigma_mm=round(blur, 3), phase=phase,
                phase_from="aorta median HU", real_anatomy_seed=int(seed))
    out = Volume(hu, ct.ijk_to_ras.copy(), modality="CT", units="HU", meta=meta)
    lab = Volume(lesion_array, ct.ijk_to_ras.copy(), modality="SEG", units="label",
                 meta={"real_anatomy_seed": int(seed)})
    return CtCase(ct=out, organs=labels, lesion_labels=lab, lesions=lesions, seed=int(seed), phase=phase,
                  source=source)


#: the organs of each real CT that receive lesions (ct_dicom shows no kidney)
_REAL_ORGANS = {"ct_abdomen_3mm.nii.gz": ("kidney_left", "kidney_right", "pancreas"), "ct_dicom": ("pancreas",)}


def real_anatomy_set(real_ct_dir: Path, seeds: Iterable[int]) -> list[CtCase]:
    """Cases on ct_abdomen_3mm (kidneys + pancreas) and ct_dicom (pancreas only, no kidney in view), per seed, in order.

    The files are only read. ct_dicom's pancreas is the organ's upper end in its 4 lowest slices
    (the organ goes on below the field of view, about 6 mm deep in-plane): it takes lesions only
    as large as :func:`largest_fitting_diameter` allows (about 10 mm), which reach below the
    field of view (the mask and ``voxels`` count only the part in the scan); the ct_dicom case
    is left out when that is under the 10 mm minimum.
    """
    directory = Path(real_ct_dir)
    real = []
    for ct_name, labels_name in REAL_CTS:
        ct = read_volume(directory / ct_name, modality="CT", units="HU")
        labels = read_organ_labels(directory / labels_name).on_grid(ct)
        if _organs_with_room(labels, _REAL_ORGANS[ct_name], ct.spacing[::-1]):
            real.append((ct, labels, _REAL_ORGANS[ct_name]))
    return [insert_into_real_ct(ct, labels, seed, organs) for seed in seeds for ct, labels, organs in real]
