"""Post-processing: thresholds, segmentation, lesion table and the 41 % SUVmax baseline."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import ndimage as ndi
from skimage.filters import threshold_otsu

from DiffusionAnomalyLib.card import default_card
from DiffusionAnomalyLib.measurements import CT_LESION_COLUMNS, LESION_TABLE_COLUMNS, SUV_PEAK_RADIUS_MM, lesion_table
from DiffusionAnomalyLib.postprocessing import (
    Thresholding,
    inside_roi,
    segment,
    suv_threshold_baseline,
    threshold_value,
)
from DiffusionAnomalyLib.volume import Volume, ijk_to_ras_matrix

SHAPE = (20, 24, 28)  # k, j, i


def rotation(ax: float, ay: float, az: float) -> np.ndarray:
    """Rotation matrix from angles in degrees about x, then y, then z."""
    ax, ay, az = np.radians([ax, ay, az])
    rx = np.array([[1, 0, 0], [0, np.cos(ax), -np.sin(ax)], [0, np.sin(ax), np.cos(ax)]])
    ry = np.array([[np.cos(ay), 0, np.sin(ay)], [0, 1, 0], [-np.sin(ay), 0, np.cos(ay)]])
    rz = np.array([[np.cos(az), -np.sin(az), 0], [np.sin(az), np.cos(az), 0], [0, 0, 1]])
    return rz @ ry @ rx


#: Oblique, anisotropic, non-zero origin grid.
SPACING = (0.8, 1.1, 2.5)
MATRIX = ijk_to_ras_matrix(SPACING, (-31.5, 17.25, 102.0), rotation(20, -15, 30))
VOXEL_ML = 0.8 * 1.1 * 2.5 / 1000.0

# Three blobs (slices [k, j, i]): base heat, peak heat at the blob's first voxel.
BLOBS = {
    "A": ((slice(3, 6), slice(3, 6), slice(3, 6)), 0.80, 0.90),  # 27 voxels
    "B": ((slice(12, 14), slice(4, 6), slice(18, 20)), 0.95, 1.00),  # 8 voxels
    "C": ((slice(10, 14), slice(15, 19), slice(5, 9)), 0.60, 0.70),  # 64 voxels
}


def blob_mask(name: str) -> np.ndarray:
    mask = np.zeros(SHAPE, dtype=bool)
    mask[BLOBS[name][0]] = True
    return mask


@pytest.fixture()
def heat() -> Volume:
    arr = np.zeros(SHAPE, dtype=np.float32)
    for sl, base, peak in BLOBS.values():
        arr[sl] = base
        arr[tuple(s.start for s in sl)] = peak
    return Volume(arr, MATRIX.copy(), units="anomaly")


def lesion_sets(labels: np.ndarray) -> list[np.ndarray]:
    return [labels == v for v in range(1, int(labels.max()) + 1)]


# ---- thresholds ------------------------------------------------------------------------------
def test_threshold_value_methods(heat):
    arr = heat.voxels
    assert threshold_value(arr, "fraction", 0.5) == pytest.approx(0.5)
    assert threshold_value(arr * 4, "fraction", 0.25) == pytest.approx(1.0)
    assert threshold_value(arr, "absolute", 0.33) == 0.33
    otsu = threshold_value(arr, "otsu", None)
    nonzero = arr[arr != 0].astype(np.float64)
    reference = threshold_otsu(nonzero)  # bin centre; ours is that bin's upper edge
    bin_width = (nonzero.max() - nonzero.min()) / 256
    assert reference < otsu <= reference + bin_width / 2 + 1e-12
    # Zeros (outside the body / ROI patches) are left out of Otsu: with them it would be far lower.
    assert otsu > threshold_otsu(arr.astype(np.float64)) + 0.1
    # The split is between blob C (0.6, peak 0.7) and A, B (>= 0.8), C's peak voxel included:
    # scikit-image's bin centre (0.6992) would put that 0.7 voxel in the foreground.
    assert reference < 0.7
    assert 0.7 <= otsu < 0.8


FRACTION_RANGE = r"\(0(\.0)?, 1(\.0)?\]"
BAD_THRESHOLDS = [
    ("median", 0.5, "threshold method must be one of fraction, absolute, otsu"),
    (None, 0.5, "threshold method must be one of"),
    ("fraction", 0.0, FRACTION_RANGE),
    ("fraction", 1.5, FRACTION_RANGE),
    ("fraction", -0.2, FRACTION_RANGE),
    ("fraction", float("nan"), "finite"),
    ("fraction", None, "finite number"),
    ("fraction", True, "finite number"),
    ("absolute", float("nan"), "finite"),
    ("absolute", float("inf"), "finite"),
    ("absolute", 0.0, "> 0"),
    ("absolute", "high", "must be a finite number"),
]


@pytest.mark.parametrize("method, value, message", BAD_THRESHOLDS)
def test_threshold_value_rejects_bad_parameters(heat, method, value, message):
    with pytest.raises(ValueError, match=message):
        threshold_value(heat.voxels, method, value)


@pytest.mark.parametrize("method, value, message", BAD_THRESHOLDS)
def test_thresholding_refuses_what_segment_would_refuse(heat, method, value, message):
    """One rule (card.check_threshold): Thresholding.check and from_card refuse before any heat map exists."""
    with pytest.raises(ValueError, match=message):
        Thresholding(method=method, value=value, min_size_ml=0.0).check()
    overrides = {"method": method, "value": value}
    if method is None or value is None:
        return  # None is "not given" for from_card: the card's default applies
    with pytest.raises(ValueError, match=message):
        Thresholding.from_card(default_card(), **overrides)


@pytest.mark.parametrize("min_size_ml", [-1.0, float("nan"), float("inf"), "big", True])
def test_min_size_is_checked_up_front_and_in_segment(heat, min_size_ml):
    with pytest.raises(ValueError, match="minimum lesion size"):
        Thresholding.from_card(default_card(), min_size_ml=min_size_ml)
    with pytest.raises(ValueError, match="minimum lesion size"):
        segment(heat, min_size_ml=min_size_ml)


def test_thresholding_from_card_and_otsu():
    card = default_card()
    th = Thresholding.from_card(card)
    assert th.as_parameters() == {"threshold_method": "fraction", "threshold_value": 0.5, "min_size_ml": 0.5}
    assert Thresholding(min_size_ml=None).check().min_size_ml is None  # None: no size filter
    # Otsu computes its threshold from the map: a value left from another method is not used (Slicer's Otsu button)
    otsu = Thresholding.from_card(card, method="otsu", value=0.3)
    assert (otsu.method, otsu.value) == ("otsu", None)
    assert Thresholding.from_card(card, method="absolute", value=2.5).value == 2.5


def test_constant_or_empty_maps_select_nothing():
    constant = Volume(np.full(SHAPE, 0.3, np.float32), MATRIX)
    assert segment(constant, method="otsu").max() == 0
    zeros = Volume(np.zeros(SHAPE, np.float32), MATRIX)
    for method, value in (("otsu", None), ("fraction", 0.5), ("fraction", 1.0)):
        assert segment(zeros, method=method, value=value).max() == 0


def test_nan_in_map_is_rejected(heat):
    heat.voxels[0, 0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        segment(heat)
    with pytest.raises(ValueError, match="NaN"):
        threshold_value(heat.voxels, "otsu")


# ---- segment() -------------------------------------------------------------------------------
def test_segment_counts_shapes_and_order_by_max_heat(heat):
    labels = segment(heat, method="fraction", value=0.5)
    assert labels.dtype == np.int32 and labels.shape == SHAPE
    assert labels.max() == 3
    # Lesion 1 is the most anomalous (B, max 1.0), then A (0.9), then C (0.7); shapes are exact.
    for lesion, name in zip(lesion_sets(labels), "BAC"):
        np.testing.assert_array_equal(lesion, blob_mask(name))
    assert [int(heat.voxels[labels == v].max() * 100 + 0.5) for v in (1, 2, 3)] == [100, 90, 70]
    # Deterministic.
    np.testing.assert_array_equal(labels, segment(heat, method="fraction", value=0.5))


def test_absolute_and_otsu_thresholds(heat):
    two = segment(heat, method="absolute", value=0.75)  # C (<= 0.7) is below
    assert two.max() == 2
    np.testing.assert_array_equal(two == 1, blob_mask("B"))
    np.testing.assert_array_equal(two == 2, blob_mask("A"))
    peak_only = segment(heat, method="absolute", value=0.85)  # all of B, only A's peak voxel
    assert [(peak_only == v).sum() for v in (1, 2)] == [8, 1]
    otsu = segment(heat, method="otsu")
    np.testing.assert_array_equal(otsu, two)  # Otsu separates C (0.6-0.7) from A and B (>= 0.8)


def test_min_size_in_voxels_and_ml(heat):
    labels = segment(heat, min_size_voxels=8)  # B has exactly 8 voxels: kept (inclusive)
    assert labels.max() == 3
    labels = segment(heat, min_size_voxels=9)
    assert labels.max() == 2
    np.testing.assert_array_equal(labels == 1, blob_mask("A"))
    np.testing.assert_array_equal(labels == 2, blob_mask("C"))
    # In ml, through |det(IJK->RAS)| of the oblique grid: A = 27 voxels, C = 64.
    assert segment(heat, min_size_ml=27 * VOXEL_ML).max() == 2
    only_c = segment(heat, min_size_ml=28 * VOXEL_ML)
    assert only_c.max() == 1
    np.testing.assert_array_equal(only_c == 1, blob_mask("C"))
    # Both criteria apply together.
    assert segment(heat, min_size_voxels=9, min_size_ml=65 * VOXEL_ML).max() == 0
    with pytest.raises(ValueError, match="min_size_voxels"):
        segment(heat, min_size_voxels=-1)


def test_roi_restricts_lesions(heat):
    roi = np.zeros(SHAPE, dtype=np.uint8)
    roi[:, :, :7] = 1  # contains A entirely, C's i in 5..6 (half of it), not B (i >= 18)
    labels = segment(heat, roi=roi)
    assert labels.max() == 2
    np.testing.assert_array_equal(labels == 1, blob_mask("A"))
    np.testing.assert_array_equal(labels == 2, blob_mask("C") & (roi > 0))
    assert (labels == 2).sum() == 32
    assert not labels[roi == 0].any()
    with pytest.raises(ValueError, match=r"\(20, 24, 28\).*\(20, 24, 27\)"):
        segment(heat, roi=roi[:, :, :-1])


def test_connectivity_parameter():
    arr = np.zeros(SHAPE, np.float32)
    arr[5, 5, 5] = 1.0
    arr[6, 6, 6] = 0.9  # touches the first voxel only at a corner
    vol = Volume(arr, MATRIX)
    assert segment(vol).max() == 1  # 26-connectivity (default)
    assert segment(vol, connectivity=18).max() == 2
    assert segment(vol, connectivity=6).max() == 2
    with pytest.raises(ValueError, match="connectivity"):
        segment(vol, connectivity=4)


def test_opening_closing_and_hole_filling():
    arr = np.zeros(SHAPE, np.float32)
    arr[5:10, 5:10, 5:10] = 1.0
    arr[7, 7, 7] = 0.0  # an internal hole
    arr[7, 7, 10:13] = 1.0  # a thin spur sticking out of the cube
    vol = Volume(arr, MATRIX)
    raw = segment(vol)
    assert raw[7, 7, 10:13].all() and raw[7, 7, 7] == 0
    cleaned = segment(vol, opening=True)
    assert cleaned.max() == 1
    assert not cleaned[7, 7, 11:13].any()  # opening removed the spur
    assert cleaned[7, 7, 7] == 1  # hole filling filled the cavity
    assert cleaned[6:9, 6:9, 6:9].all()
    # The ROI is re-applied after morphology.
    roi = np.ones(SHAPE, bool)
    roi[7] = False
    assert not segment(vol, opening=True, roi=roi)[7].any()


def test_min_inplane_extent():
    arr = np.zeros(SHAPE, np.float32)
    arr[2:12, 4, 4] = 1.0  # a column along k: in-plane sides 0.8 and 1.1 mm
    arr[2:4, 10:14, 10:14] = 0.9  # in-plane sides 3.2 and 4.4 mm
    vol = Volume(arr, MATRIX)
    assert segment(vol).max() == 2
    kept = segment(vol, min_inplane_mm=3.0)
    assert kept.max() == 1 and kept[2, 10, 10] == 1


def test_segment_requires_a_volume(heat):
    with pytest.raises(ValueError, match="Volume"):
        segment(heat.voxels)


# ---- lesion_table ----------------------------------------------------------------------------
def ras_of(matrix: np.ndarray, ijk: np.ndarray) -> np.ndarray:
    return (matrix @ np.append(ijk, 1.0))[:3]


def brute_force_peak(image: Volume, lesion: np.ndarray, radius: float) -> float:
    """Max over lesion voxels of the mean image value of all voxels within ``radius`` mm (RAS)."""
    kji = np.argwhere(np.ones(image.voxels.shape, bool))
    ras = image.ijk_to_ras_points(kji[:, ::-1])
    values = image.voxels.reshape(-1).astype(np.float64)
    best = -np.inf
    for centre in np.argwhere(lesion):
        c = ras_of(image.ijk_to_ras, centre[::-1].astype(float))
        near = np.linalg.norm(ras - c, axis=1) <= radius + 1e-9
        best = max(best, values[near].mean())
    return best


def test_lesion_table_matches_hand_computation(heat):
    rng = np.random.default_rng(0)
    suv = rng.gamma(2.0, 1.5, size=SHAPE).astype(np.float32)
    image = Volume(suv, MATRIX.copy(), modality="PT", units="SUVbw")
    labels = segment(heat)
    rows = lesion_table(labels, image, heat)
    assert [r["id"] for r in rows] == [1, 2, 3]
    for row in rows:
        assert tuple(row) == LESION_TABLE_COLUMNS
        mask = labels == row["id"]
        values = suv[mask].astype(np.float64)
        assert row["voxels"] == mask.sum()
        assert row["volume_ml"] == pytest.approx(mask.sum() * VOXEL_ML, rel=1e-9)
        assert row["suv_max"] == pytest.approx(values.max())
        assert row["suv_mean"] == pytest.approx(values.mean(), rel=1e-9)
        # TLG is over the MTV (measurements: every MTV voxel >= 41 % of SUVmax); exact values in test_measurements
        assert row["tlg"] >= 0.41 * row["suv_max"] * row["mtv_ml"] > 0 and row["organ"] == "none"
        assert row["max_heat"] == pytest.approx(heat.voxels[mask].max())
        centroid = ras_of(MATRIX, np.argwhere(mask).mean(axis=0)[::-1])
        np.testing.assert_allclose([row["centroid_r"], row["centroid_a"], row["centroid_s"]], centroid, atol=1e-9)
        assert row["suv_max"] >= row["suv_peak"] >= 0
    # Blob B's voxel centroid (i 18.5, j 4.5, k 12.5) through the oblique matrix.
    np.testing.assert_allclose(
        [rows[0]["centroid_r"], rows[0]["centroid_a"], rows[0]["centroid_s"]],
        (MATRIX @ [18.5, 4.5, 12.5, 1.0])[:3],
        atol=1e-9,
    )
    # Blob B touches no border: SUVpeak equals the direct definition on RAS distances.
    assert rows[0]["suv_peak"] == pytest.approx(brute_force_peak(image, labels == 1, SUV_PEAK_RADIUS_MM), rel=1e-9)


def test_suv_peak_on_constant_sphere_and_hot_spot():
    shape = (26, 24, 22)
    matrix = ijk_to_ras_matrix((1.5, 2.0, 2.5), (40.0, -12.0, -300.0), rotation(-25, 10, 40))
    vol = Volume(np.ones(shape, np.float32), matrix, modality="PT", units="SUVbw")
    kji = np.argwhere(np.ones(shape, bool))
    centre = vol.ijk_to_ras_points(np.array(shape[::-1]) / 2.0 - 0.5)[0]
    dist = np.linalg.norm(vol.ijk_to_ras_points(kji[:, ::-1]) - centre, axis=1).reshape(shape)
    sphere = dist <= 14.0
    suv = np.where(sphere, 5.0, 1.0).astype(np.float32)
    suv[4, 4, 4] = 12.0  # an isolated hot voxel far from the sphere
    image = vol.with_voxels(suv)
    labels = np.zeros(shape, np.int32)
    labels[sphere] = 1
    labels[4, 4, 4] = 2
    rows = lesion_table(labels, image, vol)
    assert rows[0]["suv_peak"] == pytest.approx(5.0, rel=1e-9)
    assert rows[0]["suv_mean"] == pytest.approx(5.0) and rows[0]["suv_max"] == pytest.approx(5.0)
    # The hot spot: peak = (12 + (n - 1) * 1) / n with n voxel centres within 6.2 mm.
    n_in_sphere = int((np.linalg.norm(
        vol.ijk_to_ras_points(kji[:, ::-1]) - vol.ijk_to_ras_points([[4, 4, 4]])[0], axis=1
    ) <= SUV_PEAK_RADIUS_MM).sum())
    assert n_in_sphere > 5
    assert rows[1]["suv_max"] == 12.0
    assert rows[1]["suv_peak"] == pytest.approx((12.0 + n_in_sphere - 1) / n_in_sphere, rel=1e-9)
    assert rows[1]["suv_peak"] < rows[1]["suv_max"]


def test_suv_peak_fine_grid_and_border_against_brute_force():
    """1 mm-ish voxels: the kernel has ~1000 voxels (FFT path); a lesion on the volume border."""
    shape = (18, 20, 19)
    matrix = ijk_to_ras_matrix((1.0, 1.2, 0.9), (5.0, 6.0, -7.0), rotation(5, 30, -20))
    rng = np.random.default_rng(1)
    image = Volume(rng.uniform(0.5, 8.0, size=shape).astype(np.float32), matrix, units="SUVbw")
    labels = np.zeros(shape, np.int32)
    labels[8:11, 9:12, 8:10] = 1
    labels[0:2, 0:3, 17:19] = 2  # on a corner of the volume
    rows = lesion_table(labels, image, image)
    for row in rows:
        expected = brute_force_peak(image, labels == row["id"], SUV_PEAK_RADIUS_MM)
        assert row["suv_peak"] == pytest.approx(expected, rel=1e-7)


def reference_lesion_table(labels: np.ndarray, image: Volume, heat: Volume) -> list[dict]:
    """Straightforward numpy lesion table, one boolean mask per lesion (SUVpeak by brute force).

    The centroid is the mean voxel index within the lesion's bounding box plus the box's corner,
    the arithmetic the table has always used, so every number but SUVpeak must match exactly
    (MTV and TLG are checked against their definition in test_measurements).
    """
    voxel_ml = abs(float(np.linalg.det(image.ijk_to_ras[:3, :3]))) / 1000.0
    rows = []
    for lab in np.unique(labels[labels > 0]):
        mask = labels == lab
        values = image.voxels[mask].astype(np.float64)
        kji = np.argwhere(mask)
        corner = kji.min(axis=0)
        centroid = image.ijk_to_ras_points(((kji - corner).mean(axis=0) + corner)[::-1])[0]
        volume_ml = int(mask.sum()) * voxel_ml
        rows.append({
            "id": int(lab),
            "organ": "none",
            "voxels": int(mask.sum()),
            "volume_ml": volume_ml,
            "suv_max": float(values.max()),
            "suv_mean": float(values.mean()),
            "suv_peak": brute_force_peak(image, mask, SUV_PEAK_RADIUS_MM),
            "max_heat": float(heat.voxels[mask].max()),
            "centroid_r": float(centroid[0]),
            "centroid_a": float(centroid[1]),
            "centroid_s": float(centroid[2]),
        })
    return rows


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_lesion_table_rows_identical_to_numpy_reference(seed):
    """regionprops_table gives the same rows (keys, order, types, values) as plain numpy.

    Random blobs on anisotropic grids (oblique for odd seeds), lesions on the volume's faces and
    corner, non-consecutive label values, float32 and float64 images, bool labels for seed 3.
    """
    rng = np.random.default_rng(seed)
    shape = (11 + seed, 14, 13 - seed)
    spacing = (0.9, 1.7, 3.1) if seed % 2 == 0 else (2.3, 0.7, 1.4)
    matrix = ijk_to_ras_matrix(spacing, (12.5, -40.0, 7.25), rotation(10, -35, 60) if seed % 2 else np.eye(3))
    field = ndi.gaussian_filter(rng.standard_normal(shape), 1.2)
    mask = field > np.quantile(field, 0.85)
    mask[0, 0:2, 0:3] = True  # a corner lesion
    mask[-1, 5:8, -1] = True  # a lesion on two faces
    labels, n = ndi.label(mask)
    assert n >= 3
    labels = np.where(labels > 0, 3 * labels + 1, 0).astype(np.int32)  # ids 4, 7, 10, ...
    if seed == 3:
        labels = labels > 0
    dtype = np.float64 if seed == 2 else np.float32
    image = Volume((rng.gamma(2.0, 1.5, size=shape) * 10.0 ** seed).astype(dtype), matrix, units="SUVbw")
    heat = Volume(rng.random(shape).astype(np.float32), matrix.copy(), units="anomaly")

    rows = lesion_table(labels, image, heat)
    expected = reference_lesion_table(labels, image, heat)
    ids = [1] if seed == 3 else list(range(4, 3 * n + 2, 3))
    assert [r["id"] for r in rows] == [r["id"] for r in expected] == ids
    for got, ref in zip(rows, expected):
        assert tuple(got) == LESION_TABLE_COLUMNS
        assert [type(v) for v in got.values()] == [int, str, int] + [float] * 10
        assert got["suv_peak"] == pytest.approx(ref.pop("suv_peak"), rel=1e-9)
        assert {k: got[k] for k in ref} == ref  # exact equality


def test_lesion_table_on_ct_has_hu_columns(heat):
    """Issue 10: a CT's lesion table holds HU mean and range instead of the SUV columns (it kept the PET names)."""
    ct = Volume(np.full(SHAPE, -50.0, np.float32), MATRIX.copy(), modality="CT", units="HU")
    rows = lesion_table(segment(heat), ct, heat)
    assert len(rows) == 3
    assert all(tuple(r) == tuple(c.name for c in CT_LESION_COLUMNS) for r in rows)
    assert rows[0]["hu_mean"] == rows[0]["hu_min"] == rows[0]["hu_max"] == -50.0
    assert "suv_mean" not in rows[0] and "tlg" not in rows[0]
    # an image without modality or units keeps the PET columns, in its own units
    plain = ct.with_voxels(ct.voxels, modality=None, units=None)
    rows = lesion_table(segment(heat), plain, heat)
    assert all(tuple(r) == LESION_TABLE_COLUMNS for r in rows)
    assert rows[0]["suv_mean"] == -50.0 and rows[0]["suv_peak"] == pytest.approx(-50.0)
    assert rows[0]["mtv_ml"] == rows[0]["tlg"] == 0.0  # no voxel reaches 41 % of a negative maximum


