"""Synthetic abdominal CT phantoms in HU (kidneys and pancreas in view) with organ labels and known lesions.

There are two real CTs on the project's machines and neither has a known lesion, so the CT
models are trained on these phantoms (issue 10). :func:`make_ct_phantom` paints one seeded
abdomen on an axial grid (default 240 x 200 x 64 voxels of 1.5 x 1.5 x 3 mm: the upper abdomen
from above the left kidney to below the right one, with about 3 cm of margin):

- body: a superellipse outline (flat back) with skin, subcutaneous fat whose thickness is the
  body habitus, an abdominal wall of muscle, intra-abdominal fat;
- bone: lumbar and lower thoracic vertebrae (cortical shell, trabecular body, denser endplates,
  discs, pedicles, laminae, spinous and transverse processes, canal), ribs 7-12 as tubes that
  descend from the spine along the body wall, costal cartilages; paraspinal (autochthon) and
  psoas (iliopsoas) muscles;
- organs: liver (right upper quadrant, tapering down, with portal and hepatic vein branches),
  gallbladder, spleen, stomach (wall, fluid, gas above an air-fluid level), duodenum, pancreas
  (a curved tube: head right of the SMV at the right renal hilum, neck, body across the aorta,
  tail towards the splenic hilum), kidneys (tilted bean shapes, left higher than right: cortex,
  medullary pyramids, sinus fat, pelvis and calyces, ureter), adrenal glands;
- vessels: aorta (left anterior of the spine, sometimes calcified), inferior vena cava (right),
  portal and splenic vein, superior mesenteric artery and vein, renal arteries and veins, small
  mesenteric vessels in the fat;
- bowel: small-bowel loops (wall, fluid, gas) and the colon frame (mottled stool and gas).

Attenuation depends on the phase (:data:`.ct_lesions.PHASES`): every tissue's HU is drawn per
seed from its range in :data:`TISSUE_HU` (non-contrast: kidneys 25-35 HU, cortex and medulla
nearly equal; portal-venous: cortex 145-185 HU above medulla 100-135 HU; the collecting system
holds unopacified urine in both, there is no excretory phase). Lesions come from
:func:`.ct_lesions.insert_lesions` (kinds, sizes, centres and attenuation are that module's) and
go into the clean image; then the scanner: a Gaussian point spread function (sigma 0.8-1.2 mm
in-plane, 0.42 x the slice thickness along z) and correlated noise (white Gaussian noise
filtered in-plane by a Gaussian of sigma 0.7-1.0 mm, rescaled to the seed's SD of 8-25 HU,
i.e. the dose). Per seed: phase (50/50 unless given), body size and fat, organ sizes, positions
and rotations, vertebral level heights, the patient's position in the field of view, noise and
PSF. Everything comes from generators seeded by ``seed`` (anatomy, bowel texture, lesions and
noise each with their own stream), so a seed always gives the same case; forcing ``phase`` or
``n_lesions`` leaves the anatomy of the seed unchanged, and so does another grid (the shapes
are in millimetres: a coarser grid shows the same patient).

Organ labels use TotalSegmentator's v2 ``total`` ids and names (:func:`.roi.class_map`): a
voxel's label is the last structure painted there, so labels and HU agree; lesions leave the
labels unchanged (TotalSegmentator would call a renal cyst ``kidney_cyst_*``: the ROI groups
include those anyway). Skin, fat, wall muscle, discs, the ureters and the mesenteric vessels
have no ``total`` class here and stay 0.

Simplified (and said so wherever numbers come from these phantoms): shapes are analytic
(ellipsoids, superellipses, tubes), so organ outlines are smoother than real ones; no beam
hardening, streaks, metal, patient table or ring artefacts; noise is stationary (no
dependence on the path length through the body); partial volume along z is the PSF's only
(voxel centres are sampled, not slabs); organs are homogeneous apart from their vessels.

Coordinates follow :mod:`.phantoms` (its ``_Canvas``): i towards the patient's left, j towards
posterior, k towards superior, an IJK->RAS matrix like a DICOM axial series; the anatomy is
laid out in patient millimetres x (left), y (posterior) and z = RAS S, with the centre of the
first lumbar disc (L1/L2, about the level of the renal hila) at z = 0 and the vertebral body
axis at x = y = 0.
"""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np
from scipy import ndimage
from scipy.interpolate import make_interp_spline

from .ct_lesions import LESION_ORGANS, PHASES, CtCase, check_phase, insert_lesions
from .phantoms import _S_TOP_RAS, _Canvas
from .roi import OrganLabels, class_map, label_dtype
from .volume import Volume

__all__ = [
    "DEFAULT_SHAPE_IJK",
    "DEFAULT_SPACING",
    "NOISE_SD_HU",
    "ORGAN_SOURCE",
    "TISSUE_HU",
    "make_ct_phantom",
]

#: default grid: 240 x 200 x 64 voxels (i, j, k) of 1.5 x 1.5 x 3 mm = 360 x 300 x 192 mm
DEFAULT_SHAPE_IJK = (240, 200, 64)
DEFAULT_SPACING = (1.5, 1.5, 3.0)
#: scanner, drawn per seed: noise SD (HU, the dose), its in-plane correlation (Gaussian sigma,
#: mm) and the in-plane PSF (Gaussian sigma, mm); the PSF along z is this fraction of the slice spacing
NOISE_SD_HU = (8.0, 25.0)
NOISE_SIGMA_MM = (0.7, 1.0)
PSF_SIGMA_MM = (0.8, 1.2)
PSF_Z_FRACTION = 0.42
#: lesions when ``n_lesions`` is None: healthy with this probability, else 1-3 kidney lesions
#: (either kidney) and a pancreatic mass with the second probability
HEALTHY_PROBABILITY = 1.0 / 3.0
KIDNEY_LESIONS = (1, 3)
PANCREAS_LESION_PROBABILITY = 0.4

ORGAN_SOURCE = ("the CT phantom's anatomy labelled with TotalSegmentator v2 'total' ids and names "
                "(standing in for TotalSegmentator output; not produced by TotalSegmentator)")

#: HU ranges per tissue: (non-contrast (low, high), portal-venous (low, high)); each seed draws
#: one value per tissue at the same relative place in both ranges. Values from standard CT
#: attenuation tables (unenhanced: liver 50-65, spleen 40-50, pancreas 30-50, renal parenchyma
#: 25-35, blood 35-50 HU; portal-venous phase ~70 s: liver 95-125, spleen 105-130, pancreas
#: 85-115, renal cortex 145-185 above medulla 100-135, aorta 140-190, IVC 110-150, portal vein
#: 150-185 HU); the real non-contrast CT here measures kidneys 12-16 and liver 46 HU (medians).
TISSUE_HU: dict[str, tuple[tuple[float, float], tuple[float, float]]] = {
    "air": ((-1000, -1000), (-1000, -1000)),
    "skin": ((10, 40), (20, 50)),
    "fat": ((-115, -85), (-115, -85)),
    "muscle": ((40, 55), (50, 65)),
    "liver": ((48, 64), (95, 125)),
    "spleen": ((40, 50), (105, 130)),
    "pancreas": ((32, 48), (85, 115)),
    "cortex": ((25, 35), (145, 185)),
    "medulla": ((22, 33), (100, 135)),  # drawn below the cortex, see _draw_hu
    "sinus_fat": ((-90, -60), (-90, -60)),
    "urine": ((0, 15), (0, 15)),
    "adrenal": ((10, 30), (45, 70)),
    "gallbladder": ((0, 20), (0, 20)),
    "artery": ((35, 50), (140, 190)),
    "ivc": ((35, 50), (110, 150)),
    "portal": ((35, 50), (150, 185)),
    "hepatic_vein": ((35, 50), (120, 160)),
    "bowel_wall": ((30, 45), (70, 110)),
    "bowel_fluid": ((0, 25), (0, 25)),
    "stool": ((-60, 20), (-60, 20)),
    "gas": ((-1000, -950), (-1000, -950)),
    "csf": ((0, 15), (0, 15)),
    "cord": ((25, 40), (30, 45)),
    "disc": ((70, 100), (75, 105)),
    "trabecular": ((110, 250), (115, 260)),
    "cortical": ((600, 1000), (600, 1000)),
    "cartilage": ((90, 140), (95, 145)),
    "calcification": ((400, 900), (400, 900)),
}
#: tissue codes of the private tissue map (index + 1; 0 = not painted)
TISSUES = tuple(TISSUE_HU)
_CODE = {name: n + 1 for n, name in enumerate(TISSUES)}

