"""Synthetic whole-body-like FDG PET phantoms (SUV) with ground-truth lesion masks, organ labels and a CT.

There is no real PET on the project's machines, so the demo models are trained and evaluated
on these phantoms, and every number derived from them says so. What they are built to contain
(issue 2): a body outline that changes along z (head, neck, shoulders, thorax, abdomen,
pelvis); physiological uptake that fools SUV thresholding (brain, myocardium, liver, spleen,
kidneys with hot renal pelvis, bladder, blood pool, bone marrow, bowel) next to cold lungs;
scanner blur and count-dependent noise; and 0..k lesions of radius 3-20 mm of varied shape and
contrast in lungs, liver, lymph nodes and bone. Everything in the PET is drawn from one seeded
generator, so a seed always gives the same case (the PET of a seed never changes: models,
tuning and evaluation numbers depend on it).

Organ labels (issue 8): ``case.organs`` labels the phantom's own anatomy on the PET grid with
the ids and names of TotalSegmentator's v2 ``total`` class map (:func:`.roi.class_map`). It
stands in for the TotalSegmentator output of the CT of a PET/CT pair, so the organ ROI stages
run end to end here; it is not TotalSegmentator output. A voxel's organ is the last structure
painted there (the same overwrite order as the activity); lesions leave it unchanged; the
salivary glands, which the ``total`` task has no class for, and the body wall stay 0.

CT (``make_phantom(..., ct=True)``): ``case.ct`` is a CT in HU of the same anatomy, painted
from the same analytic shapes on its own grid (1.5 x 1.5 x 2.5 mm, a 500 mm in-plane field of
view, starting 80 mm below the head top by default), with its own noise generator, and
``case.ct_organs`` its organ labels on that grid. Lesions show modestly (hypodense in liver
and bone, soft tissue in lung, slightly dense nodes). It stands in for a real CT: no beam
hardening, streaks or partial-volume blur, and only vertebral bodies, hip bones and skull for bone.

Coordinates: the PET grid is axial, stored like a DICOM PET series (i towards patient left, j
towards posterior, k towards superior); the anatomy is defined in patient millimetres (x
towards the patient's left, y posterior, s below the head top of the PET field of view), which
every grid maps to RAS the same way: R = -x, A = -y, S = 100 - s. So PET and CT overlay by
physical coordinates, and any voxel spacing works (tests use coarse grids).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
from scipy import ndimage

from .roi import OrganLabels, class_map, label_dtype
from .volume import Volume, ijk_to_ras_matrix

#: default grid: 192 x 192 x 240 voxels of 2 x 2 x 3 mm (384 x 384 x 720 mm, head to pelvis)
DEFAULT_SHAPE_IJK = (192, 192, 240)
DEFAULT_SPACING = (2.0, 2.0, 3.0)

#: default CT grid: voxel size (i, j, k) in mm, in-plane field of view (x, y) in mm centred on
#: ``DEFAULT_CT_CENTER_MM`` (patient x, y), and the depth of its first slice below the top of the
#: PET field of view (it misses the top of the head); it ends at the PET's last slice.
DEFAULT_CT_SPACING = (1.5, 1.5, 2.5)
DEFAULT_CT_FOV_MM = (500.0, 500.0)
DEFAULT_CT_CENTER_MM = (0.0, 0.0)
DEFAULT_CT_TOP_MM = 80.0

LESION_SITES = ("lung", "liver", "node", "bone")

#: what the phantom's organ maps are, for messages and outputs
ORGAN_SOURCE = ("the phantom's anatomy labelled with TotalSegmentator v2 'total' ids and names "
                "(standing in for TotalSegmentator output; not produced by TotalSegmentator)")

#: patient RAS S of the top of the PET field of view (s = 0)
_S_TOP_RAS = 100.0
#: the CT's noise generator: np.random.default_rng([seed, _CT_STREAM]), never the PET's
_CT_STREAM = 0xC7
#: CT noise (standard deviation, HU) and lesion attenuation (HU) by site
_CT_NOISE_HU = 12.0
_CT_LESION_HU = {"lung": 35.0, "liver": 30.0, "node": 60.0, "bone": 120.0}
_CT_NECROSIS_HU = 15.0  # the core of large lesions


@dataclass
class PhantomCase:
    """One synthetic case: PET in SUV, the lesion label map (0 = none, n = lesion n) and lesion facts.

    ``organs``: the anatomy's TotalSegmentator v2 labels on the PET grid; ``ct`` / ``ct_organs``:
    the CT (HU) and its labels on the CT's own grid, when made with ``ct=True`` (else None).
    """

    pet: Volume
    lesion_labels: Volume
    lesions: list[dict[str, Any]] = field(default_factory=list)
    seed: int = 0
    organs: OrganLabels | None = None
    ct: Volume | None = None
    ct_organs: OrganLabels | None = None

    @property
    def lesion_mask(self) -> np.ndarray:
        return self.lesion_labels.voxels > 0


class _Canvas:
    """Painted values, organ ids and lesion labels on one grid, with shapes given in patient millimetres.

    ``values`` is SUV on the PET canvas and HU on the CT canvas; ``labels`` (lesion ids) is the PET's only. Patient coordinates: x towards
    the patient's left, y towards posterior, s = distance below the top of the PET field of view
    (head end), all in mm. ``center`` is the patient (x, y) of the grid's central column and
    ``s_top`` the s of its top slice (both 0 for the PET).
    """

    def __init__(self, shape_ijk, spacing, *, center=(0.0, 0.0), s_top=0.0, fill=0.0, organ_dtype=np.uint8,
                 lesion_labels=True):
        self.ni, self.nj, self.nk = (int(n) for n in shape_ijk)
        self.sp = np.asarray(spacing, dtype=np.float64)
        self.cx, self.cy = (float(c) for c in center)
        self.s_top = float(s_top)
        self.values = np.full((self.nk, self.nj, self.ni), fill, np.float32)
        self.organs = np.zeros((self.nk, self.nj, self.ni), organ_dtype)
        self.labels = np.zeros((self.nk, self.nj, self.ni), np.uint8) if lesion_labels else None
        self.length = self.nk * self.sp[2]

    # index <-> patient mm
    def x_of(self, i):
        return (np.asarray(i) - (self.ni - 1) / 2) * self.sp[0] + self.cx

    def y_of(self, j):
        return (np.asarray(j) - (self.nj - 1) / 2) * self.sp[1] + self.cy

    def s_of(self, k):
        # k = 0 is the most inferior slice, s = s_top the top slice
        return (self.nk - 1 - np.asarray(k)) * self.sp[2] + self.s_top

    def k_of(self, s):
        return self.nk - 1 - (s - self.s_top) / self.sp[2]

    def ijk_to_ras(self) -> np.ndarray:
        """DICOM-like axial geometry: i -> patient left (RAS -x), j -> posterior (RAS -y), k -> superior."""
        direction = np.diag([-1.0, -1.0, 1.0])
        origin_ras = (
            (self.ni - 1) / 2 * self.sp[0] - self.cx,
            (self.nj - 1) / 2 * self.sp[1] - self.cy,
            -(self.nk - 1) * self.sp[2] + _S_TOP_RAS - self.s_top,
        )
        return ijk_to_ras_matrix(self.sp, origin_ras, direction)

    def outline(self, s_norm_length, knots, a_mm, b_mm, slab=48):
        """(body, inner) masks of the elliptical body outline whose half-axes vary along s.

        ``inner`` is the body minus a 14 mm wall (subcutaneous fat). Computed in slabs of slices so
        a fine CT grid needs no whole-volume float64 temporaries.
        """
        body = np.zeros(self.values.shape, bool)
        inner = np.zeros(self.values.shape, bool)
        x_i = self.x_of(np.arange(self.ni))
        y_j = self.y_of(np.arange(self.nj))
        for k0 in range(0, self.nk, slab):
            ks = slice(k0, min(k0 + slab, self.nk))
            s_k = self.s_of(np.arange(ks.start, ks.stop))
            a_k = _profile(s_k / s_norm_length, knots, a_mm)
            b_k = _profile(s_k / s_norm_length, knots, b_mm)
            r = (x_i[None, None, :] / a_k[:, None, None]) ** 2 + (y_j[None, :, None] / b_k[:, None, None]) ** 2
            inner[ks] = r <= (1 - 14 / np.maximum(np.minimum(a_k, b_k), 20))[:, None, None] ** 2
            body[ks] = r <= 1.0
        return body, inner

    def _box(self, center, reach):
        """Index ranges (k, j, i slices) and patient coordinates of the box around ``center``."""
        x, y, s = center
        i0 = int(np.floor((x - self.cx - reach[0]) / self.sp[0] + (self.ni - 1) / 2))
        i1 = int(np.ceil((x - self.cx + reach[0]) / self.sp[0] + (self.ni - 1) / 2)) + 1
        j0 = int(np.floor((y - self.cy - reach[1]) / self.sp[1] + (self.nj - 1) / 2))
        j1 = int(np.ceil((y - self.cy + reach[1]) / self.sp[1] + (self.nj - 1) / 2)) + 1
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

    def paint(self, center, radii, value, organ, rotation=None):
        """Set ``value`` (None: keep the values) and the organ id inside an ellipsoid.

        ``organ``: an id (0 = no ``total`` class), or ``(s_limits, ids)`` for a structure whose
        name changes with height (lung lobes, vertebrae): ids[n] above s_limits[n], the last below.
        """
        got = self.ellipsoid(center, radii, rotation)
        if got is None:
            return
        box, inside, _ = got
        if value is not None:
            self.values[box][inside] = value
        if isinstance(organ, tuple):
            limits, ids = organ
            per_slice = ids[np.searchsorted(limits, self.s_of(np.arange(box[0].start, box[0].stop)), side="right")]
            self.organs[box][inside] = np.broadcast_to(per_slice[:, None, None], inside.shape)[inside]
        else:
            self.organs[box][inside] = organ


class _Scene:
    """Paints each analytic shape on every canvas: the PET (SUV) and, when made, the CT (HU).

    The anatomy is one set of shapes in patient millimetres, so PET and CT agree by physical
    coordinates whatever their grids; the organ names go to ids of :func:`.roi.class_map` here.
    """

    def __init__(self, pet: _Canvas, ct: _Canvas | None, ids: dict[str, int]):
        self.pet, self.ct, self.ids = pet, ct, ids

    def organ(self, name):
        """The id of a TotalSegmentator name (None: no ``total`` class, 0)."""
        return 0 if name is None else self.ids[name]

    def bands(self, *levels):
        """``(s_limits, ids)`` from ``(name, s_end), ..., (name, None)``: a name per height band, top down."""
        limits = np.array([s for _, s in levels[:-1]], dtype=np.float64)
        return limits, np.array([self.organ(name) for name, _ in levels], dtype=self.pet.organs.dtype)

    def paint(self, center, radii, suv, hu, organ, rotation=None):
        """Paint one ellipsoid: ``suv`` on the PET (None: label only), ``hu`` on the CT; organ: a name or bands."""
        organ = organ if isinstance(organ, tuple) else self.organ(organ)
        self.pet.paint(center, radii, suv, organ, rotation)
        if self.ct is not None:
            self.ct.paint(center, radii, hu, organ, rotation)


def _rotation(rng: np.random.Generator) -> np.ndarray:
    q, r = np.linalg.qr(rng.normal(size=(3, 3)))
    return q * np.sign(np.diag(r))


def _profile(s_norm: np.ndarray, knots, values) -> np.ndarray:
    return np.interp(s_norm, knots, values)


def _ct_canvas(pet: _Canvas, spacing, fov_mm, center_mm, top_mm, organ_dtype) -> _Canvas:
    """The CT's grid: its own spacing and in-plane field of view, from ``top_mm`` below the PET top to the PET's last slice."""
    spacing = np.asarray(spacing, dtype=np.float64)
    fov = np.asarray(fov_mm, dtype=np.float64)
    if spacing.shape != (3,) or not np.all(spacing > 0) or fov.shape != (2,) or not np.all(fov >= spacing[:2]):
        raise ValueError(f"the CT grid needs three positive voxel sizes and an in-plane field of view of at least "
                         f"one voxel (got ct_spacing {spacing.tolist()} mm, ct_fov_mm {fov.tolist()} mm).")
    s_last = pet.s_of(0)
    if not 0.0 <= top_mm < s_last:
        raise ValueError(f"ct_top_mm must lie inside the PET's field of view (0 to {s_last:g} mm below its top), "
                         f"got {top_mm:g}.")
    ni, nj = (int(round(f / s)) for f, s in zip(fov, spacing[:2]))
    nk = int(np.floor((s_last - top_mm) / spacing[2] + 1e-9)) + 1
    return _Canvas((ni, nj, nk), spacing, center=center_mm, s_top=top_mm, fill=-1000.0, organ_dtype=organ_dtype,
                   lesion_labels=False)


def _finish_ct(ct: _Canvas, rng: np.random.Generator, slab: int = 32) -> np.ndarray:
    """The CT canvas as int16 HU with Gaussian noise from the CT's own generator, in slabs (little memory)."""
    hu = np.empty(ct.values.shape, np.int16)
    for k0 in range(0, ct.nk, slab):
        part = ct.values[k0:k0 + slab]
        part += _CT_NOISE_HU * rng.standard_normal(part.shape, dtype=np.float32)
        hu[k0:k0 + slab] = np.clip(np.rint(part), -1024, 3071)
    return hu