def test_lesion_table_validation(heat):
    image = Volume(np.ones(SHAPE, np.float32), MATRIX.copy(), units="SUVbw")
    labels = segment(heat)
    assert lesion_table(np.zeros(SHAPE, np.int32), image, heat) == []
    with pytest.raises(ValueError, match=r"labels \(20, 24, 27\).*image \(20, 24, 28\)"):
        lesion_table(labels[:, :, :-1], image, heat)
    with pytest.raises(ValueError, match="shapes differ"):
        lesion_table(labels, image, Volume(heat.voxels[:-1], MATRIX))
    moved = MATRIX.copy()
    moved[0, 3] += 5.0
    with pytest.raises(ValueError, match="geometry"):
        lesion_table(labels, image, Volume(heat.voxels, moved))
    nan_heat = heat.with_voxels(np.where(labels > 0, np.nan, 0).astype(np.float32))
    with pytest.raises(ValueError, match="NaN"):
        lesion_table(labels, image, nan_heat)
    with pytest.raises(ValueError, match="integers"):
        lesion_table(labels.astype(np.float32), image, heat)


# ---- 41 % SUVmax baseline --------------------------------------------------------------------
def test_baseline_global_vs_per_slice():
    rng = np.random.default_rng(2)
    img = rng.uniform(0.0, 1.0, size=(4, 6, 5))
    img[0] *= 10.0  # one hot slice dominates the global maximum
    global_mask = suv_threshold_baseline(img)
    np.testing.assert_array_equal(global_mask, img > 0.41 * img.max())
    assert global_mask[1:].sum() == 0 and global_mask[0].sum() > 0
    per_slice = suv_threshold_baseline(img, axis=0)
    expected = np.stack([s > 0.41 * s.max() for s in img])
    np.testing.assert_array_equal(per_slice, expected)
    assert per_slice[1:].sum() > 0
    per_column = suv_threshold_baseline(img, fraction=0.5, axis=-1)
    expected = np.stack([img[..., i] > 0.5 * img[..., i].max() for i in range(5)], axis=-1)
    np.testing.assert_array_equal(per_column, expected)
    # A slice without uptake selects nothing; a Volume is accepted.
    img[2] = 0.0
    assert not suv_threshold_baseline(img, axis=0)[2].any()
    vol = Volume(img, MATRIX)
    np.testing.assert_array_equal(suv_threshold_baseline(vol), img > 0.41 * img.max())


