"""Tests of DiffusionAnomalyLib.volume: reading (NRRD, NIfTI, DICOM), PET SUV, validation,
exact-geometry writing and physical-space resampling, on the real CT in ../shared/data."""

from __future__ import annotations

import gzip
import re
import struct
import sys
from pathlib import Path

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from DiffusionAnomalyLib import volume as volume_module  # noqa: E402
from DiffusionAnomalyLib.files import OutputError  # noqa: E402
from DiffusionAnomalyLib.volume import (  # noqa: E402
    Volume,
    VolumeError,
    array_key,
    ijk_to_ras_matrix,
    list_dicom_series,
    lps_ras_flip,
    read_volume,
    resample_to,
    suv_bw_factor,
    suv_factor_of_series,
    validate_volume,
    write_volume,
)

from conftest import REAL_CT, needs_real_ct

LIVER, SPLEEN, KIDNEY_RIGHT, KIDNEY_LEFT = 5, 1, 2, 3
SOFT_TISSUE_HU = (0.0, 250.0)


# =============================================================================================
# helpers
# =============================================================================================
def rotation(axis, angle: float) -> np.ndarray:
    """Rodrigues rotation matrix about an arbitrary axis."""
    a = np.asarray(axis, dtype=np.float64)
    a = a / np.linalg.norm(a)
    k = np.array([[0, -a[2], a[1]], [a[2], 0, -a[0]], [-a[1], a[0], 0]])
    return np.eye(3) + np.sin(angle) * k + (1 - np.cos(angle)) * k @ k


def oblique_volume(dtype=np.float32, **kwargs) -> Volume:
    rng = np.random.default_rng(1)
    voxels = (rng.normal(size=(5, 6, 7)) * 100).astype(dtype)
    m = ijk_to_ras_matrix([0.7, 1.3, 2.9], [12.3, -45.6, 78.9], rotation([0.3, -0.5, 0.8], 0.7))
    return Volume(voxels, m, **kwargs)


# Synthetic PET series: known dose/half-life/times/weight so the SUV can be computed by hand.
DOSE_BQ, HALF_LIFE_S, WEIGHT_KG = 370e6, 6586.2, 75.0


def make_pet_series(
    folder: Path,
    slopes=(1.0, 1.25, 0.5, 3.7),
    *,
    units="BQML",
    decay="START",
    weight=WEIGHT_KG,
    series_time="100000",
    acquisition_times=None,
    injection_time="090000",
    omit=(),
    series_uid=None,
    description="PET WB",
    modality="PT",
    extra=None,
    size=8,
) -> np.ndarray:
    """Write len(slopes) ``size`` x ``size`` PET slices; returns the stored values in slice-position order.

    Files are named in the REVERSE of their position order, so a reader that trusts file
    order instead of ImagePositionPatient gets the slices upside down.
    """
    folder.mkdir(parents=True, exist_ok=True)
    n = len(slopes)
    rng = np.random.default_rng(7)
    stored = rng.integers(100, 30000, size=(n, size, size)).astype(np.uint16)
    series_uid = series_uid or generate_uid()
    study_uid, frame_uid = generate_uid(), generate_uid()
    for k in range(n):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.128"  # PET Image Storage
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = Dataset()
        ds.file_meta = meta
        ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
        ds.Modality = modality
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study_uid, series_uid, frame_uid
        ds.PatientName, ds.PatientID = "Phantom^PET", "PHANTOM"
        ds.SeriesDescription, ds.SeriesNumber = description, 3
        ds.SeriesDate, ds.SeriesTime = "20240101", series_time
        ds.AcquisitionDate = "20240101"
        ds.AcquisitionTime = acquisition_times[k] if acquisition_times else series_time
        ds.PatientWeight = weight
        ds.Units, ds.DecayCorrection = units, decay
        item = Dataset()
        item.RadionuclideTotalDose = DOSE_BQ
        item.RadionuclideHalfLife = HALF_LIFE_S
        item.RadiopharmaceuticalStartTime = injection_time
        ds.RadiopharmaceuticalInformationSequence = [item]
        ds.InstanceNumber = k + 1
        ds.ImagePositionPatient = [-20.0, -30.0, 40.0 + 3.0 * k]
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.PixelSpacing = [4.0, 4.0]
        ds.SliceThickness = 3.0
        ds.Rows = ds.Columns = size
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
        ds.RescaleSlope, ds.RescaleIntercept = slopes[k], 0
        for keyword, value in (extra or {}).items():
            setattr(ds, keyword, value)
        for keyword in omit:
            if keyword in ds:
                delattr(ds, keyword)
            elif keyword in item:
                delattr(item, keyword)
        ds.PixelData = stored[k].tobytes()
        ds.save_as(folder / f"slice_{n - k:03d}.dcm", enforce_file_format=True)
    return stored


def expected_start_factor(elapsed_s: float = 3600.0) -> float:
    """Hand computation: SUVbw factor = weight[g] / (dose * 2^(-elapsed/half-life))."""
    return WEIGHT_KG * 1000.0 / (DOSE_BQ * 2.0 ** (-elapsed_s / HALF_LIFE_S))


# =============================================================================================
# real CT: DICOM reading, geometry, physical alignment
# =============================================================================================
@pytest.fixture(scope="module")
def ct_dicom() -> Volume:
    return read_volume(REAL_CT / "ct_dicom")


@needs_real_ct
def test_dicom_ct_series_reads_in_hu(ct_dicom):
    assert ct_dicom.voxels.shape == (20, 512, 512)
    assert ct_dicom.modality == "CT" and ct_dicom.units == "HU"
    assert ct_dicom.meta["series_description"] == "CT Body 3.0"
    np.testing.assert_allclose(ct_dicom.spacing, [0.9765625, 0.9765625, 2.0])
    # air outside the body is about -1000 HU (RescaleIntercept -1024 applied)
    assert -1100 < np.median(ct_dicom.voxels[:, :20, :20]) < -900


@needs_real_ct
def test_dicom_ijk_to_ras_matches_independent_pydicom_geometry(ct_dicom):
    headers = [pydicom.dcmread(f, stop_before_pixels=True) for f in sorted((REAL_CT / "ct_dicom").iterdir())]
    row, col = np.array(headers[0].ImageOrientationPatient[:3], float), np.array(headers[0].ImageOrientationPatient[3:], float)
    normal = np.cross(row, col)
    positions = np.array([[float(v) for v in h.ImagePositionPatient] for h in headers])
    positions = positions[np.argsort(positions @ normal)]
    slice_step = (positions[-1] - positions[0]) / (len(positions) - 1)
    dr, dc = (float(v) for v in headers[0].PixelSpacing)  # row spacing, column spacing
    lps = np.eye(4)
    lps[:3, 0] = row * dc  # i runs along a row: column spacing
    lps[:3, 1] = col * dr
    lps[:3, 2] = slice_step
    lps[:3, 3] = positions[0]
    expected_ras = np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps
    np.testing.assert_allclose(ct_dicom.ijk_to_ras, expected_ras, atol=1e-4)
    # and a voxel's RAS position is the LPS position of that pixel with x, y negated
    centre = ct_dicom.ijk_to_ras_points([[100, 200, 7]])[0]
    lps_point = positions[7] + 100 * row * dc + 200 * col * dr
    np.testing.assert_allclose(centre, lps_point * [-1, -1, 1], atol=1e-4)