def make_phantom(
    seed: int,
    n_lesions: int | None = None,
    shape_ijk: tuple[int, int, int] = DEFAULT_SHAPE_IJK,
    spacing: tuple[float, float, float] = DEFAULT_SPACING,
    max_lesions: int = 4,
    healthy_probability: float = 0.25,
    ct: bool = False,
    ct_spacing: tuple[float, float, float] = DEFAULT_CT_SPACING,
    ct_fov_mm: tuple[float, float] = DEFAULT_CT_FOV_MM,
    ct_center_mm: tuple[float, float] = DEFAULT_CT_CENTER_MM,
    ct_top_mm: float = DEFAULT_CT_TOP_MM,
) -> PhantomCase:
    """Make one seeded phantom case: PET, lesion labels, lesion facts, organ labels (and a CT).

    ``n_lesions=None`` draws the number of lesions: none with ``healthy_probability``, else
    1..``max_lesions``. The body is scaled to the field of view length (720 mm by default), so
    shorter grids give compressed anatomy rather than a missing pelvis.

    ``ct=True`` also makes ``case.ct`` (int16 HU) and ``case.ct_organs`` on the CT's own grid:
    voxels of ``ct_spacing`` mm (i, j, k; default 1.5 x 1.5 x 2.5), an in-plane field of view of
    ``ct_fov_mm`` (x, y; default 500 x 500 mm) centred on patient (x, y) ``ct_center_mm``
    (default the body axis), from ``ct_top_mm`` (default 80) mm below the top of the PET's field
    of view down to its last slice. The CT never draws from the PET's generator, so the PET of a
    seed is the same with and without it.
    """
    if n_lesions is not None and n_lesions < 0:
        raise ValueError("n_lesions must be >= 0")
    rng = np.random.default_rng(seed)
    names = class_map()
    organ_dtype = label_dtype(names)
    cv = _Canvas(shape_ijk, spacing, organ_dtype=organ_dtype)
    ct_cv = _ct_canvas(cv, ct_spacing, ct_fov_mm, ct_center_mm, ct_top_mm, organ_dtype) if ct else None
    scene = _Scene(cv, ct_cv, {name: i for i, name in names.items()})
    paint = scene.paint
    L = cv.length
    zs = L / 720.0  # anatomy is laid out for 720 mm; scale along z for other lengths

    # ---- body outline, varying along z ------------------------------------------------------
    wide = rng.uniform(0.85, 1.12)
    deep = rng.uniform(0.85, 1.12)
    knots = np.array([0, 15, 60, 190, 215, 255, 285, 330, 500, 600, 720]) / 720
    a_mm = np.array([25, 62, 74, 62, 50, 52, 150, 168, 160, 155, 165]) * wide
    b_mm = np.array([30, 78, 95, 82, 55, 58, 100, 112, 112, 110, 108]) * deep
    body, inner = cv.outline(L, knots, a_mm, b_mm)
    muscle = rng.uniform(0.55, 0.9)
    cv.values[body] = rng.uniform(0.25, 0.4)  # subcutaneous fat
    cv.values[inner] = muscle
    if ct_cv is not None:
        ct_body, ct_inner = ct_cv.outline(L, knots, a_mm, b_mm)
        ct_cv.values[ct_body] = -100.0  # fat
        ct_cv.values[ct_inner] = 40.0  # muscle and soft tissue
        del ct_body, ct_inner

    def S(mm):  # anatomical landmark (mm below the head top in the 720 mm layout) -> s
        return mm * zs + rng.normal(0, 4)

    # ---- head and neck ----------------------------------------------------------------------
    brain = rng.uniform(6.0, 11.0)
    brain_c, brain_r = (0, -5 * deep, S(100)), np.array([60 * wide, 78 * deep, 68 * zs])
    paint(brain_c, brain_r + (6, 6, 6 * zs), None, 900.0, "skull")  # bone shell: CT only, cold on the PET
    paint(brain_c, brain_r, brain, 38.0, "brain")
    paint((0, 0, S(105)), (30 * wide, 40 * deep, 35 * zs), brain * rng.uniform(0.45, 0.65), 28.0, "brain")  # white matter
    paint((0, 25 * deep, S(175)), (22 * wide, 18 * deep, 18 * zs), brain * rng.uniform(0.4, 0.7), 38.0,
          "brain")  # cerebellum
    for side in (-1, 1):  # salivary glands / tonsils: mild physiological uptake, no 'total' class
        paint((side * 32 * wide, -10 * deep, S(225)), (10, 12, 14 * zs), rng.uniform(1.5, 3.5), 20.0, None)

    # ---- thorax -----------------------------------------------------------------------------
    lung_suv = rng.uniform(0.35, 0.7)
    lungs = []
    for side in (-1, 1):  # side +1: patient left (two lobes), -1: right (three); fissures taken as horizontal
        c = (side * 72 * wide, 5 * deep, S(410))
        r = (55 * wide, 72 * deep, 118 * zs)
        top, height = c[2] - r[2], 2 * r[2]
        lobes = (scene.bands(("lung_upper_lobe_left", top + 0.5 * height), ("lung_lower_lobe_left", None))
                 if side > 0 else
                 scene.bands(("lung_upper_lobe_right", top + 0.38 * height),
                             ("lung_middle_lobe_right", top + 0.6 * height), ("lung_lower_lobe_right", None)))
        paint(c, r, lung_suv, -850.0, lobes)
        lungs.append((c, r))
    blood = rng.uniform(1.4, 2.3)
    heart_c = (28 * wide, -38 * deep, S(455))
    heart_r = np.array([48 * wide, 42 * deep, 45 * zs]) * rng.uniform(0.9, 1.1)
    myo = rng.uniform(1.8, 13.0)  # FDG myocardial uptake varies from blood-pool level to very hot
    paint(heart_c, heart_r, myo, 45.0, "heart")
    paint((heart_c[0] + 5, heart_c[1], heart_c[2]), heart_r * 0.62, blood, 40.0, "heart")  # blood pool
    paint((12 * wide, 30 * deep, S(470)), (13, 13, 170 * zs), blood, 40.0, "aorta")  # descending aorta
    paint((12 * wide, -5 * deep, S(330)), (14, 30 * deep, 14 * zs), blood, 40.0, "aorta")  # aortic arch

    # ---- abdomen ----------------------------------------------------------------------------
    liver_suv = rng.uniform(1.8, 3.0)
    liver_c = (-62 * wide, -5 * deep, S(540))
    liver_r = (82 * wide, 78 * deep, 68 * zs)
    paint(liver_c, liver_r, liver_suv, 60.0, "liver")
    spleen_c = (88 * wide, 40 * deep, S(545))
    paint(spleen_c, (30 * wide, 42 * deep, 48 * zs), liver_suv * rng.uniform(0.7, 1.0), 50.0, "spleen")
    for _ in range(rng.integers(2, 6)):  # bowel: patchy physiological uptake
        c = (rng.uniform(-80, 80) * wide, rng.uniform(-70, 10) * deep, S(rng.uniform(590, 670)))
        colon = abs(c[0]) > 55 * wide or c[2] < 610 * zs  # the colon frames the small bowel (sides and top)
        paint(c, rng.uniform(10, 28, 3), rng.uniform(1.2, 5.0), -60.0 if colon else 25.0,
              "colon" if colon else "small_bowel", rotation=_rotation(rng))
    kidney_suv = rng.uniform(2.5, 7.0)
    kidneys = []
    for side in (-1, 1):  # side +1: patient left
        name = "kidney_left" if side > 0 else "kidney_right"
        c = (side * 62 * wide, 52 * deep, S(590) + side * 8)
        r = (26 * wide, 30 * deep, 48 * zs)
        paint(c, r, kidney_suv, 35.0, name)
        paint((c[0] - side * 8, c[1] - 4, c[2]), (9, 10, 16 * zs), rng.uniform(4.0, 30.0), 10.0, name)  # renal pelvis
        kidneys.append((c, r))

    # ---- bone marrow ------------------------------------------------------------------------
    marrow = rng.uniform(1.0, 2.4)
    spine_x, spine_y = 0.0, 78 * deep
    s_top, s_bot = S(235), L
    # the column named by level: C3-C7 from the neck, T1 at the lung apices, L1 at the lung bases, then S1 and sacrum
    levels = ([(f"vertebrae_C{n}", (235 + 11 * (n - 2)) * zs) for n in range(3, 8)]
              + [(f"vertebrae_T{n}", (290 + 20 * n) * zs) for n in range(1, 13)]
              + [(f"vertebrae_L{n}", (530 + 20 * n) * zs) for n in range(1, 6)]
              + [("vertebrae_S1", 650 * zs), ("sacrum", None)])
    paint((spine_x, spine_y, (s_top + s_bot) / 2), (15, 15, (s_bot - s_top) / 2), marrow, 450.0,
          scene.bands(*levels))
    pelvis = []
    for side in (-1, 1):
        c = (side * 88 * wide, 45 * deep, S(655))
        r = (30 * wide, 22 * deep, 45 * zs)
        paint(c, r, marrow * rng.uniform(0.8, 1.1), 450.0, "hip_left" if side > 0 else "hip_right", rotation=None)
        pelvis.append((c, r))

    # ---- bladder ----------------------------------------------------------------------------
    bladder_scale = rng.uniform(0.6, 1.3)
    paint((0, -35 * deep, S(690)), np.array([42 * wide, 36 * deep, 30 * zs]) * bladder_scale, rng.uniform(5.0, 45.0),
          10.0, "urinary_bladder")

    # ---- lesions (decided and drawn on the PET; the CT shows the same shapes) -----------------
    ct_rng = np.random.default_rng([int(seed), _CT_STREAM]) if ct_cv is not None else None
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
        lobe_c = None
        if radius > 8 and rng.random() < 0.6:  # lobulated: add a satellite lobe
            lobe_c = np.asarray(center) + rot[:, 0] * radii[0] * 0.7
            lobe = cv.ellipsoid(tuple(lobe_c), radii * 0.55, rot)
            if lobe is not None and lobe[0] == box:
                shape_mask |= lobe[1]
            else:
                lobe_c = None
        background = float(np.median(cv.values[box][shape_mask]))
        suv = max(background * rng.uniform(2.0, 5.0), rng.uniform(2.5, 14.0))
        region = cv.values[box]
        # a slightly heterogeneous lesion (hotter rim / necrotic-ish core for large ones)
        _, _, r2 = got
        profile = np.where(r2 < 0.35, rng.uniform(0.7, 1.0), 1.0) if radius > 12 else 1.0
        region[shape_mask] = (suv * np.broadcast_to(profile, shape_mask.shape))[shape_mask]
        cv.labels[box][shape_mask] = len(lesions) + 1
        if ct_cv is not None:
            _ct_lesion(ct_cv, ct_rng, site, center, radii, rot, lobe_c, necrotic=radius > 12)
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
    img = ndimage.gaussian_filter(cv.values, sigma_vox, mode="constant")
    noise_level = rng.uniform(0.12, 0.3)
    noise = rng.standard_normal(img.shape, dtype=np.float32)
    noise = ndimage.gaussian_filter(noise, 2.0 / cv.sp[[2, 1, 0]], mode="constant")
    noise /= max(float(noise.std()), 1e-6)
    img = img + noise_level * np.sqrt(np.maximum(img, 0)) * noise
    img = np.clip(img, 0, None).astype(np.float32)

    m = cv.ijk_to_ras()
    meta = {"phantom_seed": int(seed), "fwhm_mm": round(float(fwhm), 3), "noise_level": round(float(noise_level), 4)}
    pet = Volume(img, m, modality="PT", units="SUVbw", meta=meta)
    lab = Volume(cv.labels, m.copy(), modality="SEG", units="label", meta={"phantom_seed": int(seed)})
    for les in lesions:
        x, y, s = les.pop("center_patient_mm")
        ijk = np.array([[x / cv.sp[0] + (cv.ni - 1) / 2, y / cv.sp[1] + (cv.nj - 1) / 2, cv.k_of(s)]])
        les["center_ras"] = [round(float(v), 2) for v in pet.ijk_to_ras_points(ijk)[0]]
    case = PhantomCase(pet=pet, lesion_labels=lab, lesions=lesions, seed=int(seed),
                       organs=_organ_labels(cv, m.copy(), names, seed))
    if ct_cv is not None:
        ct_m = ct_cv.ijk_to_ras()
        case.ct = Volume(_finish_ct(ct_cv, ct_rng), ct_m, modality="CT", units="HU",
                         meta={"phantom_seed": int(seed), "noise_hu": _CT_NOISE_HU})
        case.ct_organs = _organ_labels(ct_cv, ct_m.copy(), names, seed)
    return case


def _ct_lesion(ct: _Canvas, rng: np.random.Generator, site, center, radii, rot, lobe_center, necrotic) -> None:
    """Paint one lesion's shape on the CT in its site's attenuation (the organ labels stay)."""
    hu = _CT_LESION_HU[site] + rng.normal(0.0, 5.0)
    shapes = [(center, radii)] + ([(tuple(lobe_center), radii * 0.55)] if lobe_center is not None else [])
    for n, (c, r) in enumerate(shapes):
        got = ct.ellipsoid(c, r, rot)
        if got is None:
            continue
        box, inside, r2 = got
        value = np.where(r2 < 0.35, _CT_NECROSIS_HU, hu) if necrotic and n == 0 else hu
        ct.values[box][inside] = np.broadcast_to(value, inside.shape)[inside]


def _organ_labels(canvas: _Canvas, ijk_to_ras: np.ndarray, names: dict[int, str], seed) -> OrganLabels:
    volume = Volume(canvas.organs, ijk_to_ras, modality="SEG", units="label", meta={"phantom_seed": int(seed)})
    return OrganLabels(volume=volume, names=dict(names), source=ORGAN_SOURCE)