def test_baseline_validation():
    img = np.ones((3, 3, 3))
    for bad in (0.0, 1.2, math.nan):
        with pytest.raises(ValueError, match="fraction"):
            suv_threshold_baseline(img, fraction=bad)
    with pytest.raises(ValueError, match="axis"):
        suv_threshold_baseline(img, axis=3)
    img[1, 1, 1] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        suv_threshold_baseline(img)


def test_bounding_box_is_the_smallest_box_holding_the_mask():
    from DiffusionAnomalyLib.postprocessing import bounding_box

    mask = np.zeros((5, 6, 7), dtype=bool)
    assert bounding_box(mask) is None
    mask[1, 2, 3] = mask[3, 4, 6] = True
    box = bounding_box(mask)
    assert box == (slice(1, 4), slice(2, 5), slice(3, 7))
    assert mask[box].sum() == mask.sum()


def test_segment_labels_only_the_candidates_box_but_numbers_as_the_whole_volume():
    """segment() labels the candidates' bounding box only; the result must equal labelling everything."""
    from skimage import measure as sk_measure

    rng = np.random.default_rng(5)
    arr = np.zeros((30, 40, 50), dtype=np.float32)
    arr[5:25, 8:30, 10:45] = rng.random((20, 22, 35)).astype(np.float32)
    heat = Volume(voxels=arr, ijk_to_ras=np.diag([2.0, 2.0, 3.0, 1.0]))
    out = segment(heat, method="absolute", value=0.8, min_size_voxels=2)
    full = sk_measure.label(arr > 0.8, connectivity=3)
    sizes = np.bincount(full.ravel())
    kept = [lab for lab in range(1, full.max() + 1) if sizes[lab] >= 2]
    assert out.max() == len(kept)
    # same components, each renumbered by descending max heat (ties by size, then raster label)
    maxima = {lab: float(arr[full == lab].max()) for lab in kept}
    order = sorted(kept, key=lambda lab: (-maxima[lab], -sizes[lab], lab))
    for new, lab in enumerate(order, start=1):
        np.testing.assert_array_equal(out == new, full == lab)