@needs_real_ct
def test_single_dicom_file_reads_its_whole_series(ct_dicom):
    one_file = sorted((REAL_CT / "ct_dicom").iterdir())[5]
    volume = read_volume(one_file)
    assert volume.same_geometry(ct_dicom)
    assert np.array_equal(volume.voxels, ct_dicom.voxels)


@needs_real_ct
def test_labels_must_be_aligned_physically_not_by_index(ct_dicom):
    """ct_dicom_totalseg.nii.gz stores y flipped: only physical alignment puts organs on organs.

    This series (z -804.5..-766.5 mm) covers liver and spleen but no kidney, so the plausibility
    check uses liver and spleen (both soft tissue, ~60-110 HU in this contrast CT).
    """
    labels = read_volume(REAL_CT / "ct_dicom_totalseg.nii.gz", validate=False)
    assert labels.voxels.shape == ct_dicom.voxels.shape  # same shape: index alignment "looks" fine
    assert not labels.same_geometry(ct_dicom, atol=1e-3)

    physical = resample_to(labels, ct_dicom, "nearest")
    assert physical.voxels.dtype == labels.voxels.dtype and physical.same_geometry(ct_dicom)
    # the physical resampling of a pure y flip is exactly the flipped array
    assert np.array_equal(physical.voxels, labels.voxels[:, ::-1, :])
    index_aligned = labels.voxels.reshape(ct_dicom.voxels.shape)  # geometry ignored on purpose
    assert np.count_nonzero(np.isin(physical.voxels, [KIDNEY_RIGHT, KIDNEY_LEFT])) == 0

    hu = ct_dicom.voxels.astype(np.float64)
    for organ, name in ((LIVER, "liver"), (SPLEEN, "spleen")):
        good = hu[physical.voxels == organ]
        bad = hu[index_aligned == organ]
        print(f"{name}: {good.size} voxels, mean HU physical {good.mean():.1f}, index-aligned {bad.mean():.1f}")
        assert good.size > 10000
        assert SOFT_TISSUE_HU[0] <= good.mean() <= SOFT_TISSUE_HU[1]
        assert not SOFT_TISSUE_HU[0] <= bad.mean() <= SOFT_TISSUE_HU[1]
        assert abs(good.mean() - bad.mean()) > 100


@needs_real_ct
def test_abdomen_ct_kidney_voxel_counts_and_hu():
    ct = read_volume(REAL_CT / "ct_abdomen_3mm.nii.gz", modality="CT")
    labels = read_volume(REAL_CT / "ct_abdomen_3mm_totalseg.nii.gz", validate=False)
    assert ct.voxels.shape == (30, 101, 122) and ct.units == "HU"
    assert labels.same_geometry(ct)
    assert np.count_nonzero(labels.voxels == KIDNEY_RIGHT) == 3947
    assert np.count_nonzero(labels.voxels == KIDNEY_LEFT) == 3676
    kidney_hu = ct.voxels[np.isin(labels.voxels, [KIDNEY_RIGHT, KIDNEY_LEFT])].astype(float).mean()
    print(f"abdomen CT kidney mean HU {kidney_hu:.1f}")  # ~13 HU: non-contrast, 3 mm partial volume
    assert SOFT_TISSUE_HU[0] <= kidney_hu <= SOFT_TISSUE_HU[1]
    # resampling onto its own grid is the identity
    assert np.array_equal(resample_to(labels, ct, "nearest").voxels, labels.voxels)


# =============================================================================================
# writing: exact geometry, metadata, refusal without partial files
# =============================================================================================
@pytest.mark.parametrize("name, atol", [("v.nrrd", 1e-9), ("v.nhdr", 1e-9), ("v.nii", 1e-4), ("v.nii.gz", 1e-4)])
def test_round_trip_keeps_oblique_geometry_and_metadata(tmp_path, name, atol):
    volume = oblique_volume(modality="PT", units="SUVbw")
    assert not np.allclose(volume.direction_ras, np.eye(3), atol=0.1)  # really oblique
    out = write_volume(volume, tmp_path / name)
    back = read_volume(out)
    assert np.array_equal(back.voxels, volume.voxels) and back.voxels.dtype == volume.voxels.dtype
    np.testing.assert_allclose(back.ijk_to_ras, volume.ijk_to_ras, atol=atol)
    assert (back.modality, back.units) == ("PT", "SUVbw")
    assert not [p.name for p in tmp_path.iterdir() if "partial" in p.name]


def test_nrrd_header_carries_modality_and_units_fields(tmp_path):
    write_volume(oblique_volume(modality="CT", units="HU"), tmp_path / "ct.nrrd", compress=False)
    header = (tmp_path / "ct.nrrd").read_bytes().split(b"\n\n", 1)[0].decode()
    assert "modality:=CT" in header and "units:=HU" in header
    assert read_volume(tmp_path / "ct.nrrd", modality="ct", units="HU").modality == "CT"  # agreeing declaration
    with pytest.raises(VolumeError, match=r"ct.nrrd gives its modality as CT, but PET \(PT\) was declared; remove"):
        read_volume(tmp_path / "ct.nrrd", modality="PT")  # the file's own metadata is not overridden


def test_write_refuses_missing_folder(tmp_path):
    with pytest.raises(OutputError, match="nowhere does not exist"):
        write_volume(oblique_volume(), tmp_path / "nowhere" / "v.nrrd")
    assert not (tmp_path / "nowhere").exists()


def test_write_refuses_read_only_folder_and_leaves_nothing(tmp_path):
    folder = tmp_path / "read_only"
    folder.mkdir()
    folder.chmod(0o555)
    try:
        # root may write anyway, so files.check_writable_dir says "read-only" from the permission bits
        with pytest.raises(OutputError, match="read_only is (not writable|read-only)"):
            write_volume(oblique_volume(), folder / "v.nii.gz")
        assert list(folder.iterdir()) == []
    finally:
        folder.chmod(0o755)


def test_failed_write_leaves_no_partial_file(tmp_path):
    with pytest.raises(OutputError, match="Cannot write .*v.unknown_format: "):
        write_volume(oblique_volume(), tmp_path / "v.unknown_format")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("name", ["v.nrrd", "v.nhdr", "v.nii.gz"])
def test_failed_write_keeps_the_old_file(tmp_path, monkeypatch, name):
    old = oblique_volume()
    write_volume(old, tmp_path / name)
    before = sorted((p.name, p.read_bytes()) for p in tmp_path.iterdir())

    def disk_full(image, filename, useCompression=False):
        Path(filename).write_bytes(b"half a file")  # then the disk is full
        raise RuntimeError("ITK ERROR: ImageFileWriter: No space left on device")

    monkeypatch.setattr(volume_module.sitk, "WriteImage", disk_full)
    with pytest.raises(OutputError, match=f"Cannot write .*{name}: .*No space left"):
        write_volume(oblique_volume(dtype=np.float64), tmp_path / name)
    assert sorted((p.name, p.read_bytes()) for p in tmp_path.iterdir()) == before
    monkeypatch.undo()
    assert np.array_equal(read_volume(tmp_path / name).voxels, old.voxels)