#: generator streams: anatomy np.random.default_rng(seed); lesions, noise and bowel texture their own
_LESION_STREAM = 0x1E51
_NOISE_STREAM = 0x0153
_TEXTURE_STREAM = 0x7E87
#: lower thoracic and lumbar vertebrae from the top down, and the ribs of the lower thorax
_LEVELS = ("T7", "T8", "T9", "T10", "T11", "T12", "L1", "L2", "L3", "L4", "L5")
_RIBS = (7, 8, 9, 10, 11, 12)

_KEEP = object()  # put(): keep the organ labels where painted
#: z (mm) beyond any field of view: tubes that run out of the scan (colon, ureters, SMA) end there
_Z_LOW, _Z_HIGH = -200.0, 130.0


# =============================================================================================
# Painting
# =============================================================================================
class _Painter:
    """HU, organ ids and tissue codes on a :class:`.phantoms._Canvas`, shapes given as signed distances in mm.

    Patient coordinates: x towards the patient's left, y towards posterior, z = RAS S (mm). Every
    shape is evaluated on the index box around it (broadcast float32 coordinates), so a case
    costs well under a second.
    """

    def __init__(self, cv: _Canvas, ids: dict[str, int], hu: dict[str, float]):
        self.cv, self.ids, self.hu = cv, ids, hu
        self.x = cv.x_of(np.arange(cv.ni)).astype(np.float32)
        self.y = cv.y_of(np.arange(cv.nj)).astype(np.float32)
        self.z = (_S_TOP_RAS - cv.s_of(np.arange(cv.nk))).astype(np.float32)
        self.tissue = np.full(cv.values.shape, _CODE["air"], np.uint8)

    def box(self, lo, hi):
        """(k, j, i) slices of the voxels whose centres lie in the patient box lo..hi (x, y, z), or None."""
        out = []
        for axis, a, b in zip((self.x, self.y, self.z), lo, hi):
            i0, i1 = np.searchsorted(axis, a, "left"), np.searchsorted(axis, b, "right")
            if i0 >= i1:
                return None
            out.append(slice(int(i0), int(i1)))
        return out[2], out[1], out[0]

    def coords(self, box):
        """Broadcastable X (1, 1, ni), Y (1, nj, 1), Z (nk, 1, 1) of a box."""
        return (self.x[box[2]][None, None, :], self.y[box[1]][None, :, None], self.z[box[0]][:, None, None])

    def put(self, box, mask, tissue: str, organ=_KEEP, value=None):
        """Paint ``tissue`` (its HU, or the array ``value``) where ``mask`` holds, with an organ name (None = 0)."""
        if box is None:
            return
        mask = np.broadcast_to(mask, tuple(s.stop - s.start for s in box))
        if value is None:
            self.cv.values[box][mask] = self.hu[tissue]
        else:
            self.cv.values[box][mask] = np.broadcast_to(value, mask.shape)[mask]
        self.tissue[box][mask] = _CODE[tissue]
        if organ is not _KEEP:
            self.cv.organs[box][mask] = 0 if organ is None else self.ids[organ]

    def fill(self, shape, tissue: str, organ=_KEEP, where=None):
        """Paint the inside (sd <= 0) of ``shape`` = (box, sd, ...), restricted by ``where(box)`` when given."""
        box, sd = shape[0], shape[1]
        if box is None:
            return
        mask = sd <= 0
        if where is not None:
            mask &= where(box)
        self.put(box, mask, tissue, organ)

    def organ_is(self, *names):
        """``where`` for :meth:`fill`: voxels whose current label is one of ``names`` (None = unlabelled)."""
        ids = [0 if n is None else self.ids[n] for n in names]
        return lambda box: np.isin(self.cv.organs[box], ids)

    # ---- signed distances (mm, < 0 inside) on boxes -----------------------------------------
    def ellipsoid(self, center, radii, rotation=None, pad=0.0):
        """(box, sd, local coordinates) of an ellipsoid; ``rotation`` columns = its axes in patient (x, y, z)."""
        rot = np.eye(3) if rotation is None else np.asarray(rotation, float)
        radii = np.asarray(radii, float)
        center = np.asarray(center, float)
        reach = np.sqrt(((rot * radii[None, :]) ** 2).sum(axis=1)) + pad
        box = self.box(center - reach, center + reach)
        if box is None:
            return None, None, None
        X, Y, Z = self.coords(box)
        d = (X - np.float32(center[0]), Y - np.float32(center[1]), Z - np.float32(center[2]))
        r32 = rot.astype(np.float32)
        q = [d[0] * r32[0, n] + d[1] * r32[1, n] + d[2] * r32[2, n] for n in range(3)]
        return box, _ellipse_sd(q, radii), q

    def column(self, cx, cy, rx, ry, pad=0.0):
        """(box, sd) of a stack of axial ellipses: centre and half-axes per slice (arrays over k; rx <= 0: none)."""
        cx, cy, rx, ry = (np.broadcast_to(np.asarray(v, np.float32), self.z.shape) for v in (cx, cy, rx, ry))
        on = (rx > 0) & (ry > 0)
        if not on.any():
            return None, None
        lo = (float((cx - rx)[on].min()) - pad, float((cy - ry)[on].min()) - pad, float(self.z[on].min()))
        hi = (float((cx + rx)[on].max()) + pad, float((cy + ry)[on].max()) + pad, float(self.z[on].max()))
        box = self.box(lo, hi)
        if box is None:
            return None, None
        X, Y, _ = self.coords(box)
        ks = box[0]

        def per_slice(v):
            return v[ks][:, None, None]

        sd = _ellipse_sd([X - per_slice(cx), Y - per_slice(cy)],
                         [np.maximum(per_slice(rx), 1e-3), np.maximum(per_slice(ry), 1e-3)])
        sd[~on[ks]] = np.inf
        return box, sd

    def tube(self, points, radii, pad=0.0):
        """(box, sd) of a tube along a polyline (n, 3) whose radius (n,) varies linearly between points."""
        points = np.asarray(points, np.float32)
        radii = np.broadcast_to(np.asarray(radii, np.float32), (len(points),))
        reach = float(radii.max()) + pad
        box = self.box(points.min(axis=0) - reach, points.max(axis=0) + reach)
        if box is None:
            return None, None
        sd = np.full(tuple(s.stop - s.start for s in box), np.inf, np.float32)
        for p0, p1, r0, r1 in zip(points[:-1], points[1:], radii[:-1], radii[1:]):
            r = float(max(r0, r1)) + pad
            sub = self.box(np.minimum(p0, p1) - r, np.maximum(p0, p1) + r)
            if sub is None:
                continue
            X, Y, Z = self.coords(sub)
            d = p1 - p0
            length2 = np.float32(max(float(d @ d), 1e-6))
            dx, dy, dz = X - p0[0], Y - p0[1], Z - p0[2]
            t = np.clip((dx * d[0] + dy * d[1] + dz * d[2]) / length2, 0, 1)
            dist = np.sqrt((dx - t * d[0]) ** 2 + (dy - t * d[1]) ** 2 + (dz - t * d[2]) ** 2) - (r0 + t * (r1 - r0))
            rel = tuple(slice(s.start - b.start, s.stop - b.start) for s, b in zip(sub, box))
            np.minimum(sd[rel], dist, out=sd[rel])
        return box, sd