def test_with_an_organ_roi_the_threshold_is_taken_from_the_map_inside_it():
    """An excluded hot organ (a bladder) neither shows nor sets the scale of a fraction or Otsu threshold."""
    heat = np.zeros((20, 20, 20), np.float32)
    heat[2:6, 2:6, 2:6] = 10.0  # the excluded organ's heat
    heat[12:16, 12:16, 12:16] = 2.0  # a lesion inside the ROI
    heat[12:16, 2:6, 12:16] = 0.5  # a faint spot inside the ROI
    roi = np.ones(heat.shape, np.uint8)
    roi[:8, :8, :8] = 0
    vol = Volume(heat, ijk_to_ras_matrix((2.0, 2.0, 2.0), (0.0, 0.0, 0.0)), units="SUV")
    assert not segment(vol, method="fraction", value=0.5)[12:16, 12:16, 12:16].any()  # 2 < 0.5 x 10
    kept = segment(vol, method="fraction", value=0.5, roi=roi)
    assert kept.max() == 1 and (kept > 0).sum() == 64 and kept[12:16, 12:16, 12:16].all()  # 2 > 0.5 x 2 > 0.5
    otsu = segment(vol, method="otsu", roi=roi)
    assert otsu[12:16, 12:16, 12:16].all() and not otsu[12:16, 2:6, 12:16].any() and not otsu[:8, :8, :8].any()
    assert np.array_equal(inside_roi(heat, roi), np.where(roi > 0, heat, 0)) and inside_roi(heat, None) is heat