# =============================================================================================
# resampling
# =============================================================================================
def test_resample_linear_reproduces_a_linear_field_in_physical_space():
    source = Volume(np.zeros((40, 40, 40), np.float32), ijk_to_ras_matrix([2.0, 2.0, 2.0], [-40.0, -40.0, -40.0]))
    ras = source.ijk_to_ras_points(np.stack(np.meshgrid(*map(np.arange, (40, 40, 40)), indexing="ij"), -1).reshape(-1, 3))
    field = lambda p: 3.0 * p[:, 0] - 2.0 * p[:, 1] + 0.5 * p[:, 2] + 7.0  # noqa: E731
    # voxels are [k, j, i]; meshgrid above enumerated (i, j, k) -> transpose back
    source.voxels = field(ras).reshape(40, 40, 40).transpose(2, 1, 0).astype(np.float32)
    reference = oblique_volume()
    reference.ijk_to_ras[:3, 3] = [-5.0, 3.0, -8.0]  # oblique grid well inside the source
    out = resample_to(source, reference, "linear", default=-999)
    assert out.same_geometry(reference) and out.voxels.dtype == np.float32
    k, j, i = np.indices(out.voxels.shape)
    expected = field(reference.ijk_to_ras_points(np.stack([i, j, k], -1).reshape(-1, 3))).reshape(out.voxels.shape)
    np.testing.assert_allclose(out.voxels, expected, atol=1e-2)
    far = Volume(np.zeros((3, 3, 3), np.float32), ijk_to_ras_matrix([1, 1, 1], [500.0, 500.0, 500.0]))
    assert np.all(resample_to(source, far, "linear", default=-999).voxels == -999)
    with pytest.raises(VolumeError, match="interpolator"):
        resample_to(source, far, "cubic")


# =============================================================================================
# PET SUV
# =============================================================================================
def test_pet_series_becomes_suv_with_each_slices_own_rescale_slope(tmp_path):
    # first slice slope 1.0 (integral): SimpleITK alone would pick an integer type from it and
    # truncate/overflow the later fractional-slope slices
    slopes = (1.0, 1.25, 0.5, 3.7)
    stored = make_pet_series(tmp_path / "pet", slopes)
    volume = read_volume(tmp_path / "pet")
    assert volume.modality == "PT" and volume.units == "SUVbw" and volume.voxels.dtype == np.float32
    factor = expected_start_factor(3600.0)
    expected = stored.astype(np.float64) * np.array(slopes)[:, None, None] * factor
    np.testing.assert_allclose(volume.voxels, expected, rtol=1e-6)
    assert volume.meta["suv_factor"] == pytest.approx(factor, rel=1e-12)
    # files are named against position order: slice 0 must be the lowest z (40 mm -> RAS z 40)
    np.testing.assert_allclose(volume.origin_ras, [20.0, 30.0, 40.0])
    np.testing.assert_allclose(volume.spacing, [4.0, 4.0, 3.0])


def test_suv_bw_factor_alone(tmp_path):
    make_pet_series(tmp_path / "pet", (1.0, 1.0))
    ds = pydicom.dcmread(next((tmp_path / "pet").iterdir()))
    assert suv_bw_factor(ds) == pytest.approx(expected_start_factor(3600.0), rel=1e-12)
    ds.DecayCorrection = "ADMIN"  # already decay corrected to injection: dose not decayed
    assert suv_bw_factor(ds) == pytest.approx(WEIGHT_KG * 1000.0 / DOSE_BQ, rel=1e-12)
    ds.DecayCorrection = "START"
    ds.SeriesTime = "113000"  # series time reset after the acquisition (which started at 10:00)
    assert suv_bw_factor(ds) == pytest.approx(expected_start_factor(3600.0), rel=1e-12)
    ds.AcquisitionTime = "113000"
    assert suv_bw_factor(ds) == pytest.approx(expected_start_factor(9000.0), rel=1e-12)
    # full injection date-time takes precedence over the time-only tag
    ds.RadiopharmaceuticalInformationSequence[0].RadiopharmaceuticalStartDateTime = "20240101093000.000000"
    assert suv_bw_factor(ds) == pytest.approx(expected_start_factor(7200.0), rel=1e-12)
    ds.Units = "GML"
    assert suv_bw_factor(ds) == 1.0
    ds.Units = "CNTS"
    with pytest.raises(VolumeError, match="Units .0054,1001. is CNTS"):
        suv_bw_factor(ds)


def test_suv_injection_after_scan_is_refused(tmp_path):
    make_pet_series(tmp_path / "pet", (1.0, 1.0), injection_time="103000")
    with pytest.raises(VolumeError, match="after the scan"):
        read_volume(tmp_path / "pet")


def test_decay_correction_none_is_corrected_per_slice(tmp_path):
    times = ["100000", "100200", "100400", "100600"]  # each bed/slice acquired 2 min later
    stored = make_pet_series(tmp_path / "pet", (0.5, 0.5, 0.5, 0.5), decay="NONE", acquisition_times=times)
    volume = read_volume(tmp_path / "pet")
    factors = np.array([expected_start_factor(3600.0 + 120.0 * k) for k in range(4)])
    np.testing.assert_allclose(volume.voxels, stored * 0.5 * factors[:, None, None], rtol=1e-6)


@pytest.mark.parametrize(
    "omit, tag",
    [
        ("PatientWeight", r"PatientWeight \(0010,1030\)"),
        ("RadionuclideTotalDose", r"RadionuclideTotalDose \(0018,1074\)"),
        ("RadionuclideHalfLife", r"RadionuclideHalfLife \(0018,1075\)"),
        ("RadiopharmaceuticalStartTime", r"RadiopharmaceuticalStartTime \(0018,1072\)"),
        ("SeriesTime", r"SeriesTime \(0008,0031\)"),
        ("DecayCorrection", r"DecayCorrection \(0054,1102\)"),
    ],
)
def test_missing_suv_tag_names_the_tag_and_the_way_out(tmp_path, omit, tag):
    make_pet_series(tmp_path / "pet", (1.0, 2.5), omit=(omit,))
    with pytest.raises(VolumeError, match=tag) as info:
        read_volume(tmp_path / "pet")
    assert "suv_factor" in str(info.value)


def test_explicit_suv_factor_skips_the_tags(tmp_path):
    slopes = (1.0, 2.5, 0.25)
    stored = make_pet_series(tmp_path / "pet", slopes, omit=("PatientWeight", "RadionuclideTotalDose"))
    volume = read_volume(tmp_path / "pet", suv_factor=0.002)
    np.testing.assert_allclose(volume.voxels, stored * np.array(slopes)[:, None, None] * 0.002, rtol=1e-6)
    assert volume.units == "SUVbw"
    # NRRD/NIfTI: the factor multiplies and marks SUV; our own SUV file refuses a second conversion
    bqml = write_volume(Volume(stored.astype(np.float32), np.eye(4), modality="PT", units="BQML"), tmp_path / "b.nrrd")
    suv = read_volume(bqml, suv_factor=0.5)
    assert suv.units == "SUVbw" and np.allclose(suv.voxels, stored * 0.5)
    write_volume(suv, tmp_path / "s.nrrd")
    with pytest.raises(VolumeError, match="already in SUVbw"):
        read_volume(tmp_path / "s.nrrd", suv_factor=0.5)