def _ellipse_sd(q, radii):
    """First-order signed distance (mm) to an axis-aligned ellipse / ellipsoid surface in local coordinates ``q``.

    (g - 1) / |grad g| with g the normalised radius: exact on the surface, so shells of a given
    thickness (cortex, walls) keep that thickness all around, unlike thresholds on g itself.
    """
    radii = [np.asarray(r, np.float32) for r in radii]
    g = np.sqrt(sum((qn / rn) ** 2 for qn, rn in zip(q, radii)))
    h = np.sqrt(sum(qn ** 2 / rn ** 4 for qn, rn in zip(q, radii)))
    return ((g - 1) * g / np.maximum(h, np.float32(1e-6))).astype(np.float32, copy=False)


def _smooth_path(points, step_mm=3.0):
    """Points every ~``step_mm`` along a cubic spline through the control points (chord-length parameter)."""
    points = np.asarray(points, float)
    step = np.linalg.norm(np.diff(points, axis=0), axis=1)
    points = points[np.concatenate([[True], step > 1e-3])]
    t = np.concatenate([[0], np.cumsum(step[step > 1e-3])])
    spline = make_interp_spline(t, points, k=min(3, len(points) - 1))
    return spline(np.linspace(0, t[-1], max(int(t[-1] / step_mm), 2) + 1))


def _smooth_noise(shape, sigma_vox, rng):
    """Unit-SD smooth random field on a box (stool mottling, gas bubbles)."""
    f = ndimage.gaussian_filter(rng.standard_normal(shape).astype(np.float32), sigma_vox, mode="reflect")
    return f / max(float(f.std()), 1e-6)


def _smoothstep(t):
    t = np.clip(t, 0, 1)
    return t * t * (3 - 2 * t)


def _unit(v):
    v = np.asarray(v, float)
    return v / np.linalg.norm(v)


def _rot_z(angle):
    c, s = np.cos(angle), np.sin(angle)
    return np.array([[c, -s, 0], [s, c, 0], [0, 0, 1.0]])


def _draw_hu(rng: np.random.Generator, phase: str) -> dict[str, float]:
    """One HU per tissue for this seed and phase (same relative place in each phase's range)."""
    col = PHASES.index(phase)
    u = {name: rng.random() for name in TISSUE_HU}
    hu = {name: lo + u[name] * (hi - lo) for name, ranges in TISSUE_HU.items() for lo, hi in [ranges[col]]}
    if phase == PHASES[0]:
        hu["medulla"] = hu["cortex"] - 4.0 * u["medulla"]  # unenhanced: cortex and medulla within a few HU
    else:
        hu["medulla"] = min(hu["medulla"], hu["cortex"] - 25.0)  # corticomedullary difference persists in PV
    return {k: float(v) for k, v in hu.items()}


# =============================================================================================
# The phantom
# =============================================================================================
def make_ct_phantom(
    seed: int,
    *,
    phase: str | None = None,
    n_lesions: int | Mapping[str, int] | None = None,
    spacing: tuple[float, float, float] = DEFAULT_SPACING,
    shape_ijk: tuple[int, int, int] = DEFAULT_SHAPE_IJK,
    noise_sd_hu: float | None = None,
    healthy_probability: float = HEALTHY_PROBABILITY,
) -> CtCase:
    """One seeded abdominal CT phantom (HU, int16) with TotalSegmentator v2 organ labels and known lesions.

    ``phase``: one of :data:`.ct_lesions.PHASES`, or None to draw it (50/50). ``n_lesions``: None
    draws them (healthy with ``healthy_probability``, else 1-3 kidney lesions in either kidney
    and a pancreatic mass with probability 0.4); an int asks for that many lesions, each in a
    kidney (80 %) or the pancreas (20 %); a mapping {TotalSegmentator organ name: count} asks
    exactly (organs from :data:`.ct_lesions.LESION_ORGANS`). :func:`.ct_lesions.draw_lesions` may
    place fewer when an organ has no room. ``spacing`` (i, j, k, mm) and ``shape_ijk`` set the
    grid, centred on the patient (anatomy is in millimetres, so other grids show the same body);
    ``noise_sd_hu`` overrides the seed's noise SD (0 gives the noise-free, blurred image).
    The anatomy of a seed does not depend on ``phase``, ``n_lesions`` or the grid.
    """
    case, _ = _make(seed, phase=phase, n_lesions=n_lesions, spacing=spacing, shape_ijk=shape_ijk,
                    noise_sd_hu=noise_sd_hu, healthy_probability=healthy_probability)
    return case


def _check(phase, n_lesions, spacing, shape_ijk, noise_sd_hu, healthy_probability):
    if phase is not None:
        check_phase(phase)
    if isinstance(n_lesions, Mapping):
        for organ, n in n_lesions.items():
            if organ not in LESION_ORGANS:
                raise ValueError(f"CT phantom lesions go into {', '.join(LESION_ORGANS)}, not {organ!r}.")
            if int(n) < 0:
                raise ValueError(f"the lesion count for {organ} must be 0 or more, got {n}.")
    elif n_lesions is not None and int(n_lesions) < 0:
        raise ValueError(f"n_lesions must be 0 or more (or None to draw it), got {n_lesions}.")
    sp = np.asarray(spacing, float)
    if sp.shape != (3,) or not np.all(sp > 0) or len(tuple(shape_ijk)) != 3 or min(shape_ijk) < 1:
        raise ValueError(f"the CT phantom grid needs three positive voxel sizes and three positive sizes "
                         f"(got spacing {list(spacing)} mm, shape {list(shape_ijk)}).")
    if noise_sd_hu is not None and noise_sd_hu < 0:
        raise ValueError(f"noise_sd_hu must be 0 or more, got {noise_sd_hu}.")
    if not 0.0 <= healthy_probability <= 1.0:
        raise ValueError(f"healthy_probability must lie in 0..1, got {healthy_probability}.")


def _lesion_counts(n_lesions, rng, healthy_probability) -> dict[str, int]:
    """Lesions per organ (drawn from the lesion stream whatever ``n_lesions`` is, so the stream stays aligned)."""
    u_healthy, n_kidney, u_pancreas = rng.random(), int(rng.integers(KIDNEY_LESIONS[0], KIDNEY_LESIONS[1] + 1)), rng.random()
    sides = rng.random(KIDNEY_LESIONS[1])
    organ_u = rng.random(16)
    counts = {"kidney_left": 0, "kidney_right": 0, "pancreas": 0}
    if isinstance(n_lesions, Mapping):
        counts.update({organ: int(n) for organ, n in n_lesions.items()})
        return counts
    if n_lesions is None:
        if u_healthy < healthy_probability:
            return counts
        for n in range(n_kidney):
            counts["kidney_left" if sides[n] < 0.5 else "kidney_right"] += 1
        counts["pancreas"] = int(u_pancreas < PANCREAS_LESION_PROBABILITY)
        return counts
    organ_u = np.concatenate([organ_u, rng.random(max(int(n_lesions) - organ_u.size, 0))])
    for u in organ_u[:int(n_lesions)]:
        counts["pancreas" if u < 0.2 else ("kidney_left" if u < 0.6 else "kidney_right")] += 1
    return counts