@pytest.mark.parametrize("connectivity, rank", [(6, 1), (18, 2), (26, 3)])
def test_segment_numbers_components_as_scikit_image_labels_them(connectivity, rank):
    """segment() labels with ndimage.label (not skimage.measure.label, whose import costs ~0.1 s): the same
    components, numbered by descending max heat, ties by size, then by scikit-image's raster numbering of the
    whole volume. Quantised heat makes many ties; an anisotropic, oblique grid and a size filter in ml."""
    from skimage import measure as sk_measure

    rng = np.random.default_rng(rank)
    shape = (24, 30, 36)
    # sparse voxels (below 26-neighbour percolation) touching by faces, edges and corners; four heat values: ties
    arr = np.where(rng.random(shape) < 0.07, rng.integers(1, 5, shape) / 4, 0).astype(np.float32)
    heat = Volume(arr, MATRIX.copy(), units="anomaly")
    out = segment(heat, method="absolute", value=0.02, min_size_ml=2 * VOXEL_ML, connectivity=connectivity)
    full = sk_measure.label(arr > 0.02, connectivity=rank, background=0)
    sizes = np.bincount(full.ravel())
    kept = [lab for lab in range(1, full.max() + 1) if sizes[lab] >= 2]
    maxima = {lab: float(arr[full == lab].max()) for lab in kept}
    assert len(set(maxima.values())) < len(kept)  # ties really occur
    order = sorted(kept, key=lambda lab: (-maxima[lab], -sizes[lab], lab))
    expected = np.zeros(arr.shape, np.int32)
    for new, lab in enumerate(order, start=1):
        expected[full == lab] = new
    assert out.dtype == np.int32 and np.array_equal(out, expected)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_region_measurements_are_scikit_images_regionprops_bit_for_bit(seed):
    """The lesion table's per-lesion numbers (count, box, centroid, image max / mean / min, heat max) are those of
    skimage.measure.regionprops_table, bit for bit, without importing it (it pulls scipy.spatial in)."""
    from skimage import measure as sk_measure

    from DiffusionAnomalyLib.measurements import _region_measurements

    rng = np.random.default_rng(seed)
    shape = (17, 23, 19)
    labels, n = ndi.label(ndi.gaussian_filter(rng.standard_normal(shape), 1.0) > 0.3)
    labels = np.where(labels % 3 == 1, 0, labels).astype([np.int32, np.uint16, np.int64][seed])  # gaps in the ids
    labels[0, 0, 0] = labels[-1, -1, -1] = n + 5  # one lesion at two corners
    image = (rng.gamma(2.0, 1.5, shape) * 10.0 ** seed).astype([np.float32, np.float64, np.int16][seed])
    heat = rng.random(shape).astype(np.float32)
    got = _region_measurements(labels, image, heat, with_min=True)
    props = sk_measure.regionprops_table(labels, image.astype(np.float64), properties=(
        "label", "area", "bbox", "centroid_local", "intensity_max", "intensity_mean", "intensity_min"))
    heat_max = sk_measure.regionprops_table(labels, heat, properties=("intensity_max",))["intensity_max"]
    start = np.stack([props[f"bbox-{a}"] for a in range(3)], axis=1)
    expected = {"label": props["label"], "voxels": props["area"], "start": start,
                "stop": np.stack([props[f"bbox-{a + 3}"] for a in range(3)], axis=1),
                "centroid": np.stack([props[f"centroid_local-{a}"] for a in range(3)], axis=1) + start,
                "image_max": props["intensity_max"], "image_mean": props["intensity_mean"],
                "image_min": props["intensity_min"], "heat_max": heat_max}
    assert got.keys() == expected.keys()
    for key, value in expected.items():
        assert got[key].dtype == value.dtype and got[key].tobytes() == value.tobytes(), key
    assert _region_measurements(np.zeros(shape, np.int32), image, heat) is None


def test_absolute_cut_off_is_its_value_with_or_without_a_roi(heat):
    roi = np.zeros(SHAPE, np.uint8)
    roi[:8] = 1
    rule = Thresholding(method="absolute", value=0.7, min_size_ml=None)
    assert rule.cut_off(heat, roi) == rule.cut_off(heat) == 0.7
    fraction = Thresholding(method="fraction", value=0.5, min_size_ml=None)
    assert fraction.cut_off(heat, roi) == 0.5 * float(heat.voxels[:8].max()) != fraction.cut_off(heat)
