"""Synthetic whole-body-like FDG PET phantoms (SUV) with ground-truth lesion masks.

There is no real PET on the project's machines, so the demo models are trained and evaluated
on these phantoms, and every number derived from them says so. What they are built to contain
(issue 2): a body outline that changes along z (head, neck, shoulders, thorax, abdomen,
pelvis); physiological uptake that fools SUV thresholding (brain, myocardium, liver, spleen,
kidneys with hot renal pelvis, bladder, blood pool, bone marrow, bowel) next to cold lungs;
scanner blur and count-dependent noise; and 0..k lesions of radius 3-20 mm of varied shape and
contrast in lungs, liver, lymph nodes and bone. Everything is drawn from one seeded generator,
so a seed always gives the same case.

Coordinates: the grid is axial, stored like a DICOM PET series (i towards patient left, j
towards posterior, k towards superior), with RAS origin chosen so the body is centred.
Anatomy is defined in millimetres, so any voxel spacing works (tests use coarse grids).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
from scipy import ndimage

from .volume import Volume, ijk_to_ras_matrix

#: default grid: 192 x 192 x 240 voxels of 2 x 2 x 3 mm (384 x 384 x 720 mm, head to pelvis)
DEFAULT_SHAPE_IJK = (192, 192, 240)
DEFAULT_SPACING = (2.0, 2.0, 3.0)

LESION_SITES = ("lung", "liver", "node", "bone")


@dataclass
class PhantomCase:
    """One synthetic case: PET in SUV, the lesion label map (0 = none, n = lesion n) and lesion facts."""

    pet: Volume
    lesion_labels: Volume
    lesions: list[dict[str, Any]] = field(default_factory=list)
    seed: int = 0

    @property
    def lesion_mask(self) -> np.ndarray:
        return self.lesion_labels.voxels > 0


class _Canvas:
    """Activity and label arrays on a grid, with shapes painted in patient millimetres.

    Patient coordinates: x towards the patient's left, y towards posterior, s = distance
    below the top of the field of view (head end), all in mm.
    """

    def __init__(self, shape_ijk, spacing):
        self.ni, self.nj, self.nk = shape_ijk
        self.sp = np.asarray(spacing, dtype=np.float64)
        self.activity = np.zeros((self.nk, self.nj, self.ni), np.float32)
        self.labels = np.zeros((self.nk, self.nj, self.ni), np.uint8)
        self.length = self.nk * self.sp[2]

    # index <-> patient mm
    def x_of(self, i):
        return (np.asarray(i) - (self.ni - 1) / 2) * self.sp[0]

    def y_of(self, j):
        return (np.asarray(j) - (self.nj - 1) / 2) * self.sp[1]

    def s_of(self, k):
        # k = 0 is the most inferior slice, s = 0 the top of the field of view
        return (self.nk - 1 - np.asarray(k)) * self.sp[2]

    def k_of(self, s):
        return self.nk - 1 - s / self.sp[2]

    def _box(self, center, reach):
        """Index ranges (k, j, i slices) and patient coordinates of the box around ``center``."""
        x, y, s = center
        i0 = int(np.floor((x - reach[0]) / self.sp[0] + (self.ni - 1) / 2))
        i1 = int(np.ceil((x + reach[0]) / self.sp[0] + (self.ni - 1) / 2)) + 1
        j0 = int(np.floor((y - reach[1]) / self.sp[1] + (self.nj - 1) / 2))
        j1 = int(np.ceil((y + reach[1]) / self.sp[1] + (self.nj - 1) / 2)) + 1
        k0 = int(np.floor(self.k_of(s + reach[2])))
        k1 = int(np.ceil(self.k_of(s - reach[2]))) + 1
        i0, j0, k0 = max(i0, 0), max(j0, 0), max(k0, 0)
        i1, j1, k1 = min(i1, self.ni), min(j1, self.nj), min(k1, self.nk)
        if i0 >= i1 or j0 >= j1 or k0 >= k1:
            return None
        kk, jj, ii = np.meshgrid(np.arange(k0, k1), np.arange(j0, j1), np.arange(i0, i1), indexing="ij")
        coords = (self.x_of(ii) - x, self.y_of(jj) - y, self.s_of(kk) - s)
        return (slice(k0, k1), slice(j0, j1), slice(i0, i1)), coords

    def ellipsoid(self, center, radii, rotation=None):
        """(box, inside-mask, normalised radius^2) of an ellipsoid, optionally rotated."""
        reach = np.full(3, max(radii)) if rotation is not None else np.asarray(radii, float)
        got = self._box(center, reach + 1e-6)
        if got is None:
            return None
        box, (dx, dy, ds) = got
        if rotation is not None:
            d = np.stack([dx, dy, ds], axis=-1) @ rotation
            dx, dy, ds = d[..., 0], d[..., 1], d[..., 2]
        r2 = (dx / radii[0]) ** 2 + (dy / radii[1]) ** 2 + (ds / radii[2]) ** 2
        return box, r2 <= 1.0, r2

    def paint(self, center, radii, value, rotation=None, mode="set"):
        got = self.ellipsoid(center, radii, rotation)
        if got is None:
            return None
        box, inside, _ = got
        region = self.activity[box]
        if mode == "set":
            region[inside] = value
        elif mode == "add":
            region[inside] += value
        elif mode == "scale":
            region[inside] *= value
        return box, inside


def _rotation(rng: np.random.Generator) -> np.ndarray:
    q, r = np.linalg.qr(rng.normal(size=(3, 3)))
    return q * np.sign(np.diag(r))


def _profile(s_norm: np.ndarray, knots, values) -> np.ndarray:
    return np.interp(s_norm, knots, values)


def make_phantom(
    seed: int,
    n_lesions: int | None = None,
    shape_ijk: tuple[int, int, int] = DEFAULT_SHAPE_IJK,
    spacing: tuple[float, float, float] = DEFAULT_SPACING,
    max_lesions: int = 4,
    healthy_probability: float = 0.25,
) -> PhantomCase:
    """Make one seeded phantom case.

    ``n_lesions=None`` draws the number of lesions: none with ``healthy_probability``, else
    1..``max_lesions``. The body is scaled to the field of view length (720 mm by default), so
    shorter grids give compressed anatomy rather than a missing pelvis.
    """
    if n_lesions is not None and n_lesions < 0:
        raise ValueError("n_lesions must be >= 0")
    rng = np.random.default_rng(seed)
    cv = _Canvas(shape_ijk, spacing)
    L = cv.length
    zs = L / 720.0  # anatomy is laid out for 720 mm; scale along z for other lengths

    # ---- body outline, varying along z ------------------------------------------------------
    wide = rng.uniform(0.85, 1.12)
    deep = rng.uniform(0.85, 1.12)
    knots = np.array([0, 15, 60, 190, 215, 255, 285, 330, 500, 600, 720]) / 720
    a_mm = np.array([25, 62, 74, 62, 50, 52, 150, 168, 160, 155, 165]) * wide
    b_mm = np.array([30, 78, 95, 82, 55, 58, 100, 112, 112, 110, 108]) * deep
    s_k = cv.s_of(np.arange(cv.nk))
    a_k = _profile(s_k / L, knots, a_mm)
    b_k = _profile(s_k / L, knots, b_mm)
    x_i = cv.x_of(np.arange(cv.ni))
    y_j = cv.y_of(np.arange(cv.nj))
    body = (x_i[None, None, :] / a_k[:, None, None]) ** 2 + (y_j[None, :, None] / b_k[:, None, None]) ** 2
    inner = body <= (1 - 14 / np.maximum(np.minimum(a_k, b_k), 20))[:, None, None] ** 2
    body = body <= 1.0
    muscle = rng.uniform(0.55, 0.9)
    cv.activity[body] = rng.uniform(0.25, 0.4)  # subcutaneous fat
    cv.activity[inner] = muscle

    def S(mm):  # anatomical landmark (mm below the head top in the 720 mm layout) -> s
        return mm * zs + rng.normal(0, 4)

    # ---- head and neck ----------------------------------------------------------------------
    brain = rng.uniform(6.0, 11.0)
    cv.paint((0, -5 * deep, S(100)), (60 * wide, 78 * deep, 68 * zs), brain)
    cv.paint((0, 0, S(105)), (30 * wide, 40 * deep, 35 * zs), brain * rng.uniform(0.45, 0.65))  # white matter
    cv.paint((0, 25 * deep, S(175)), (22 * wide, 18 * deep, 18 * zs), brain * rng.uniform(0.4, 0.7))  # cerebellum
    for side in (-1, 1):  # salivary glands / tonsils: mild physiological uptake
        cv.paint((side * 32 * wide, -10 * deep, S(225)), (10, 12, 14 * zs), rng.uniform(1.5, 3.5))

    # ---- thorax -----------------------------------------------------------------------------
    lung_suv = rng.uniform(0.35, 0.7)
    lungs = []
    for side in (-1, 1):
        c = (side * 72 * wide, 5 * deep, S(410))
        r = (55 * wide, 72 * deep, 118 * zs)
        cv.paint(c, r, lung_suv)
        lungs.append((c, r))
    blood = rng.uniform(1.4, 2.3)
    heart_c = (28 * wide, -38 * deep, S(455))
    heart_r = np.array([48 * wide, 42 * deep, 45 * zs]) * rng.uniform(0.9, 1.1)
    myo = rng.uniform(1.8, 13.0)  # FDG myocardial uptake varies from blood-pool level to very hot
    cv.paint(heart_c, heart_r, myo)
    cv.paint((heart_c[0] + 5, heart_c[1], heart_c[2]), heart_r * 0.62, blood)
    cv.paint((12 * wide, 30 * deep, S(470)), (13, 13, 170 * zs), blood)  # descending aorta
    cv.paint((12 * wide, -5 * deep, S(330)), (14, 30 * deep, 14 * zs), blood)  # aortic arch

    # ---- abdomen ----------------------------------------------------------------------------
    liver_suv = rng.uniform(1.8, 3.0)
    liver_c = (-62 * wide, -5 * deep, S(540))
    liver_r = (82 * wide, 78 * deep, 68 * zs)
    cv.paint(liver_c, liver_r, liver_suv)
    spleen_c = (88 * wide, 40 * deep, S(545))
    cv.paint(spleen_c, (30 * wide, 42 * deep, 48 * zs), liver_suv * rng.uniform(0.7, 1.0))
    for _ in range(rng.integers(2, 6)):  # bowel: patchy physiological uptake
        c = (rng.uniform(-80, 80) * wide, rng.uniform(-70, 10) * deep, S(rng.uniform(590, 670)))
        cv.paint(c, rng.uniform(10, 28, 3), rng.uniform(1.2, 5.0), rotation=_rotation(rng))
    kidney_suv = rng.uniform(2.5, 7.0)
    kidneys = []
    for side in (-1, 1):
        c = (side * 62 * wide, 52 * deep, S(590) + side * 8)
        r = (26 * wide, 30 * deep, 48 * zs)
        cv.paint(c, r, kidney_suv)
        cv.paint((c[0] - side * 8, c[1] - 4, c[2]), (9, 10, 16 * zs), rng.uniform(4.0, 30.0))  # renal pelvis
        kidneys.append((c, r))

    # ---- bone marrow ------------------------------------------------------------------------
    marrow = rng.uniform(1.0, 2.4)
    spine_x, spine_y = 0.0, 78 * deep
    s_top, s_bot = S(235), L
    cv.paint((spine_x, spine_y, (s_top + s_bot) / 2), (15, 15, (s_bot - s_top) / 2), marrow)
    pelvis = []
    for side in (-1, 1):
        c = (side * 88 * wide, 45 * deep, S(655))
        r = (30 * wide, 22 * deep, 45 * zs)
        cv.paint(c, r, marrow * rng.uniform(0.8, 1.1), rotation=None)
        pelvis.append((c, r))

    # ---- bladder ----------------------------------------------------------------------------
    bladder_scale = rng.uniform(0.6, 1.3)
    cv.paint((0, -35 * deep, S(690)), np.array([42 * wide, 36 * deep, 30 * zs]) * bladder_scale, rng.uniform(5.0, 45.0))

    # ---- lesions ----------------------------------------------------------------------------
    if n_lesions is None:
        n_lesions = 0 if rng.random() < healthy_probability else int(rng.integers(1, max_lesions + 1))
    lesions: list[dict[str, Any]] = []
    node_stations = [
        (-30, -5, 228), (30, -5, 228),  # cervical
        (-125, 10, 318), (125, 10, 318),  # axillary
        (-20, -10, 360), (22, 0, 390), (-18, 20, 420),  # mediastinal
        (-25, 45, 620), (25, 45, 635),  # para-aortic
        (-60, 15, 690), (60, 15, 690),  # iliac
    ]
    attempts = 0
    while len(lesions) < n_lesions and attempts < 200:
        attempts += 1
        site = LESION_SITES[int(rng.integers(len(LESION_SITES)))]
        if site == "lung":
            (c, r) = lungs[int(rng.integers(2))]
            u = rng.uniform(-0.65, 0.65, 3)
            center = (c[0] + u[0] * r[0], c[1] + u[1] * r[1], c[2] + u[2] * r[2])
            radius = rng.uniform(3, 20)
        elif site == "liver":
            u = rng.uniform(-0.6, 0.6, 3)
            center = (liver_c[0] + u[0] * liver_r[0], liver_c[1] + u[1] * liver_r[1], liver_c[2] + u[2] * liver_r[2])
            radius = rng.uniform(4, 20)
        elif site == "node":
            st = node_stations[int(rng.integers(len(node_stations)))]
            center = (st[0] * wide + rng.normal(0, 5), st[1] * deep + rng.normal(0, 5), S(st[2]))
            radius = rng.uniform(3, 15)
        else:
            if rng.random() < 0.6:
                center = (spine_x, spine_y, rng.uniform(S(260), S(700)))
                radius = rng.uniform(4, 13)
            else:
                (c, r) = pelvis[int(rng.integers(2))]
                u = rng.uniform(-0.5, 0.5, 3)
                center = (c[0] + u[0] * r[0], c[1] + u[1] * r[1], c[2] + u[2] * r[2])
                radius = rng.uniform(4, 16)
        radius = float(radius)
        radii = radius * rng.uniform(0.7, 1.3, 3)
        radii *= radius / np.cbrt(np.prod(radii))  # keep the equivalent-sphere radius
        rot = _rotation(rng)
        got = cv.ellipsoid(center, radii, rot)
        if got is None:
            continue
        box, inside, _ = got
        if not inside.any() or (cv.labels[box][inside] > 0).any() or not body[box][inside].all():
            continue  # keep lesions separate and inside the body
        shape_mask = inside.copy()
        if radius > 8 and rng.random() < 0.6:  # lobulated: add a satellite lobe
            lobe_c = np.asarray(center) + rot[:, 0] * radii[0] * 0.7
            lobe = cv.ellipsoid(tuple(lobe_c), radii * 0.55, rot)
            if lobe is not None and lobe[0] == box:
                shape_mask |= lobe[1]
        background = float(np.median(cv.activity[box][shape_mask]))
        suv = max(background * rng.uniform(2.0, 5.0), rng.uniform(2.5, 14.0))
        region = cv.activity[box]
        # a slightly heterogeneous lesion (hotter rim / necrotic-ish core for large ones)
        _, _, r2 = got
        profile = np.where(r2 < 0.35, rng.uniform(0.7, 1.0), 1.0) if radius > 12 else 1.0
        region[shape_mask] = (suv * np.broadcast_to(profile, shape_mask.shape))[shape_mask]
        cv.labels[box][shape_mask] = len(lesions) + 1
        lesions.append({
            "id": len(lesions) + 1,
            "site": site,
            "radius_mm": round(radius, 2),
            "suv": round(float(suv), 3),
            "center_patient_mm": [round(float(v), 2) for v in center],
            "voxels": int(shape_mask.sum()),
        })

    # ---- scanner: blur (PSF), count-dependent noise, post-reconstruction filter --------------
    fwhm = rng.uniform(5.5, 7.5)
    sigma_vox = fwhm / 2.3548 / cv.sp[[2, 1, 0]]
    img = ndimage.gaussian_filter(cv.activity, sigma_vox, mode="constant")
    noise_level = rng.uniform(0.12, 0.3)
    noise = rng.standard_normal(img.shape, dtype=np.float32)
    noise = ndimage.gaussian_filter(noise, 2.0 / cv.sp[[2, 1, 0]], mode="constant")
    noise /= max(float(noise.std()), 1e-6)
    img = img + noise_level * np.sqrt(np.maximum(img, 0)) * noise
    img = np.clip(img, 0, None).astype(np.float32)

    # DICOM-like axial geometry: i -> patient left (RAS -x), j -> posterior (RAS -y), k -> superior
    direction = np.diag([-1.0, -1.0, 1.0])
    origin_ras = (
        (cv.ni - 1) / 2 * cv.sp[0],
        (cv.nj - 1) / 2 * cv.sp[1],
        -(cv.nk - 1) * cv.sp[2] + 100.0,
    )
    m = ijk_to_ras_matrix(cv.sp, origin_ras, direction)
    meta = {"phantom_seed": int(seed), "fwhm_mm": round(float(fwhm), 3), "noise_level": round(float(noise_level), 4)}
    pet = Volume(img, m, modality="PT", units="SUVbw", meta=meta)
    lab = Volume(cv.labels, m.copy(), modality="SEG", units="label", meta={"phantom_seed": int(seed)})
    for les in lesions:
        x, y, s = les.pop("center_patient_mm")
        ijk = np.array([[x / cv.sp[0] + (cv.ni - 1) / 2, y / cv.sp[1] + (cv.nj - 1) / 2, cv.k_of(s)]])
        les["center_ras"] = [round(float(v), 2) for v in pet.ijk_to_ras_points(ijk)[0]]
    return PhantomCase(pet=pet, lesion_labels=lab, lesions=lesions, seed=int(seed))