def _make(seed, *, phase=None, n_lesions=None, spacing=DEFAULT_SPACING, shape_ijk=DEFAULT_SHAPE_IJK,
          noise_sd_hu=None, healthy_probability=HEALTHY_PROBABILITY) -> tuple[CtCase, np.ndarray]:
    """The case and its tissue-code map (index into :data:`TISSUES` + 1; for tests and figures)."""
    _check(phase, n_lesions, spacing, shape_ijk, noise_sd_hu, healthy_probability)
    rng = np.random.default_rng(int(seed))
    drawn_phase = PHASES[int(rng.random() < 0.5)]
    phase = drawn_phase if phase is None else phase
    hu = _draw_hu(rng, phase)
    anatomy = _Anatomy(rng, np.random.default_rng([int(seed), _TEXTURE_STREAM]))
    names = class_map()
    ids = {name: i for i, name in names.items()}
    sp = np.asarray(spacing, float)
    ni, nj, nk = (int(n) for n in shape_ijk)
    # the grid is centred on the patient (x, y) with a seeded shift, and on z = anatomy.z_center
    s_top = _S_TOP_RAS - (anatomy.z_center + (nk - 1) * sp[2] / 2)
    cv = _Canvas((ni, nj, nk), sp, center=anatomy.fov_center, s_top=s_top, fill=hu["air"],
                 organ_dtype=label_dtype(names), lesion_labels=False)
    painter = _Painter(cv, ids, hu)
    anatomy.paint(painter)

    m = cv.ijk_to_ras()
    organs = OrganLabels(volume=Volume(cv.organs, m.copy(), modality="SEG", units="label",
                                       meta={"phantom_seed": int(seed)}),
                         names=dict(names), source=ORGAN_SOURCE)
    lesion_rng = np.random.default_rng([int(seed), _LESION_STREAM])
    counts = {o: n for o, n in _lesion_counts(n_lesions, lesion_rng, healthy_probability).items() if n > 0}
    counts = {o: n for o, n in counts.items() if organs.mask(o).any()}
    labels, lesions = insert_lesions(cv.values, organs, counts, phase=phase, rng=lesion_rng)

    noise_rng = np.random.default_rng([int(seed), _NOISE_STREAM])
    psf = float(noise_rng.uniform(*PSF_SIGMA_MM))
    corr = float(noise_rng.uniform(*NOISE_SIGMA_MM))
    sd = float(noise_rng.uniform(*NOISE_SD_HU)) if noise_sd_hu is None else float(noise_sd_hu)
    image = ndimage.gaussian_filter(cv.values, (PSF_Z_FRACTION, psf / sp[1], psf / sp[0]), mode="nearest")
    noise = noise_rng.standard_normal(image.shape, dtype=np.float32)
    if sd > 0:
        ndimage.gaussian_filter(noise, (0.0, corr / sp[1], corr / sp[0]), output=noise, mode="wrap")
        image += noise * np.float32(sd / max(float(noise.std()), 1e-6))
    ct_hu = np.clip(np.rint(image), -1024, 3071).astype(np.int16)
    for les in lesions:  # measured on the CT as delivered (after blur and noise)
        own = labels == les["id"]
        if own.any():
            les["hu_mean"] = round(float(ct_hu[own].mean()), 1)

    meta: dict[str, Any] = {
        "phantom_seed": int(seed), "phase": phase, "noise_hu": round(sd, 2), "noise_sigma_mm": round(corr, 3),
        "psf_sigma_mm": round(psf, 3), "tissue_hu": {k: round(v, 1) for k, v in hu.items()},
    }
    ct = Volume(ct_hu, m, modality="CT", units="HU", meta=meta)
    lab = Volume(labels, m.copy(), modality="SEG", units="label", meta={"phantom_seed": int(seed)})
    case = CtCase(ct=ct, organs=organs, lesion_labels=lab, lesions=lesions, seed=int(seed), phase=phase,
                  source="phantom")
    return case, painter.tissue