# =============================================================================================
# series selection
# =============================================================================================
def test_folder_with_two_series_needs_a_choice(tmp_path):
    folder = tmp_path / "mixed"
    uid_a, uid_b = generate_uid(), generate_uid()
    stored_a = make_pet_series(folder / "a", (1.0, 1.0, 1.0), series_uid=uid_a, description="PET AC")
    make_pet_series(folder / "b", (2.0, 2.0, 2.0), series_uid=uid_b, description="PET NAC")
    for sub in ("a", "b"):
        for f in (folder / sub).iterdir():
            f.rename(folder / f"{sub}_{f.name}")
    assert {s.uid for s in list_dicom_series(folder)} == {uid_a, uid_b}
    with pytest.raises(VolumeError) as info:
        read_volume(folder)
    message = str(info.value)
    assert uid_a in message and uid_b in message and "PET NAC" in message and "series_uid" in message
    chosen = read_volume(folder, series_uid=uid_a)
    np.testing.assert_allclose(chosen.voxels, stored_a * expected_start_factor(), rtol=1e-6)
    from_file = read_volume(next(folder.glob("b_*.dcm")))
    assert from_file.meta["series_instance_uid"] == uid_b and from_file.voxels.shape == (3, 8, 8)
    with pytest.raises(VolumeError, match="is not in"):
        read_volume(folder, series_uid="1.2.3.4")


# =============================================================================================
# bad inputs
# =============================================================================================
def test_missing_file_and_empty_folder(tmp_path):
    with pytest.raises(VolumeError, match="file not found: .*absent.nrrd"):
        read_volume(tmp_path / "absent.nrrd")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("not an image")
    with pytest.raises(VolumeError, match="no DICOM images found"):
        read_volume(tmp_path / "empty")


@pytest.mark.parametrize("name", ["garbage.nrrd", "garbage.nii.gz", "garbage.dcm"])
def test_corrupt_file_names_file_and_reason(tmp_path, name):
    path = tmp_path / name
    path.write_bytes(b"this is not an image\x00\x01" * 10)
    with pytest.raises(VolumeError, match=f"could not read .*{name}: ") as info:
        read_volume(path)
    assert "Traceback" not in str(info.value) and len(str(info.value)) < 600