class _Anatomy:
    """One seed's anatomy: the main sizes, positions and angles drawn up front, then painted in a fixed order.

    Later structures overwrite earlier ones (HU, tissue and label together). The order is body
    layers, bowel, liver (with its vessels) and gallbladder, stomach and duodenum, spleen,
    kidneys (with perirenal fat, collecting system, ureter, adrenal), psoas, pancreas, vessels,
    mesenteric vessels, paraspinal muscles, spine, ribs.
    """

    def __init__(self, rng: np.random.Generator, texture_rng: np.random.Generator):
        self.rng, self.texture_rng = rng, texture_rng  # texture: sized by the grid, so kept off the shapes' stream
        u = rng.random
        # ---- body: a superellipse muscle outline around (0, y0), fat outside, the cavity inside
        habitus = u()
        self.a_m = 121 + 20 * habitus + float(np.clip(rng.normal(0, 2), -1, 1))  # half-width of the muscle outline
        self.b_ant = 85 + 22 * (0.5 * habitus + 0.5 * u())  # outline centre to the anterior muscle surface
        self.b_post = 92 + rng.normal(0, 3)  # outline centre to the back muscle surface
        self.y0 = -25.0  # outline centre: 25 mm anterior of the vertebral body axis
        self.p_ant, self.p_post = 2.0 + 0.4 * u(), 2.8 + 0.8 * u()  # superellipse exponents (flat back)
        fat = float(np.clip(0.6 * habitus + 0.4 * u(), 0, 1))
        self.t_fat = 6 + 24 * fat  # subcutaneous fat in front (mm); half of it at the back
        self.t_wall = 9 + 5 * u()  # abdominal wall muscle (mm)
        self.flare = 0.02 + 0.03 * u()  # the lower rib cage is wider towards the top
        self.visceral = 0.3 + 0.7 * float(np.clip(0.5 * fat + 0.5 * u(), 0, 1))  # perirenal fat
        self.a_cav = self.a_m - self.t_wall  # cavity half-width
        y_c = self.y0 + ((self.b_post + 0.45 * self.t_fat) - (self.b_ant + self.t_fat)) / 2
        self.fov_center = (float(np.clip(rng.normal(0, 3), -5, 5)), float(y_c + np.clip(rng.normal(0, 3), -5, 5)))
        # ---- spine
        self.period = 33 + 5 * u()  # vertebra + disc height
        self.disc = 7 + 3 * u()
        self.vb = (21 + 4 * u(), 15 + 3 * u())  # vertebral body half-axes (x, y)
        # ---- kidneys: side +1 = patient left (higher), -1 = right
        self.kidneys = {}
        for side in (1, -1):
            self.kidneys[side] = dict(
                center=np.array([side * (66 + 10 * u()), 8 + 8 * u(), 4 + 10 * u() if side > 0 else -10 + 8 * u()]),
                radii=np.array([24 + 5 * u(), 18 + 4 * u(), 48 + 9 * u()]),  # hilum axis, thickness, length
                tilt=(np.radians(8 + 10 * u()), np.radians(8 + 12 * u()), np.radians(25 + 20 * u())),
                cortex=5 + 3 * u(), pyramids=8 + int(rng.integers(0, 5)), phase=u(),
                pelvis=0.8 + 0.5 * u(), fat=4 + 8 * self.visceral,
            )
        # the field of view's centre along z: between the kidneys, with a seeded shift
        self.z_center = float(0.5 * (self.kidneys[1]["center"][2] + self.kidneys[-1]["center"][2]) + rng.normal(3, 4))

    # ---- body ---------------------------------------------------------------------------------
    def _polar(self, p: _Painter):
        """2D maps (j, i): angle from the posterior midline (0..pi), radius from the outline centre, outline radius."""
        X, Y = p.x[None, :].astype(np.float64), p.y[:, None].astype(np.float64)
        dy = Y - self.y0
        rho = np.sqrt(X * X + dy * dy)
        theta = np.arctan2(np.abs(X), dy)
        s, c = np.sin(theta), np.cos(theta)
        post = c >= 0
        b = np.where(post, self.b_post, self.b_ant)
        pe = np.where(post, self.p_post, self.p_ant)
        r0 = 1.0 / ((np.abs(s) / self.a_m) ** pe + (np.abs(c) / b) ** pe) ** (1.0 / pe)
        return theta.astype(np.float32), rho.astype(np.float32), r0.astype(np.float32)

    def _scale(self, z):
        """Outline scale per slice: the lower rib cage flares towards the top."""
        return (1 + self.flare * np.clip((np.asarray(z, np.float64) - 20) / 80, 0, 1.2)).astype(np.float32)

    def paint(self, p: _Painter):
        theta, rho, r0 = self._polar(p)
        self.theta, self.rho, self.r0 = theta, rho, r0
        s = self._scale(p.z)[:, None, None]
        t_fat = (self.t_fat * (0.45 + 0.55 * (1 - np.cos(theta)) / 2)).astype(np.float32)
        t_musc = (self.t_wall + 40 * np.exp(-(theta / 0.55) ** 2)).astype(np.float32)  # thick at the back
        layer = ((rho - t_fat) / r0 < s).astype(np.uint8)  # 1: skin
        layer += (rho - t_fat + 2.0) / r0 < s  # 2: subcutaneous fat
        layer += rho / r0 < s  # 3: muscle
        layer += (rho + t_musc) / r0 < s  # 4: abdominal cavity
        self.layer = layer
        every = tuple(slice(0, n) for n in layer.shape)
        for code, tissue in ((1, "skin"), (2, "fat"), (3, "muscle"), (4, "fat")):
            p.put(every, layer == code, tissue, None)
        self._bowel(p)
        self._liver(p)
        self._stomach_duodenum(p)
        self._spleen(p)
        for side in (1, -1):
            self._kidney(p, side)
        self._psoas(p)
        self._pancreas(p)
        self._vessels(p)
        self._mesentery(p)
        self._autochthon(p)
        self._spine(p)
        self._ribs(p)

    def _in(self, *codes):
        """``where`` for :meth:`_Painter.fill`: voxels in these body layers (3 muscle, 4 cavity)."""
        return lambda box: np.isin(self.layer[box], codes)

    # ---- bowel --------------------------------------------------------------------------------
    def _bowel_segment(self, p, points, radius, organ, content):
        """A bowel tube: wall, then fluid with gas rising anteriorly (to low y), or mottled stool with gas."""
        rng = self.rng
        wall, u_gas, u_level = 2.0 + rng.random(), rng.random(), rng.random()
        path = _smooth_path(points, 4.0)
        box, sd = p.tube(path, radius)
        if box is None:
            return
        inside = (sd <= 0) & (self.layer[box] == 4)
        p.put(box, inside, "bowel_wall", organ)
        lumen = inside & (sd <= -wall)
        if not lumen.any():
            return
        _, Y, _ = p.coords(box)
        y_top = float(np.broadcast_to(Y, lumen.shape)[lumen].min())
        if content == "stool":
            field = _smooth_noise(sd.shape, (0.8, 2.0, 2.0), self.texture_rng)
            depth = (Y - y_top) / (2 * radius)  # 0 anterior .. 1 posterior
            gas = field - 2.5 * depth + (2.4 * u_gas - 0.4) > 0.6
            p.put(box, lumen & ~gas, "stool", value=p.hu["stool"] + 25 * field)
            p.put(box, lumen & gas, "gas")
        else:
            p.put(box, lumen, "bowel_fluid")
            if u_gas < 0.45:
                p.put(box, lumen & (Y < y_top + 3 + u_level * 0.8 * radius), "gas")

    def _bowel(self, p):
        rng, a, b = self.rng, self.a_cav, self.b_ant
        y_front = self.y0 - b + 5
        # small bowel: loops as smooth random walks, mostly below the pancreas and anterior
        for n in range(int(rng.integers(8, 14))):
            if n < 3:  # jejunum in the left upper quadrant
                start = np.array([rng.uniform(20, 0.65 * a), rng.uniform(y_front + 10, -50), rng.uniform(-25, 20)])
            else:
                start = np.array([rng.uniform(-0.6 * a, 0.65 * a), rng.uniform(y_front + 10, -45), rng.uniform(_Z_LOW, -20)])
            pts = [start]
            direction = _unit(rng.normal(size=3))
            for _ in range(int(rng.integers(3, 6))):
                direction = _unit(direction + rng.normal(0, 0.8, 3))
                step = pts[-1] + direction * rng.uniform(22, 35)
                step[0] = np.clip(step[0], -0.7 * a, 0.75 * a)
                step[1] = np.clip(step[1], y_front + 8, -30)
                pts.append(step)
            self._bowel_segment(p, pts, rng.uniform(9, 13), "small_bowel", "fluid")
        # colon frame: ascending (right), hepatic flexure, transverse (anterior, sagging), splenic flexure, descending
        r_c = rng.uniform(15, 22)
        ya = rng.uniform(-15, 5)
        asc = [(-(a - 28), ya, _Z_LOW), (-(a - 30), ya - 5, -30), (-(a - 32), ya - 10, rng.uniform(-5, 10)),
               (-(a - 55), y_front + 0.3 * b, rng.uniform(0, 15))]
        zt = rng.uniform(-15, 10)
        trans = [asc[-1], (-25, y_front + 20, zt), (25, y_front + 20, zt - rng.uniform(0, 15)),
                 (0.6 * a, y_front + 0.4 * b, zt + 15), (a - 30, -20, rng.uniform(25, 45))]
        desc = [trans[-1], (a - 25, 10, 15), (a - 24, 15, -30), (a - 26, 12, _Z_LOW)]
        for pts, r in ((asc, r_c), (trans, r_c * 0.85), (desc, r_c * 0.8)):
            self._bowel_segment(p, [np.array(q, float) + rng.normal(0, 3, 3) for q in pts], r, "colon", "stool")

    # ---- liver, gallbladder ---------------------------------------------------------------------
    def _liver(self, p):
        rng, a, z = self.rng, self.a_cav, p.z.astype(np.float64)
        z_tip = rng.uniform(-80, -40)
        f = np.clip((z - z_tip) / 100.0, 0, 1) ** 0.6
        grow = self._scale(z)
        # right lobe: fills the right upper quadrant front to back; its tip lies anterolateral
        depth = self.b_ant + self.b_post
        p.fill(p.column(-0.42 * a * grow - (1 - f) * 45, self.y0 + 5 - (1 - f) * 20,
                        0.52 * a * grow * f ** 1.3, 0.46 * depth * f), "liver", "liver", self._in(4))
        # left lobe: thin, anterior, across the midline in the upper slices
        z_l = rng.uniform(10, 45)
        fl = np.clip((z - z_l) / 45.0, 0, 1) ** 0.5
        ry_l = 24 + 8 * rng.random()
        y_front = self.y0 - self.b_ant + self.t_wall
        p.fill(p.column(rng.uniform(0, 25), y_front + ry_l + 2, (55 + 20 * rng.random()) * fl, ry_l * fl),
               "liver", "liver", self._in(4))
        in_liver = p.organ_is("liver")
        # vessels inside the liver keep its label: portal branches from the hilum, hepatic veins to the IVC
        self.porta = np.array([-45.0, -35.0, rng.uniform(25, 40)])
        for _ in range(4):
            direction = _unit([rng.uniform(-1, 0.3), rng.uniform(-0.6, 0.8), rng.uniform(-0.3, 0.8)])
            end = self.porta + direction * rng.uniform(50, 90)
            path = _smooth_path([self.porta, (self.porta + end) / 2 + rng.normal(0, 8, 3), end], 4.0)
            p.fill(p.tube(path, np.linspace(5.5, 2.0, len(path))), "portal", where=in_liver)
        top = np.array([-22.0, -(self.vb[1] + 32), _Z_HIGH])
        for end in ((-110, -10, 70), (-50, -85, 55), (25, -90, 70)):  # right, middle, left hepatic veins
            path = [top, np.array(end, float) + rng.normal(0, 8, 3)]
            p.fill(p.tube(path, [6.0, 2.5]), "hepatic_vein", where=in_liver)
        # gallbladder at the inferior surface of the liver, anterior
        c = np.array([-rng.uniform(35, 55), self.y0 - 0.75 * self.b_ant + 15 + rng.uniform(0, 15),
                      z_tip + rng.uniform(40, 70)])
        tilt = np.array([[1, 0, 0], [0, np.cos(0.6), -np.sin(0.6)], [0, np.sin(0.6), np.cos(0.6)]])
        shape = p.ellipsoid(c, np.array([14, 14, 30]) * rng.uniform(0.6, 1.15), _rot_z(rng.uniform(-0.5, 0.5)) @ tilt)
        p.fill(shape, "gallbladder", "gallbladder", self._in(4))

    # ---- stomach, duodenum ------------------------------------------------------------------------
    def _stomach_duodenum(self, p):
        rng, b = self.rng, self.b_ant
        y_front = self.y0 - b + self.t_wall
        c = np.array([rng.uniform(40, 58), rng.uniform(-55, -35), rng.uniform(55, 80)])
        radii = np.array([rng.uniform(35, 50), rng.uniform(26, 36), rng.uniform(40, 55)])
        back = -(self.vb[1] + 30) + rng.uniform(-5, 5)  # the stomach bed: in front of the aorta, further back laterally
        wall, fill = rng.uniform(3, 5), rng.random()
        gas_level = c[1] - radii[1] + fill * 2 * radii[1]  # one air-fluid level (supine: gas anterior)
        antrum = _smooth_path([c + [-10, -20, -radii[2] * 0.6], (0.0, y_front + 25, c[2] - radii[2] - 5),
                               (-28.0, y_front + 35, 15.0)], 4.0)
        for box, sd in (p.ellipsoid(c, radii, _rot_z(rng.uniform(-0.4, 0.2)))[:2],
                        p.tube(antrum, np.linspace(16, 10, len(antrum)))):
            if box is None:
                continue
            X, Y, _ = p.coords(box)
            sd = np.maximum(sd, Y - (back + 0.6 * np.maximum(X - 20, 0)))
            inside = (sd <= 0) & (self.layer[box] == 4)
            lumen = inside & (sd <= -wall)
            stomach = p.cv.organs[box] == p.ids["stomach"]  # the antrum opens into the body: no wall inside it
            lumen |= inside & stomach & (p.tissue[box] != _CODE["bowel_wall"])
            p.put(box, inside & ~stomach, "bowel_wall", "stomach")
            p.put(box, lumen, "bowel_fluid")
            p.put(box, lumen & (Y < gas_level), "gas")
        # duodenum: bulb, descending (right of the pancreatic head), horizontal (between aorta and SMA), ascending
        d_x = -rng.uniform(55, 65)
        z_h = rng.uniform(-45, -30)
        pts = [(-30, y_front + 35, 15), (d_x + 5, -45, 8), (d_x, -25, -10), (d_x + 5, -25, z_h + 8),
               (-20, -50, z_h), (15, -52, z_h + 2), (30, -50, z_h + 20)]
        self._bowel_segment(p, [np.array(q, float) + rng.normal(0, 2, 3) for q in pts], rng.uniform(10, 13),
                            "duodenum", "fluid")

    # ---- spleen -----------------------------------------------------------------------------------
    def _spleen(self, p):
        rng = self.rng
        phi = rng.uniform(0.5, 1.0)
        n = np.array([np.cos(phi), np.sin(phi), 0.0])  # the convex surface faces posterolaterally
        rot = np.column_stack([n, [-np.sin(phi), np.cos(phi), 0.0], [0, 0, 1.0]])
        scale = rng.uniform(0.8, 1.2)
        radii = np.array([24, 48, 58]) * scale
        c = np.array([self.a_cav - 35 * scale, 10 + rng.uniform(0, 15), rng.uniform(50, 70)])
        self.spleen_hilum = c - n * radii[0]
        box, sd, q = p.ellipsoid(c, radii, rot)
        if box is None:
            return
        hilum = _ellipse_sd([q[0] + radii[0] * 1.6, q[1], q[2]], radii * [1.0, 0.5, 0.4])  # concave hilum
        p.put(box, (sd <= 0) & (hilum > 0) & (self.layer[box] == 4), "spleen", "spleen")

    # ---- kidneys --------------------------------------------------------------------------------
    def _kidney(self, p, side):
        """Bean-shaped kidney: cortex rim, pyramids, sinus fat, pelvis and calyces, hilum facing anteromedially."""
        rng, k = self.rng, self.kidneys[side]
        name = "kidney_left" if side > 0 else "kidney_right"
        a_c, a_s, beta = k["tilt"]
        w = _unit([-side * np.tan(a_c), np.tan(a_s), 1.0])  # long axis: upper pole medial and posterior
        m0 = np.array([-side * np.cos(beta), -np.sin(beta), 0.0])
        h = _unit(m0 - (m0 @ w) * w)  # towards the hilum: anteromedial
        rot = np.column_stack([h, np.cross(w, h), w])
        c, r = k["center"], k["radii"]
        k["hilum"], k["upper_pole"] = c + h * r[0] * 0.9, c + w * r[2] * 0.9
        u_adrenal = rng.random(5)
        box, sd, q = p.ellipsoid(c, r, rot, pad=k["fat"])
        if box is not None:
            qu, qv, qw = q
            p.put(box, (sd <= k["fat"]) & (self.layer[box] >= 3), "fat", None)  # perirenal fat
            kidney = sd <= 0
            sinus = _ellipse_sd([qu - 0.3 * r[0], qv, qw], r * [0.5, 0.42, 0.56]) <= 0
            notch = (qu > 0.3 * r[0]) & ((qv / (0.5 * r[1])) ** 2 + (qw / (0.36 * r[2])) ** 2 < 1)
            parenchyma = kidney & ~sinus & ~notch
            # medullary pyramids: cones from the sinus towards the surface (two rows, front and back), the
            # cortex between them (columns of Bertin) and outside them
            nu, nv, nw = (qu - 0.3 * r[0]) / r[0], qv / r[1], qw / r[2]
            norm = np.sqrt(nu * nu + nv * nv + nw * nw) + np.float32(1e-6)
            pyramid = np.zeros(sd.shape, bool)
            for n_p in range(k["pyramids"]):
                psi = np.radians(45) + (n_p + k["phase"]) * np.radians(270) / k["pyramids"]
                chi = np.radians(30) * (1 if n_p % 2 else -1)
                axis = np.array([np.cos(psi) * np.cos(chi), np.sin(chi), np.sin(psi) * np.cos(chi)], np.float32)
                pyramid |= (nu * axis[0] + nv * axis[1] + nw * axis[2]) > np.float32(np.cos(np.radians(24))) * norm
            medulla = parenchyma & (sd <= -k["cortex"]) & pyramid
            p.put(box, kidney & sinus & ~notch, "sinus_fat", name)
            p.put(box, kidney & notch, "sinus_fat", None)
            p.put(box, parenchyma & ~medulla, "cortex", name)
            p.put(box, medulla, "medulla", name)
            # collecting system: pelvis at the hilum, major calyces towards the poles (urine, no excretory phase)
            pel = k["pelvis"]
            collecting = _ellipse_sd([qu - 0.5 * r[0], qv, qw + 0.05 * r[2]], r * np.array([0.42, 0.28, 0.22]) * pel) <= 0
            for pole in (-1, 1):
                collecting |= _ellipse_sd([qu - 0.12 * r[0], qv, qw - pole * 0.38 * r[2]],
                                          r * np.array([0.14, 0.16, 0.24]) * pel) <= 0
            p.put(box, collecting & kidney, "urine", name)
            p.put(box, collecting & ~kidney & (self.layer[box] >= 3), "urine", None)
        # ureter: medially down along the psoas
        ureter = [k["hilum"], k["hilum"] + [-side * 8, -5, -25], (side * (self.vb[0] + 22), -8, _Z_LOW)]
        p.fill(p.tube(_smooth_path(ureter, 4.0), 3.0), "urine", where=lambda bx: (self.layer[bx] == 4) & (p.cv.organs[bx] == 0))
        # adrenal gland: a thin plate superomedial to the upper pole
        ca = k["upper_pole"] + np.array([-side * (8 + 7 * u_adrenal[0]), -(5 + 10 * u_adrenal[1]), 8 + 8 * u_adrenal[2]])
        shape = p.ellipsoid(ca, [2.5, 11 + 4 * u_adrenal[3], 16 + 6 * u_adrenal[4]], _rot_z(side * 0.45))
        p.fill(shape, "adrenal", "adrenal_gland_left" if side > 0 else "adrenal_gland_right", self._in(4))

    # ---- muscles ----------------------------------------------------------------------------------
    def _psoas(self, p):
        rng, z = self.rng, p.z.astype(np.float64)
        z_top = self.period + rng.uniform(-5, 10)  # from about the top of L1, growing downwards
        r = np.where(z < z_top, 5 + (z_top - z) * rng.uniform(0.08, 0.12), 0.0)
        for side in (1, -1):
            p.fill(p.column(side * (self.vb[0] + 0.8 * r + 1), 3 - 0.2 * r, 0.85 * r, r), "muscle",
                   "iliopsoas_left" if side > 0 else "iliopsoas_right", self._in(3, 4))

    def _autochthon(self, p):
        rng = self.rng
        for side in (1, -1):
            rx, ry = rng.uniform(22, 28), rng.uniform(19, 25)
            p.fill(p.column(side * (14 + rx), self.vb[1] + 22 + ry + rng.uniform(-3, 3), rx, ry), "muscle",
                   "autochthon_left" if side > 0 else "autochthon_right", self._in(3, 4))

    # ---- pancreas ---------------------------------------------------------------------------------
    def _pancreas(self, p):
        """A curved tube: uncinate and head at the right renal hilum, neck, body across the aorta, tail at the spleen."""
        rng = self.rng
        zr = self.kidneys[-1]["center"][2]
        hil = self.spleen_hilum
        tail = np.array([min(hil[0] - 12, 85.0), min(hil[1] - 5, 5.0),
                         min(self.kidneys[1]["upper_pole"][2] - rng.uniform(15, 30), zr + rng.uniform(25, 40))])
        ctrl = np.array([
            (-12, -40, zr - 15),  # uncinate process, behind the SMV
            (-34, -50, zr),  # head, at the right renal hilum
            (-8, -68, zr + 10),  # neck, anterior to the SMV / portal confluence
            (22, -64, zr + 14),  # body, anterior to the SMA and aorta
            (50, -40, zr + 20),
            tuple(tail),
        ]) + rng.normal(0, 4, (6, 3))
        radii = np.array([9, 16, 9, 10, 10, 10]) * rng.uniform(0.85, 1.15)
        t = np.concatenate([[0], np.cumsum(np.linalg.norm(np.diff(ctrl, axis=0), axis=1))])
        ts = np.linspace(0, t[-1], max(int(t[-1] / 2.5), 8))
        path = make_interp_spline(t, ctrl, k=3)(ts)
        r = np.interp(ts, t, radii) * (1 + 0.1 * np.sin(ts / rng.uniform(6, 10) + rng.uniform(0, 6.3)))  # lobulated
        # a fat plane around the gland (retroperitoneal fat) separates it from liver, bowel and stomach
        p.fill(p.tube(path, r + 3.0), "fat", None, lambda bx: (self.layer[bx] == 4) & np.isin(
            p.cv.organs[bx], [0] + [p.ids[n] for n in ("liver", "stomach", "small_bowel", "colon", "duodenum")]))
        p.fill(p.tube(path, r), "pancreas", "pancreas", self._in(4))
        self.pancreas_ctrl, self.pancreas_radii = ctrl, radii

    # ---- vessels ----------------------------------------------------------------------------------
    def _vessels(self, p):
        rng, z = self.rng, p.z.astype(np.float64)
        ry_vb = self.vb[1]
        r_a = rng.uniform(9, 13)
        xa, ya = rng.uniform(8, 18), -(ry_vb + r_a + 2)
        p.fill(p.column(xa, ya, r_a, r_a), "artery", "aorta")
        for _ in range(int(rng.integers(1, 5)) if rng.random() < 0.4 else 0):  # wall calcifications
            ang = rng.uniform(0, 2 * np.pi)
            cc = (xa + r_a * np.cos(ang), ya + r_a * np.sin(ang), rng.uniform(-100, 100))
            p.fill(p.ellipsoid(cc, [2.0, 2.0, 3.0]), "calcification", "aorta")
        # IVC: right of the spine, moving anteriorly into the liver at the top
        xi = -rng.uniform(20, 28)
        yi = -(ry_vb + 12) - 20 * np.clip((z - 40) / 60, 0, 1)
        p.fill(p.column(xi, yi, rng.uniform(11, 15), rng.uniform(8, 11)), "ivc", "inferior_vena_cava")
        # SMA from the aorta down anteriorly, SMV to its right, splenic vein behind the pancreas, portal vein to the liver
        z0 = self.kidneys[-1]["center"][2] + 22
        sma = [(xa - 2, ya - r_a + 3, z0), (xa - 5, ya - r_a - 18, z0 - 15), (xa - 8, ya - r_a - 28, _Z_LOW)]
        p.fill(p.tube(_smooth_path(sma, 4.0), 3.5), "artery", None)
        conf = np.array([-10.0, ya - r_a - 16, z0 - 10])
        smv = [conf, conf + [0, -8, -25], (-14, ya - r_a - 30, _Z_LOW)]
        p.fill(p.tube(_smooth_path(smv, 4.0), 5.0), "portal", None)
        ctrl, rad = self.pancreas_ctrl, self.pancreas_radii
        splenic = [self.spleen_hilum + [-5, 5, 0], ctrl[5] + [0, rad[5] + 5, 0], ctrl[4] + [0, rad[4] + 5, 0],
                   ctrl[3] + [0, rad[3] + 5, -2], conf]
        free = lambda bx: (p.cv.organs[bx] == 0) & (self.layer[bx] == 4)  # noqa: E731
        p.fill(p.tube(_smooth_path(splenic, 4.0), 4.0), "portal", "portal_vein_and_splenic_vein", free)
        portal = [conf, (conf + self.porta) / 2 + [0, 5, 0], self.porta]
        p.fill(p.tube(_smooth_path(portal, 4.0), rng.uniform(6, 8)), "portal", "portal_vein_and_splenic_vein")
        # renal veins to the IVC (the left one between the aorta and the SMA), renal arteries from the aorta
        for side in (1, -1):
            hil = self.kidneys[side]["hilum"]
            zi = hil[2] + 5
            y_ivc = float(yi[np.argmin(abs(z - zi))]) if z.size else -(ry_vb + 12)
            if side > 0:
                vein = [hil, (xa + r_a + 6, ya - 2, zi), (xa, ya - r_a - 5, zi), (xi, y_ivc, zi)]
            else:
                vein = [hil, (xi - 5, y_ivc + 3, zi)]
            p.fill(p.tube(_smooth_path(vein, 4.0), 5.0), "portal", where=free)
            p.fill(p.tube([(xa + side * r_a * 0.8, ya + 3, zi + 2), hil + [0, 6, 2]], 3.0), "artery", where=free)

    def _mesentery(self, p):
        """Small mesenteric vessels: short thin tubes through the intra-abdominal fat (dots and streaks in the fat)."""
        rng, a = self.rng, self.a_cav
        y_front = self.y0 - self.b_ant + self.t_wall
        free = lambda bx: (p.cv.organs[bx] == 0) & (self.layer[bx] == 4) & (p.tissue[bx] == _CODE["fat"])  # noqa: E731
        for _ in range(int(rng.integers(25, 45))):
            start = np.array([rng.uniform(-0.7 * a, 0.7 * a), rng.uniform(y_front + 5, 0), rng.uniform(-110, 60)])
            end = start + _unit(rng.normal(size=3)) * rng.uniform(15, 45)
            artery = rng.random() < 0.5
            p.fill(p.tube([start, end], rng.uniform(1.0, 2.2)), "artery" if artery else "portal", where=free)

    # ---- spine --------------------------------------------------------------------------------------
    def _spine(self, p):
        """Vertebrae (named per level; the L1/L2 disc at z = 0), discs, dense endplates, posterior elements, canal."""
        z = p.z.astype(np.float64)
        rx, ry = self.vb
        l1 = _LEVELS.index("L1")
        self.level_z = {name: (l1 - n + 0.5) * self.period for n, name in enumerate(_LEVELS)}
        level = np.floor(z / self.period).astype(int)  # 0: L1, -1: L2, 1: T12, ...
        frac = np.mod(z, self.period)
        dist_disc = np.minimum(frac, self.period - frac)  # mm to the nearest disc centre
        names = ["vertebrae_" + _LEVELS[int(np.clip(l1 - lv, 0, len(_LEVELS) - 1))] for lv in level]
        in_disc = dist_disc < self.disc / 2
        endplate = dist_disc < self.disc / 2 + 2.0
        j0, j1 = np.searchsorted(p.y, -ry - 3), np.searchsorted(p.y, ry + 70)
        i0, i1 = np.searchsorted(p.x, -(rx + 30)), np.searchsorted(p.x, rx + 30)
        sj, si = slice(int(j0), int(j1)), slice(int(i0), int(i1))
        X, Y = p.x[None, si], p.y[sj, None]

        def ell(cx, cy, ax, ay):
            return _ellipse_sd([X - np.float32(cx), Y - np.float32(cy)], [ax, ay])

        body = np.where(ell(0, ry + 5, 9, 8) <= 0, np.float32(1), ell(0, 0, rx, ry))  # posterior concavity
        canal_c = ry + 10
        canal = ell(0, canal_c, 10, 8.5)
        arch = np.where(Y < canal_c - 4, np.float32(1), ell(0, canal_c, 17, 14.5))  # pedicles + laminae
        arch = np.minimum(arch, ell(0, canal_c + 24, 3.5, 12))  # spinous process
        arch = np.minimum(arch, np.minimum(ell(rx + 6, canal_c - 2, 13, 4.5), ell(-(rx + 6), canal_c - 2, 13, 4.5)))
        arch = np.where(canal <= 0, np.float32(1), arch)
        cord = ell(0, canal_c, 5, 4) <= 0
        shell = (body <= 0) & (body > -1.2)
        for k in range(p.cv.nk):
            box = (slice(k, k + 1), sj, si)
            if in_disc[k]:
                p.put(box, body <= 0, "disc", None)
            else:
                # an endplate slice: a 3 mm slab holds about 1 mm of cortical plate (partial volume)
                plate = p.hu["trabecular"] + 0.35 * (p.hu["cortical"] - p.hu["trabecular"])
                p.put(box, body <= 0, "trabecular", names[k], value=plate if endplate[k] else None)
                p.put(box, shell, "cortical", names[k])
            p.put(box, (arch <= 0) & (arch > -1.2), "cortical", names[k])
            p.put(box, arch <= -1.2, "trabecular", names[k])
            p.put(box, canal <= 0, "csf", "spinal_cord")
            if z[k] > -self.period:  # the cord ends at about L1/L2 (conus); below, the canal holds CSF
                p.put(box, cord, "cord", "spinal_cord")

    # ---- ribs ---------------------------------------------------------------------------------------
    def _ribs(self, p):
        """Ribs 7-12 as tubes in the body wall, descending from their vertebra; ribs 7-10 end in costal cartilage.

        Evaluated on the pixels of the wall band only (a few thousand per slice), in polar
        coordinates of the body outline: angle from the posterior midline and depth under it.
        """
        rng, z = self.rng, p.z.astype(np.float64)
        s = self._scale(z)
        depth = 9.0  # rib centre under the muscle outline (mm)
        half_t, half_h = 3.5, 6.0  # half thickness (radial) and half height (along z)
        reach = self.rho + depth
        band = (reach + half_t > self.r0 * float(s.min())) & (reach - half_t < self.r0 * float(s.max()))
        px = np.flatnonzero(band & (self.theta > 0.45))
        theta, rho, r0 = self.theta.ravel()[px], self.rho.ravel()[px], self.r0.ravel()[px]
        left = p.x[px % p.cv.ni] > 0
        values = p.cv.values.reshape(p.cv.nk, -1)
        tissue = p.tissue.reshape(p.cv.nk, -1)
        organs = p.cv.organs.reshape(p.cv.nk, -1)
        for n in _RIBS:
            head0 = self.level_z[f"T{n}"] + rng.normal(0, 3)
            drop0 = rng.uniform(120, 150)
            end = {12: rng.uniform(1.3, 1.7), 11: rng.uniform(1.9, 2.3)}.get(n, rng.uniform(2.55, 2.8))
            last = 3.05 if n <= 10 else end
            for side in (1, -1):
                head, drop = head0 + rng.normal(0, 2), drop0 + rng.normal(0, 4)
                # descending along the wall, steepest at the side; the costal cartilage rises again to the sternum
                z_rib = head - drop * _smoothstep((np.minimum(theta, end) - 0.35) / 2.5)
                z_rib = np.where(theta <= end, z_rib, z_rib + (theta - end) * 180)
                sel = (left if side > 0 else ~left) & (theta < last)
                if not sel.any():
                    continue
                ks = np.flatnonzero((z >= z_rib[sel].min() - half_h) & (z <= z_rib[sel].max() + half_h))
                if ks.size == 0:
                    continue
                ksl = slice(int(ks[0]), int(ks[-1]) + 1)
                cols = px[sel]
                radial = np.abs(rho[sel][None] + depth - s[ksl, None] * r0[sel][None])
                vertical = np.abs(z[ksl, None] - z_rib[sel][None])
                rib = (radial < half_t) & (vertical < half_h)
                if not rib.any():
                    continue
                bone = rib & (theta[sel] <= end)[None]
                marrow = bone & (radial < half_t - 1.0) & (vertical < half_h - 1.5)
                cart = rib & (theta[sel] > end)[None]
                name = f"rib_{'left' if side > 0 else 'right'}_{n}"
                for mask, what, organ in ((bone, "cortical", name), (marrow, "trabecular", name),
                                          (cart, "cartilage", "costal_cartilages")):
                    if not mask.any():
                        continue
                    vk, vc = np.nonzero(mask)
                    vk = vk + ksl.start
                    values[vk, cols[vc]] = p.hu[what]
                    tissue[vk, cols[vc]] = _CODE[what]
                    organs[vk, cols[vc]] = p.ids[organ]