def test_truncated_nifti_is_reported(tmp_path):
    good = write_volume(oblique_volume(), tmp_path / "v.nii", compress=False)
    data = good.read_bytes()
    good.write_bytes(data[: len(data) // 2])
    with pytest.raises(VolumeError, match=r"could not read .*v.nii: the file is truncated \(.* of 1,192 bytes\)"):
        read_volume(good)


def test_two_dimensional_inputs(tmp_path):
    sitk.WriteImage(sitk.GetImageFromArray(np.arange(64, dtype=np.float32).reshape(8, 8)), str(tmp_path / "2d.nii.gz"))
    with pytest.raises(VolumeError, match="2 dimensions"):
        read_volume(tmp_path / "2d.nii.gz")
    single = Volume(np.arange(64, dtype=np.float32).reshape(1, 8, 8), np.eye(4))
    write_volume(single, tmp_path / "one_slice.nrrd")
    with pytest.raises(VolumeError, match="2D image"):
        read_volume(tmp_path / "one_slice.nrrd")
    make_pet_series(tmp_path / "one_dicom", (1.0,))
    with pytest.raises(VolumeError, match="2D image"):
        read_volume(tmp_path / "one_dicom")


def test_validate_volume_rejects_bad_content():
    eye = np.eye(4)
    with pytest.raises(VolumeError, match="empty"):
        validate_volume(Volume(np.zeros((0, 4, 4), np.float32), eye))
    with pytest.raises(VolumeError, match="2D image"):
        validate_volume(Volume(np.ones((4, 1, 4), np.float32), eye))
    with pytest.raises(VolumeError, match="4 dimensions"):
        validate_volume(Volume(np.ones((2, 4, 4, 4), np.float32), eye))
    with pytest.raises(VolumeError, match="constant .every voxel equals 7"):
        validate_volume(Volume(np.full((4, 4, 4), 7, np.int16), eye))
    assert validate_volume(Volume(np.zeros((4, 4, 4), np.uint8), eye), allow_constant=True)
    bad = np.random.default_rng(0).normal(size=(4, 4, 4)).astype(np.float32)
    bad[0, 0, :3] = np.nan
    bad[1, 1, 1] = np.inf
    with pytest.raises(VolumeError, match="contains 4 NaN/Inf voxels"):
        validate_volume(Volume(bad, eye))
    ok = Volume(np.random.default_rng(0).normal(size=(4, 4, 4)).astype(np.float32), eye)
    assert validate_volume(ok) is ok


def test_validate_volume_rejects_too_large_and_says_what_to_do(tmp_path):
    big = Volume(np.random.default_rng(0).normal(size=(10, 20, 30)).astype(np.float32), eye := np.eye(4))
    with pytest.raises(VolumeError, match=r"too large: 6,000 voxels .*Crop it .*resample"):
        validate_volume(big, max_voxels=5000)
    assert validate_volume(big, max_voxels=6000)
    write_volume(big, tmp_path / "big.nrrd")  # the reader refuses from the header, before loading
    with pytest.raises(VolumeError, match="too large"):
        read_volume(tmp_path / "big.nrrd", max_voxels=1000)
    assert read_volume(tmp_path / "big.nrrd").same_geometry(Volume(big.voxels, eye))


def test_validate_volume_rejects_degenerate_geometry():
    voxels = np.random.default_rng(0).normal(size=(4, 4, 4)).astype(np.float32)
    zero_spacing = np.eye(4)
    zero_spacing[2, 2] = 0.0
    parallel = np.eye(4)
    parallel[:3, 1] = [1.0, 1e-6, 0.0]
    not_finite = np.eye(4)
    not_finite[0, 3] = np.nan
    for matrix, pattern in ((zero_spacing, "spacing"), (parallel, "cannot be inverted"), (not_finite, "finite")):
        with pytest.raises(VolumeError, match=pattern):
            validate_volume(Volume(voxels, matrix))


def test_dicom_with_duplicate_or_missing_slices_is_refused(tmp_path):
    make_pet_series(tmp_path / "gap", (1.0, 1.0, 1.0, 1.0))
    files = sorted((tmp_path / "gap").iterdir())
    files[1].unlink()  # a missing slice in the middle
    with pytest.raises(VolumeError, match="unevenly spaced"):
        read_volume(tmp_path / "gap")
    make_pet_series(tmp_path / "dup", (1.0, 1.0, 1.0))
    first = sorted((tmp_path / "dup").iterdir())[0]
    ds = pydicom.dcmread(first)
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.save_as(tmp_path / "dup" / "copy.dcm")
    with pytest.raises(VolumeError, match="share one slice position"):
        read_volume(tmp_path / "dup")


@needs_real_ct
@pytest.mark.parametrize("name", ["ct_dicom_totalseg.nii.gz", "ct_abdomen_3mm.nii.gz"])
def test_lps_ras_flip_turns_itk_lps_geometry_into_the_nifti_ras_affine(tmp_path, name):
    """The NIfTI sform (RAS, read from the header bytes) is the flip of SimpleITK's LPS geometry."""
    path = REAL_CT / name
    with gzip.open(path) as f:
        header = f.read(348)
    assert struct.unpack("<i", header[:4])[0] == 348 and struct.unpack("<h", header[254:256])[0] > 0
    sform = np.vstack([np.frombuffer(header, "<f4", 12, 280).reshape(3, 4), [0.0, 0.0, 0.0, 1.0]])
    image = sitk.ReadImage(str(path))
    lps = np.eye(4)
    lps[:3, :3] = np.array(image.GetDirection()).reshape(3, 3) * image.GetSpacing()
    lps[:3, 3] = image.GetOrigin()
    assert not np.allclose(lps, sform, atol=1.0)  # the two spaces really differ for this file
    np.testing.assert_allclose(lps_ras_flip(lps), sform, atol=1e-4)
    np.testing.assert_allclose(lps_ras_flip(sform), lps, atol=1e-4)
    volume = read_volume(path, validate=False)
    np.testing.assert_allclose(volume.ijk_to_ras, sform, atol=1e-4)
    with gzip.open(write_volume(volume, tmp_path / name)) as f:  # written back: the same RAS sform
        written = f.read(348)
    np.testing.assert_allclose(np.frombuffer(written, "<f4", 12, 280).reshape(3, 4), sform[:3], atol=1e-4)


def test_truncated_nifti_gz_is_reported(tmp_path):
    """ITK zero-fills truncated NIfTI silently; the reader must notice instead."""
    good = write_volume(oblique_volume(), tmp_path / "v.nii.gz")
    data = good.read_bytes()
    good.write_bytes(data[: len(data) - 40])
    with pytest.raises(VolumeError, match="could not read .*v.nii.gz: .*truncated"):
        read_volume(good)


# =============================================================================================
# content keys
# =============================================================================================
def test_array_key_changes_with_one_voxel_or_the_geometry():
    volume = oblique_volume(modality="PT", units="SUVbw")
    twin = Volume(volume.voxels.copy(), volume.ijk_to_ras.copy(), modality="PT", units="SUVbw", meta={"other": 1})
    assert array_key(volume) == array_key(twin)  # equal content, distinct objects (meta is not content)
    assert array_key(volume, 0.5, "x") == array_key(twin, 0.5, "x") != array_key(twin, 0.6, "x")
    one_voxel = twin.with_voxels(twin.voxels.copy())
    one_voxel.voxels[2, 3, 4] += 1e-3
    shifted = Volume(volume.voxels, volume.ijk_to_ras.copy(), modality="PT", units="SUVbw")
    shifted.ijk_to_ras[0, 3] += 0.01
    units = twin.with_voxels(twin.voxels, units="BQML")
    keys = {array_key(v) for v in (volume, one_voxel, shifted, units)}
    assert len(keys) == 4
    assert array_key(volume.voxels) != array_key(volume.voxels.astype(np.float64))  # dtype is content


# =============================================================================================
# DICOM listing, SUV factor of a series, date/time values
# =============================================================================================
def test_listing_orders_by_position_and_ignores_non_images(tmp_path):
    folder = tmp_path / "pet"
    make_pet_series(folder, (1.0, 1.0, 1.0, 1.0))
    (folder / "notes.txt").write_text("not DICOM")
    sr = pydicom.dcmread(next(folder.iterdir()))  # a structured report: DICOM without pixels
    for keyword in ("Rows", "Columns", "PixelData", "BitsAllocated", "BitsStored", "HighBit",
                    "PixelRepresentation", "SamplesPerPixel", "PhotometricInterpretation"):
        delattr(sr, keyword)
    sr.Modality, sr.SeriesInstanceUID, sr.SOPInstanceUID = "SR", generate_uid(), generate_uid()
    sr.file_meta.MediaStorageSOPInstanceUID = sr.SOPInstanceUID
    sr.save_as(folder / "a_report.dcm")
    (series,) = list_dicom_series(folder)
    z = [float(pydicom.dcmread(f).ImagePositionPatient[2]) for f in series.files]
    assert z == [40.0, 43.0, 46.0, 49.0]  # file names run the other way
    assert (series.modality, series.description) == ("PT", "PET WB")
    assert read_volume(folder).voxels.shape == (4, 8, 8)


def test_suv_factor_of_series(tmp_path):
    make_pet_series(tmp_path / "start", (1.0, 2.0, 3.0), acquisition_times=["100000", "100200", "100400"])
    headers = [pydicom.dcmread(f) for f in (tmp_path / "start").iterdir()]
    factor = suv_factor_of_series(headers)
    assert factor == pytest.approx(expected_start_factor(3600.0), rel=1e-12)
    assert read_volume(tmp_path / "start").meta["suv_factor"] == factor  # the reader's own decision agrees

    make_pet_series(tmp_path / "none", (1.0, 1.0), decay="NONE", acquisition_times=["100000", "100200"])
    headers = [pydicom.dcmread(f) for f in (tmp_path / "none").iterdir()]
    with pytest.raises(VolumeError, match=r"^this PET series needs a different SUV factor per slice "
                                          r"\(DecayCorrection NONE\); convert it with 'diffusion-anomaly run'"):
        suv_factor_of_series(headers)
    per_slice = read_volume(tmp_path / "none").meta["suv_factor"]  # the reader converts slice by slice
    np.testing.assert_allclose(per_slice, [expected_start_factor(3600.0), expected_start_factor(3720.0)], rtol=1e-12)

    make_pet_series(tmp_path / "same", (1.0, 1.0), decay="NONE")  # NONE, but one acquisition time
    headers = [pydicom.dcmread(f) for f in (tmp_path / "same").iterdir()]
    assert suv_factor_of_series(headers) == pytest.approx(expected_start_factor(3600.0), rel=1e-12)


@pytest.mark.filterwarnings("ignore:Invalid value for VR")  # pydicom warns when the test writes them
@pytest.mark.parametrize(
    "changes, elapsed",
    [
        ({"AcquisitionTime": "10:00:00", "SeriesTime": "10:00:00"}, 3600.0),  # legacy ACR-NEMA times
        ({"AcquisitionTime": "100000.5", "SeriesTime": "100000.5"}, 3600.5),  # fractional seconds
        ({"AcquisitionTime": "1000", "SeriesTime": "1000"}, 3600.0),  # HHMM
        ({"AcquisitionDate": "2024.01.01"}, 3600.0),  # legacy date
        ({"AcquisitionDateTime": "20240101103000+0100"}, 3600.0),  # offset ignored: one clock; scan = series
        ({"AcquisitionDateTime": "20240101093000-0500", "SeriesTime": "113000"}, 1800.0),  # earlier acquisition
    ],
)
def test_dicom_dates_and_times(tmp_path, changes, elapsed):
    make_pet_series(tmp_path / "pet", (1.0, 1.0), extra=changes)
    headers = [pydicom.dcmread(f) for f in (tmp_path / "pet").iterdir()]
    assert suv_factor_of_series(headers) == pytest.approx(expected_start_factor(elapsed), rel=1e-9)


def test_injection_date_time_with_offset_is_read_on_the_scanner_clock(tmp_path):
    make_pet_series(tmp_path / "pet", (1.0, 1.0))
    ds = pydicom.dcmread(next((tmp_path / "pet").iterdir()))
    ds.RadiopharmaceuticalInformationSequence[0].RadiopharmaceuticalStartDateTime = "20240101093000.000000+0900"
    assert suv_bw_factor(ds) == pytest.approx(expected_start_factor(1800.0), rel=1e-12)


@pytest.mark.filterwarnings("ignore:Invalid value for VR")  # pydicom warns when the test writes them
@pytest.mark.parametrize(
    "changes, sentence",
    [
        ({"SeriesTime": "25xx00"}, "SeriesDate (0008,0021)/SeriesTime (0008,0031) has an invalid value"),
        ({"AcquisitionDate": "20241301"}, "AcquisitionDate (0008,0022)/AcquisitionTime (0008,0032) has an invalid"),
        ({"AcquisitionDateTime": "tomorrow"}, "AcquisitionDate (0008,0022)/AcquisitionTime (0008,0032) has an inv"),
    ],
)
def test_invalid_date_or_time_names_the_tags(tmp_path, changes, sentence):
    make_pet_series(tmp_path / "pet", (1.0, 1.0), extra=changes)
    with pytest.raises(VolumeError, match=re.escape(f"cannot convert PET to SUV: {sentence}")) as info:
        read_volume(tmp_path / "pet")
    assert "suv_factor" in str(info.value)


@pytest.mark.filterwarnings("ignore:Invalid value for VR")  # pydicom warns when the test writes them
def test_invalid_injection_time_names_the_tags(tmp_path):
    make_pet_series(tmp_path / "pet", (1.0, 1.0), injection_time="9h30")
    tags = r"RadiopharmaceuticalStartTime \(0018,1072\) / StartDateTime \(0018,1078\) has an invalid value"
    with pytest.raises(VolumeError, match=tags):
        read_volume(tmp_path / "pet")


# =============================================================================================
# issue 7: header values present, finite and plausible; declarations; readers' causes in words
# =============================================================================================
def _pet_slice(tmp_path: Path, **kwargs):
    make_pet_series(tmp_path / "pet", (1.0, 1.0), **kwargs)
    return pydicom.dcmread(sorted((tmp_path / "pet").iterdir())[0])


@pytest.mark.filterwarnings("ignore:Invalid value for VR")
@pytest.mark.parametrize("keyword, value, words", [
    ("PatientWeight", 0.5, "is 0.5 kg, outside the plausible range 1 to 500 kg"),
    ("PatientWeight", 501, "is 501 kg, outside the plausible range 1 to 500 kg"),
    ("PatientWeight", "NaN", "is NaN (not a finite number)"),
    ("PatientWeight", -75, "is -75 kg"),
    ("RadionuclideTotalDose", 0, "RadionuclideTotalDose (0018,1074) in the RadiopharmaceuticalInformationSequence"),
    ("RadionuclideTotalDose", 370, "is 370 Bq, outside the plausible range 1 MBq to 20 GBq"),
    ("RadionuclideTotalDose", 3e10, "is 3e+10 Bq"),
    ("RadionuclideTotalDose", "inf", "is inf (not a finite number)"),
    ("RadionuclideHalfLife", 30, "is 30 s, outside the plausible range 60 s to 10 days"),
    ("RadionuclideHalfLife", 109.77 * 60 * 24 * 10, "RadionuclideHalfLife (0018,1075)"),
    ("RadionuclideHalfLife", "NaN", "is NaN (not a finite number)"),
])
def test_suv_tags_must_be_finite_and_plausible(tmp_path, keyword, value, words):
    ds = _pet_slice(tmp_path)
    target = ds if keyword == "PatientWeight" else ds.RadiopharmaceuticalInformationSequence[0]
    setattr(target, keyword, value)
    with pytest.raises(VolumeError, match=re.escape(words)) as info:
        suv_bw_factor(ds)
    message = str(info.value)
    assert message.startswith(f"cannot convert PET to SUV: {keyword} (") and f"PET header of {ds.filename} " in message
    assert message.endswith("; correct the header or pass an explicit suv_factor.")


def test_suv_tag_bounds_are_inclusive_and_named(tmp_path):
    ds = _pet_slice(tmp_path)
    lo_kg, hi_kg = volume_module.PATIENT_WEIGHT_KG
    for weight in (lo_kg, hi_kg):
        ds.PatientWeight = weight
        assert suv_bw_factor(ds) > 0
    assert volume_module.HALF_LIFE_S[0] < 76 < 6586.2 < 282276 < volume_module.HALF_LIFE_S[1]  # Rb-82, F-18, Zr-89


def test_scan_long_after_the_injection_is_refused_in_half_lives(tmp_path):
    ds = _pet_slice(tmp_path)
    item = ds.RadiopharmaceuticalInformationSequence[0]
    item.RadiopharmaceuticalStartDateTime = "20231231090000"  # 25 h before the 10:00 series: 13.7 F-18 half-lives
    with pytest.raises(VolumeError, match=r"is 25.0 h after the injection .* more than 10 half-lives of the nuclide"):
        suv_bw_factor(ds)
    item.RadiopharmaceuticalStartDateTime = "20240101000000"  # 10 h: 5.5 half-lives, still plausible
    assert suv_bw_factor(ds) == pytest.approx(expected_start_factor(36000.0), rel=1e-12)
    ds.DecayCorrection = "ADMIN"  # decay-corrected to injection: the timing is not used
    item.RadiopharmaceuticalStartDateTime = "20231231090000"
    assert suv_bw_factor(ds) == pytest.approx(WEIGHT_KG * 1000.0 / DOSE_BQ, rel=1e-12)


@pytest.mark.parametrize("scale, accepted",
                         [("0.000123", True), ("-1", False), ("0", False), ("NaN", False), ("x", False)])
def test_philips_suv_scale_factor_must_be_positive(tmp_path, scale, accepted):
    ds = _pet_slice(tmp_path, units="CNTS")
    ds.add_new((0x7053, 0x1000), "LO", scale)
    if accepted:
        assert suv_bw_factor(ds) == pytest.approx(float(scale))
        return
    with pytest.raises(VolumeError, match=re.escape("Philips SUV scale factor (7053,1000) in the PET header of")) as info:
        suv_bw_factor(ds)
    assert f"is {scale}, but it must be a positive number" in str(info.value) and "CT" not in str(info.value)


@pytest.mark.filterwarnings("ignore:Invalid value for VR")
@pytest.mark.parametrize("changes, omit, words", [
    ({"RescaleSlope": "NaN"}, (), "RescaleSlope (0028,1053) in {file} is NaN (not a finite number)"),
    ({"RescaleSlope": -2}, (), "RescaleSlope (0028,1053) in {file} is -2, but it must be positive"),
    ({"RescaleIntercept": "inf"}, (), "RescaleIntercept (0028,1052) in {file} is inf (not a finite number)"),
    ({}, ("RescaleIntercept",),
     "RescaleIntercept (0028,1052) is missing or empty in {file}, which a PET (PT) image needs"),
])
def test_rescale_tags_must_be_present_and_finite(tmp_path, changes, omit, words):
    make_pet_series(tmp_path / "pet", (1.0, 1.0, 1.0), extra=changes, omit=omit)
    with pytest.raises(VolumeError) as info:
        read_volume(tmp_path / "pet")
    first = sorted((tmp_path / "pet").iterdir())[-1]  # the lowest slice comes first in position order
    assert words.format(file=first) in str(info.value)


def test_rescale_tags_are_optional_where_the_modality_does_not_need_them(tmp_path):
    stored = make_pet_series(tmp_path / "mr", (1.0, 1.0, 1.0), modality="MR", omit=("RescaleSlope", "RescaleIntercept"))
    volume = read_volume(tmp_path / "mr")
    assert volume.modality == "MR" and volume.units is None
    np.testing.assert_array_equal(volume.voxels, stored)


@pytest.mark.parametrize("which", [0, 1, 3])  # the top end slice, a middle slice, the bottom end slice
def test_truncated_or_missing_pixel_data_names_the_file(tmp_path, which):
    make_pet_series(tmp_path / "pet", (1.0, 1.0, 1.0, 1.0))
    files = sorted((tmp_path / "pet").iterdir())
    files[which].write_bytes(files[which].read_bytes()[:-2])  # even two bytes short is refused
    truncated = re.escape(f"the pixel data of {files[which]} is truncated (126 of 128 bytes)")
    with pytest.raises(VolumeError, match=truncated):
        read_volume(tmp_path / "pet")
    with pytest.raises(VolumeError, match=truncated):
        read_volume(files[(which + 1) % 4])  # also when another file of the series is chosen

    make_pet_series(tmp_path / "gone", (1.0, 1.0, 1.0, 1.0))
    path = sorted((tmp_path / "gone").iterdir())[which]
    ds = pydicom.dcmread(path)
    del ds.PixelData
    ds.save_as(path)
    with pytest.raises(VolumeError, match=re.escape(f"{path} has no pixel data (PixelData (7FE0,0010) is missing)")):
        read_volume(tmp_path / "gone")


def test_slices_larger_than_the_deferred_header_size_are_read_and_checked(tmp_path):
    """64 x 64 x 2 bytes per slice: pixel data the header reader leaves on disk (pydicom 3 would read it to
    answer get_item, and its element has no length)."""
    stored = make_pet_series(tmp_path / "pet", (1.0, 1.0, 1.0), size=64)
    assert np.array_equal(read_volume(tmp_path / "pet", suv_factor=1.0).voxels, stored)
    path = sorted((tmp_path / "pet").iterdir())[1]
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(VolumeError, match=re.escape(f"the pixel data of {path} is truncated (8,092 of 8,192 bytes)")):
        read_volume(tmp_path / "pet")


def test_damaged_dicom_file_in_the_series_folder_is_named(tmp_path):
    make_pet_series(tmp_path / "pet", (1.0, 1.0, 1.0))
    path = sorted((tmp_path / "pet").iterdir())[0]
    whole = path.read_bytes()
    path.write_bytes(whole[:400])  # the header itself ends early: GDCM silently leaves the file out
    with pytest.raises(VolumeError, match=f"{re.escape(str(path))} is a damaged DICOM file .*SeriesInstanceUID"):
        read_volume(tmp_path / "pet")
    path.write_bytes(whole[:whole.index(b"\x28\x00\x10\x00")])  # cut before Rows: no pixel data, but an image
    with pytest.raises(VolumeError, match=f"{re.escape(str(path))} has no pixel data"):
        read_volume(tmp_path / "pet")
    dicomdir = pydicom.dcmread(sorted((tmp_path / "pet").iterdir())[1])  # a DICOMDIR-like file is left alone
    dicomdir.file_meta.MediaStorageSOPClassUID = pydicom.uid.MediaStorageDirectoryStorage
    path.unlink()
    for keyword in ("SeriesInstanceUID", "PixelData", "Rows"):
        delattr(dicomdir, keyword)
    dicomdir.save_as(tmp_path / "pet" / "DICOMDIR")
    assert read_volume(tmp_path / "pet").voxels.shape == (2, 8, 8)


def test_units_and_modality_spellings():
    spellings = ("SUV", "suvbw", "GML", " Bq/ml ", "BQML", "hu", "", None, "CNTS")
    assert [volume_module.canonical_units(u) for u in spellings] == [
        "SUVbw", "SUVbw", "SUVbw", "BQML", "BQML", "HU", None, None, "CNTS"]
    assert volume_module.is_suv("SUVlbm") and volume_module.is_suv("g/ml") and not volume_module.is_suv("BQML")
    assert volume_module.canonical_modality(" pt") == "PT" and volume_module.canonical_modality("") is None
    assert volume_module.modality_words("PT") == "PET (PT)" and volume_module.modality_words("MR") == "MR"


def test_declared_modality_and_units_fill_a_plain_file(tmp_path):
    sitk.WriteImage(sitk.GetImageFromArray(np.random.default_rng(0).random((5, 6, 7)).astype(np.float32) * 9),
                    str(tmp_path / "plain.nii.gz"))
    plain = read_volume(tmp_path / "plain.nii.gz")
    assert (plain.modality, plain.units) == (None, None)
    declared = read_volume(tmp_path / "plain.nii.gz", modality="PT", units="SUV")
    assert (declared.modality, declared.units) == ("PT", "SUVbw")
    bq = read_volume(tmp_path / "plain.nii.gz", units="BQML", suv_factor=0.5)
    assert bq.units == "SUVbw" and np.allclose(bq.voxels, plain.voxels * 0.5)


@pytest.mark.parametrize("damage, words", [
    (lambda b: b[:-100],
     "the file is truncated (its pixel data ends after 185 of 210 voxels); copy or export it again."),
    (lambda b: b.replace(b"type: float", b"type: banana"), 'its header field "type" has an invalid value (banana).'),
    (lambda b: b.replace(b"sizes: 7 6 5", b"sizes: 7 6"), 'its header field "'),
    (lambda b: b.replace(b"type: float\n", b""), 'its header lacks the required field "type".'),
    (lambda b: b.replace(b"endian: little", b"endian: middle"),
     'its header field "endian" has an invalid value (middle).'),
    (lambda b: b"", "the file is empty (0 bytes); copy or export it again."),
])
def test_nrrd_read_errors_keep_their_cause_in_words(tmp_path, damage, words):
    path = write_volume(oblique_volume(), tmp_path / "v.nrrd", compress=False)
    path.write_bytes(damage(path.read_bytes()))
    with pytest.raises(VolumeError, match=re.escape(f"could not read {path}: {words}")) as info:
        read_volume(path)
    message = str(info.value)
    assert "[nrrd]" not in message and "ITK" not in message and "\n" not in message


def test_detached_nrrd_without_its_data_file_names_the_data_file(tmp_path):
    path = write_volume(oblique_volume(), tmp_path / "v.nhdr")
    (tmp_path / "v.raw.gz").unlink()
    words = f"its data file {tmp_path / 'v.raw.gz'} is missing or cannot be opened."
    with pytest.raises(VolumeError, match=re.escape(words)):
        read_volume(path)


def test_crop_overlays_and_ras_box_bounds_the_voxel_corners():
    from DiffusionAnomalyLib.volume import Volume, ijk_to_ras_matrix

    direction = np.array([[0.0, 0.0, -1.0], [-1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])  # axes ordered otherwise
    vol = Volume(np.arange(4 * 5 * 6, dtype=np.float32).reshape(4, 5, 6),
                 ijk_to_ras_matrix((2.0, 3.0, 4.0), (10.0, -20.0, 30.0), direction))
    box = (slice(1, 3), slice(2, 5), slice(0, 4))
    crop = vol.crop(box)
    assert np.array_equal(crop.voxels, vol.voxels[box])
    np.testing.assert_allclose(crop.ijk_to_ras_points([[1, 2, 1]]), vol.ijk_to_ras_points([[1, 4, 2]]))
    full = vol.ras_box()
    centres = vol.ijk_to_ras_points([[i, j, k] for i in (0, 5) for j in (0, 4) for k in (0, 3)])
    np.testing.assert_allclose(full, [centres.min(0) - [4 / 2, 2 / 2, 3 / 2], centres.max(0) + [2, 1, 1.5]])
    np.testing.assert_allclose(crop.ras_box(), vol.ras_box(box))


# =============================================================================================
# issue 11: case identity and SUV provenance in meta (nothing identifying copied)
# =============================================================================================
def test_dicom_meta_names_the_case_and_copies_nothing_identifying(tmp_path):
    import json

    make_pet_series(tmp_path / "pet", (1.0, 2.0), extra={"StudyDate": "20240102", "StudyDescription": "PET-CT WB",
                                                         "PatientBirthDate": "19700101", "PatientSex": "F"})
    meta = read_volume(tmp_path / "pet").meta
    source = pydicom.dcmread(next((tmp_path / "pet").iterdir()))
    assert (meta["study_date"], meta["study_description"]) == ("2024-01-02", "PET-CT WB")
    assert (meta["series_instance_uid"], meta["series_description"]) == (source.SeriesInstanceUID, "PET WB")
    text = json.dumps(meta)  # plain values: summary.json and the report take them as they are
    for identifying in ("Phantom^PET", "PHANTOM", "19700101", "patient"):
        assert identifying.lower() not in text.lower()


@pytest.mark.filterwarnings("ignore:Invalid value for VR")
@pytest.mark.parametrize("extra, study_date", [({}, None), ({"StudyDate": "2024.03.04"}, "2024-03-04"),
                                               ({"StudyDate": "20241345"}, None)])
def test_study_date_is_iso_or_none_never_a_refusal(tmp_path, extra, study_date):
    make_pet_series(tmp_path / "pet", (1.0, 1.0), extra=extra)
    meta = read_volume(tmp_path / "pet").meta
    assert meta["study_date"] == study_date and meta["study_description"] == ""


def _provenance(**values):
    from DiffusionAnomalyLib.volume import SUV_PROVENANCE_KEYS

    assert SUV_PROVENANCE_KEYS == ("weight_kg", "injected_dose_bq", "decay_correction", "half_life_s",
                                   "injection_time", "reference_time", "factor", "source")
    return {**dict.fromkeys(SUV_PROVENANCE_KEYS), **values}


def test_suv_provenance_records_what_the_factor_came_from(tmp_path):
    from DiffusionAnomalyLib.volume import suv_bw_provenance, suv_provenance_of_series

    make_pet_series(tmp_path / "start", (1.0, 2.0), acquisition_times=["095500", "100500"])  # earliest before series
    volume = read_volume(tmp_path / "start")
    factor = expected_start_factor(3300.0)
    assert volume.meta["suv_provenance"] == _provenance(
        weight_kg=WEIGHT_KG, injected_dose_bq=DOSE_BQ, decay_correction="START", half_life_s=HALF_LIFE_S,
        injection_time="2024-01-01T09:00:00", reference_time="2024-01-01T09:55:00", factor=volume.meta["suv_factor"],
        source="DICOM tags")
    assert volume.meta["suv_factor"] == pytest.approx(factor, rel=1e-12)
    headers = [pydicom.dcmread(f) for f in (tmp_path / "start").iterdir()]
    assert suv_provenance_of_series(headers) == volume.meta["suv_provenance"]  # the series' record is the reader's
    assert suv_bw_provenance(headers[0])["factor"] == suv_bw_factor(headers[0])  # one rule behind both

    headers[0].DecayCorrection = "ADMIN"  # decay corrected to the injection: no times, no half-life read
    assert suv_bw_provenance(headers[0]) == _provenance(
        weight_kg=WEIGHT_KG, injected_dose_bq=DOSE_BQ, decay_correction="ADMIN",
        factor=pytest.approx(WEIGHT_KG * 1000.0 / DOSE_BQ, rel=1e-12), source="DICOM tags")


def test_suv_provenance_per_slice_for_decay_correction_none(tmp_path):
    make_pet_series(tmp_path / "pet", (1.0, 1.0), decay="NONE", acquisition_times=["100000", "100200"])
    meta = read_volume(tmp_path / "pet").meta
    record = meta["suv_provenance"]
    assert record["decay_correction"] == "NONE" and record["factor"] is meta["suv_factor"]
    np.testing.assert_allclose(record["factor"], [expected_start_factor(3600.0), expected_start_factor(3720.0)])
    assert record["reference_time"] == ["2024-01-01T10:00:00", "2024-01-01T10:02:00"]


def test_suv_provenance_of_other_sources(tmp_path):
    from DiffusionAnomalyLib.volume import SUV_SOURCES, suv_bw_provenance

    make_pet_series(tmp_path / "gml", (1.0, 1.0), units="GML", omit=("PatientWeight",))
    assert read_volume(tmp_path / "gml").meta["suv_provenance"] == _provenance(factor=1.0, source="Units GML")
    make_pet_series(tmp_path / "bq", (1.0, 1.0), omit=("PatientWeight",))
    given = _provenance(factor=0.002, source="--suv-factor")
    assert read_volume(tmp_path / "bq", suv_factor=0.002).meta["suv_provenance"] == given  # the tags are not read
    nrrd = write_volume(Volume(np.arange(8.0, dtype=np.float32).reshape(2, 2, 2), np.eye(4), modality="PT",
                               units="BQML"), tmp_path / "b.nrrd")
    assert read_volume(nrrd, suv_factor=0.002).meta["suv_provenance"] == given
    philips = _pet_slice(tmp_path / "cnts", units="CNTS")
    philips.add_new((0x7053, 0x1000), "LO", "0.000123")
    assert suv_bw_provenance(philips) == _provenance(factor=0.000123, source="Philips SUV scale factor (7053,1000)")
    assert set(SUV_SOURCES) == {"DICOM tags", "--suv-factor", "Units GML", "Philips SUV scale factor (7053,1000)"}


@needs_real_ct
def test_real_ct_meta_has_the_study_and_no_suv_provenance(ct_dicom):
    assert (ct_dicom.meta["study_date"], ct_dicom.meta["study_description"]) == ("2022-12-08", "")
    assert "suv_provenance" not in ct_dicom.meta and len(ct_dicom.meta["files"]) == 20
