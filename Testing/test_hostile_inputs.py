"""Hostile input files and DICOM series (issue 7): every one is refused before any result exists.

The table runs each input through ``diffusion-anomaly run`` with the shared refusal harness
(``conftest.run_refused``: exit 2, one ``error:`` sentence, no traceback, the input and the output
folder's parent byte-for-byte unchanged) and checks that the sentence names the cause. Further
tests call :func:`volume.read_volume` with declared units (the CLI has no ``--units`` yet) and
:func:`preprocessing.check_modality` directly, including the inputs that must stay accepted.
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from conftest import run_refused
from pydicom.dataelem import DataElement
from conftest import REAL_CT, needs_real_ct
from test_volume import make_pet_series

from DiffusionAnomalyLib import preprocessing
from DiffusionAnomalyLib.preprocessing import check_modality
from DiffusionAnomalyLib.volume import Volume, VolumeError, ijk_to_ras_matrix, read_volume, write_volume

SHAPE = (20, 24, 24)  # k, j, i: a small valid 3D grid
GRID = ijk_to_ras_matrix([8.0, 8.0, 12.0], [-96.0, -96.0, -120.0])


def suv_like(seed: int = 0) -> np.ndarray:
    """Fractional, non-negative values with SUV's range (background ~1, hot spots ~10-20)."""
    rng = np.random.default_rng(seed)
    voxels = rng.gamma(2.0, 0.5, SHAPE).astype(np.float32)
    voxels[8:11, 10:13, 10:13] += 12.0
    return voxels


def volume_file(tmp: Path, name: str, voxels: np.ndarray, modality=None, units=None) -> Path:
    """Written by the engine's writer: modality/units in the header only when given."""
    return write_volume(Volume(voxels, GRID, modality=modality, units=units), tmp / name)


def plain_file(tmp: Path, name: str, voxels: np.ndarray) -> Path:
    """Written by SimpleITK alone: no modality, no units (as most tools write NRRD/NIfTI)."""
    image = sitk.GetImageFromArray(voxels)
    image.SetSpacing((8.0, 8.0, 12.0))
    sitk.WriteImage(image, str(tmp / name))
    return tmp / name


def edit_slices(folder: Path, edit) -> None:
    """Apply ``edit(dataset, index)`` to every file of a written series and save it again."""
    for index, path in enumerate(sorted(folder.iterdir())):
        ds = pydicom.dcmread(path)
        edit(ds, index)
        ds.save_as(path)


def as_text(ds, keyword: str, text: str) -> None:
    """Store ``text`` in a numeric tag as a string element (pydicom refuses to write a non-number as DS)."""
    tag = pydicom.datadict.tag_for_keyword(keyword)
    ds[tag] = DataElement(tag, "LO", text)


# ---- NRRD / NIfTI --------------------------------------------------------------------------------
def mr_nrrd(tmp):
    return volume_file(tmp, "mr.nrrd", suv_like(), modality="MR")


def eight_bit(tmp):
    rng = np.random.default_rng(1)
    return plain_file(tmp, "screenshot.nrrd", rng.integers(0, 256, SHAPE).astype(np.uint8))


def label_map(tmp):
    voxels = np.zeros(SHAPE, np.int16)
    voxels[5:15, 4:20, 4:20] = 1
    voxels[8:11, 10:13, 10:13] = 3
    return plain_file(tmp, "labels.nii.gz", voxels)


def bq_per_ml(tmp):
    return plain_file(tmp, "activity.nrrd", suv_like() * 5300.0)


def counts(tmp):
    return plain_file(tmp, "counts.nii", (suv_like() * 900).astype(np.int32))


def negative_only(tmp):
    return plain_file(tmp, "negative.nrrd", -0.01 * suv_like())


def absurd_scale(tmp):
    return plain_file(tmp, "absurd.nrrd", suv_like() * 1e4)


def tiny_scale(tmp):
    return plain_file(tmp, "tiny.nrrd", suv_like() * 1e-3)


def normalised(tmp):
    voxels = suv_like()
    return plain_file(tmp, "unit_range.nrrd", voxels / voxels.max())


def zero_centred(tmp):
    voxels = suv_like()
    return plain_file(tmp, "zscore.nrrd", (voxels - voxels.mean()) / voxels.std())


def hu_without_modality(tmp):
    return plain_file(tmp, "ct_like.nii.gz", suv_like() * 100.0 - 1000.0)


def suv_too_high(tmp):
    return volume_file(tmp, "suv_high.nrrd", suv_like() * 300.0, modality="PT", units="SUVbw")


def suv_too_low(tmp):
    return volume_file(tmp, "suv_low.nrrd", suv_like() * 1e-3, modality="PT", units="SUVbw")


def suv_far_below_zero(tmp):
    voxels = suv_like()
    voxels[0, 0, :4] = -40.0
    return volume_file(tmp, "suv_negative.nrrd", voxels, modality="PT", units="SUVbw")


def activity_units(tmp):
    return volume_file(tmp, "bqml.nrrd", suv_like() * 5300.0, modality="PT", units="BQML")


def truncated_nrrd(tmp):
    path = volume_file(tmp, "cut.nrrd", suv_like(), modality="PT", units="SUVbw")
    path.write_bytes(path.read_bytes()[:-300])
    return path


def flip_bytes(path: Path) -> Path:
    """Zero 64 bytes in the middle of the file (bit rot in the compressed pixel data)."""
    data = bytearray(path.read_bytes())
    middle = len(data) * 2 // 3
    data[middle:middle + 64] = bytes(64)
    path.write_bytes(bytes(data))
    return path


def damaged_nrrd(tmp):
    return flip_bytes(volume_file(tmp, "bits.nrrd", suv_like(), modality="PT", units="SUVbw"))


def damaged_nifti(tmp):
    return flip_bytes(volume_file(tmp, "bits.nii.gz", suv_like(), modality="PT", units="SUVbw"))


def bad_nrrd_field(tmp):
    path = write_volume(Volume(suv_like(), GRID, modality="PT", units="SUVbw"), tmp / "field.nrrd", compress=False)
    path.write_bytes(path.read_bytes().replace(b"type: float", b"type: banana", 1))
    return path


def detached_without_data(tmp):
    path = volume_file(tmp, "header.nhdr", suv_like(), modality="PT", units="SUVbw")
    for data in tmp.glob("header.*"):
        if data.suffix != ".nhdr":
            data.unlink()
    return path


def empty_file(tmp):
    (tmp / "empty.nii.gz").write_bytes(b"")
    return tmp / "empty.nii.gz"


def pet_nrrd(tmp):
    return volume_file(tmp, "pet.nrrd", suv_like(), modality="PT", units="SUVbw")


# ---- DICOM -----------------------------------------------------------------------------------------
def pet_series(tmp, **kwargs) -> Path:
    make_pet_series(tmp / "dicom", (1.0, 1.0, 1.0, 1.0), **kwargs)
    return tmp / "dicom"


def mr_dicom(tmp):
    return pet_series(tmp, modality="MR", units="")


def truncated_pixels(tmp):
    folder = pet_series(tmp)
    path = sorted(folder.iterdir())[1]
    path.write_bytes(path.read_bytes()[:-60])
    return folder


def missing_pixels(tmp):
    folder = pet_series(tmp)
    path = sorted(folder.iterdir())[0]  # an end slice: without a check it would vanish unnoticed
    ds = pydicom.dcmread(path)
    del ds.PixelData
    ds.save_as(path)
    return folder


def nan_slope(tmp):
    folder = pet_series(tmp)
    edit_slices(folder, lambda ds, i: setattr(ds, "RescaleSlope", "NaN") if i == 2 else None)
    return folder


def infinite_intercept(tmp):
    folder = pet_series(tmp)
    edit_slices(folder, lambda ds, i: setattr(ds, "RescaleIntercept", "-inf"))
    return folder


def missing_slope(tmp):
    return pet_series(tmp, omit=("RescaleSlope",))


def zero_slope(tmp):
    return pet_series(tmp, extra={"RescaleSlope": 0})


def philips_minus_one(tmp):
    folder = pet_series(tmp, units="CNTS")
    edit_slices(folder, lambda ds, i: ds.add_new((0x7053, 0x1000), "DS", "-1"))
    return folder


def nan_weight(tmp):
    return pet_series(tmp, weight="NaN")


def heavy_weight(tmp):
    return pet_series(tmp, weight=7500)  # grams entered where kilograms belong


def text_weight(tmp):
    folder = pet_series(tmp)
    edit_slices(folder, lambda ds, i: as_text(ds, "PatientWeight", "75kg"))
    return folder


def dose_in_mbq(tmp):
    folder = pet_series(tmp)
    edit_slices(folder, lambda ds, i: setattr(ds.RadiopharmaceuticalInformationSequence[0],
                                              "RadionuclideTotalDose", 370))  # MBq entered where Bq belong
    return folder


def zero_half_life(tmp):
    folder = pet_series(tmp)
    edit_slices(folder, lambda ds, i: setattr(ds.RadiopharmaceuticalInformationSequence[0], "RadionuclideHalfLife", 0))
    return folder


def injected_days_earlier(tmp):
    folder = pet_series(tmp)
    edit_slices(folder, lambda ds, i: setattr(ds.RadiopharmaceuticalInformationSequence[0],
                                              "RadiopharmaceuticalStartDateTime", "20231229090000"))
    return folder


def injected_after_scan(tmp):
    return pet_series(tmp, injection_time="103000")


HOSTILE = [
    # (id, builder, extra arguments, words the error sentence must contain)
    ("mr-nrrd", mr_nrrd, [], ["trained on PET", "input is MR"]),
    ("mr-dicom", mr_dicom, [], ["trained on PET", "input is MR"]),
    ("uint8-picture", eight_bit, [], ["no units", "8-bit picture", "--modality PT --units SUVbw"]),
    ("label-map", label_map, [], ["whole numbers from 0 to 3", "label map"]),
    ("bq-per-ml-without-units", bq_per_ml, [], ["no units", "Bq/ml", "--suv-factor", "--units SUVbw"]),
    ("integer-counts", counts, [], ["whole numbers up to", "stored counts"]),
    ("negative-only", negative_only, [], ["no positive values", "never negative"]),
    ("absurd-scale", absurd_scale, [], ["wrong scale", "--units SUVbw"]),
    ("tiny-scale", tiny_scale, [], ["normalised image or a wrong scale"]),
    ("normalised-0-1", normalised, [], ["maximum of 1,", "normalised"]),
    ("zero-centred", zero_centred, [], ["negative values", "zero-centred"]),
    ("hu-without-modality", hu_without_modality, [], ["looks like CT in HU", "expects PET"]),
    ("suv-too-high", suv_too_high, [], ["SUVbw", "physically plausible", "1000"]),
    ("suv-too-low", suv_too_low, [], ["physically plausible", "0.2"]),
    ("suv-far-below-zero", suv_far_below_zero, [], ["down to -40", "never below -10"]),
    ("activity-units", activity_units, [], ["BQML", "body-weight SUV"]),
    ("declared-modality-contradicts-file", pet_nrrd, ["--modality", "CT"],
     ["pet.nrrd gives its modality as PET (PT), but CT was declared"]),
    ("truncated-nrrd", truncated_nrrd, [], ["cut.nrrd", "truncated", "compressed data ends early"]),
    ("damaged-nrrd", damaged_nrrd, [], ["bits.nrrd", "compressed data is damaged", "checksum"]),
    ("damaged-nifti", damaged_nifti, [], ["bits.nii.gz", "compressed data is damaged"]),
    ("bad-nrrd-field", bad_nrrd_field, [], ["field.nrrd", 'header field "type"', "banana"]),
    ("detached-header-without-data", detached_without_data, [], ["header.raw.gz", "missing"]),
    ("empty-file", empty_file, [], ["empty.nii.gz", "empty (0 bytes)"]),
    ("dicom-truncated-pixel-data", truncated_pixels, [], ["pixel data of", "slice_002.dcm", "truncated (68 of 128"]),
    ("dicom-slice-without-pixel-data", missing_pixels, [], ["slice_001.dcm", "no pixel data", "(7FE0,0010)"]),
    ("dicom-nan-slope", nan_slope, [], ["RescaleSlope (0028,1053)", "slice_003.dcm", "not a finite number"]),
    ("dicom-infinite-intercept", infinite_intercept, [], ["RescaleIntercept (0028,1052)", "not a finite number"]),
    ("dicom-missing-slope", missing_slope, [], ["RescaleSlope (0028,1053) is missing", "PET (PT)"]),
    ("dicom-zero-slope", zero_slope, [], ["RescaleSlope (0028,1053)", "is 0", "positive"]),
    ("dicom-philips-scale-minus-one", philips_minus_one, [], ["Philips SUV scale factor (7053,1000)", "is -1"]),
    ("dicom-nan-weight", nan_weight, [], ["PatientWeight (0010,1030)", "NaN (not a finite number)"]),
    ("dicom-implausible-weight", heavy_weight, [],
     ["PatientWeight (0010,1030)", "7500 kg", "plausible range 1 to 500 kg"]),
    ("dicom-weight-not-a-number", text_weight, [], ["PatientWeight (0010,1030)", '"75kg", which is not a number']),
    ("dicom-dose-in-mbq", dose_in_mbq, [], ["RadionuclideTotalDose (0018,1074)", "370 Bq", "1 MBq to 20 GBq"]),
    ("dicom-zero-half-life", zero_half_life, [], ["RadionuclideHalfLife (0018,1075)", "is 0 s"]),
    ("dicom-injected-days-earlier", injected_days_earlier, [], ["73.0 h after the injection", "10 half-lives"]),
    ("dicom-injected-after-scan", injected_after_scan, [], ["injection time", "after the scan time"]),
]


@pytest.mark.filterwarnings("ignore:Invalid value for VR")  # pydicom warns about the values these tests write
@pytest.mark.parametrize("build, extra, words", [c[1:] for c in HOSTILE], ids=[c[0] for c in HOSTILE])
def test_hostile_input_is_refused_by_run(tmp_path, capsys, tiny_checkpoint, build, extra, words):
    path = build(tmp_path)
    out = tmp_path / "results"
    line = run_refused(capsys, "run", "--checkpoint", tiny_checkpoint, "--input", path, "--out", out, "--steps", 1,
                       *extra, watch=(path, out.parent))
    for word in words:
        assert word in line, f"{word!r} not in {line!r}"
    assert "Traceback" not in line and "Error(" not in line and "\\n" not in line
    if build is philips_minus_one:
        assert "CT" not in line.replace(str(tmp_path), "")  # a Philips scale of -1 is a bad tag, not a CT


def test_table_is_large_enough():
    assert len(HOSTILE) >= 15 and len({c[0] for c in HOSTILE}) == len(HOSTILE)


# ---- declared units (read_volume; the CLI passes --units through) ---------------------------------------
def test_declared_units_fill_what_the_file_does_not_say(tmp_path, tiny_card):
    path = plain_file(tmp_path, "plain.nrrd", suv_like())
    volume = read_volume(path, modality="pt", units="SUV")
    assert (volume.modality, volume.units) == ("PT", "SUVbw")
    check_modality(volume, tiny_card)  # a declared SUV volume with plausible values is accepted
    ints = plain_file(tmp_path, "ints.nrrd", np.rint(suv_like() * 3).astype(np.int16))
    with pytest.raises(VolumeError, match=r"whole numbers .*declare it \(command line: --modality PT --units SUVbw; "
                                          r"Slicer: Units SUVbw\)"):
        check_modality(read_volume(ints), tiny_card)
    check_modality(read_volume(ints, units="SUVbw"), tiny_card)  # the user said so: accepted


def test_declared_units_that_contradict_the_file_are_refused(tmp_path):
    path = volume_file(tmp_path, "pet.nii.gz", suv_like(), modality="PT", units="SUVbw")
    assert read_volume(path, units="suvbw").units == "SUVbw"
    with pytest.raises(VolumeError, match=r"pet.nii.gz gives its units as SUVbw, but BQML was declared; remove"):
        read_volume(path, units="Bq/ml")
    with pytest.raises(VolumeError, match="already in SUVbw; do not pass an SUV factor"):
        read_volume(plain_file(tmp_path, "plain.nrrd", suv_like()), units="SUVbw", suv_factor=0.002)
    with pytest.raises(VolumeError, match="SUV factor applies to PET only"):
        read_volume(volume_file(tmp_path, "ct.nrrd", suv_like() * 100 - 50, modality="CT"), suv_factor=0.002)


def test_declared_units_stand_in_for_a_missing_dicom_units_tag(tmp_path):
    stored = make_pet_series(tmp_path / "no_units", (1.0, 1.0, 1.0), omit=("Units",))
    with pytest.raises(VolumeError, match=r"Units \(0054,1001\) is missing or empty in the PET header of"):
        read_volume(tmp_path / "no_units")
    in_bqml = read_volume(tmp_path / "no_units", units="BQML")
    factor = 75.0 * 1000.0 / (370e6 * 2.0 ** (-3600.0 / 6586.2))
    np.testing.assert_allclose(in_bqml.voxels, stored * factor, rtol=1e-6)
    in_suv = read_volume(tmp_path / "no_units", units="SUVbw")
    assert in_suv.units == "SUVbw" and in_suv.meta["suv_factor"] == 1.0
    make_pet_series(tmp_path / "bqml", (1.0, 1.0, 1.0))
    with pytest.raises(VolumeError, match=r"gives its units as BQML, but SUVbw was declared"):
        read_volume(tmp_path / "bqml", units="SUVbw")
    with pytest.raises(VolumeError, match=r"gives its modality as PET \(PT\), but CT was declared"):
        read_volume(tmp_path / "bqml", modality="CT")


# ---- check_modality on its own: what stays accepted ---------------------------------------------------
@pytest.mark.parametrize("voxels, modality, units", [
    (suv_like(), "PT", "SUVbw"),
    (suv_like(), None, None),  # no metadata but SUV-like values (the phantoms' case)
    (suv_like() * 4.0, "PT", None),  # SUVmax ~80: high but plausible
    (suv_like() * 0.2, None, "SUVbw"),  # a declared low-uptake region
    (np.rint(suv_like() * 10), None, "SUVbw"),  # whole numbers are fine once declared
], ids=["labelled", "unlabelled", "hot-no-units", "cold-declared", "integers-declared"])
def test_plausible_pet_is_accepted(tiny_card, voxels, modality, units):
    noisy = voxels.astype(np.float32)
    noisy[0] -= 0.3  # a little reconstruction noise below zero in the first slice
    check_modality(Volume(noisy, GRID, modality=modality, units=units), tiny_card)


def test_phantoms_are_accepted(tiny_card, small_phantom, pet_slab, oblique_pet):
    for volume in (small_phantom, pet_slab, oblique_pet):
        check_modality(volume, tiny_card)
        check_modality(volume.with_voxels(volume.voxels, modality=None, units=None), tiny_card)


def test_modality_other_than_the_models_is_refused_by_name(tiny_card):
    for code in ("MR", "NM", "SEG", "OT"):
        with pytest.raises(VolumeError, match=f"trained on PET but the input is {code};"):
            check_modality(Volume(suv_like(), GRID, modality=code.lower(), units="SUVbw"), tiny_card)


def test_thresholds_are_named_constants_with_their_reason():
    source = Path(preprocessing.__file__).read_text()
    for name in ("SUV_MAX_AT_LEAST", "SUV_MAX_AT_MOST", "SUV_MIN_AT_LEAST", "NEGATIVE_SUM_AT_MOST",
                 "UNDECLARED_MAX_ABOVE", "UNDECLARED_MAX_AT_MOST", "HU_AIR_BELOW", "EIGHT_BIT_MAX"):
        assert f"\n{name} = " in source and source.split(f"\n{name} = ")[0].rstrip().splitlines()[-1].startswith("#")
    assert preprocessing.UNDECLARED_MAX_ABOVE < preprocessing.UNDECLARED_MAX_AT_MOST < preprocessing.SUV_MAX_AT_MOST


def test_dicom_injection_the_day_before_and_days_before_for_long_lived_nuclides(tmp_path):
    """Timing is judged in half-lives: Zr-89 scanned 3 days after injection is fine, F-18 is not."""
    injected = (dt.datetime(2024, 1, 1, 10) - dt.timedelta(days=3)).strftime("%Y%m%d%H%M%S")

    def zirconium(ds, index):
        item = ds.RadiopharmaceuticalInformationSequence[0]
        item.RadionuclideHalfLife, item.RadiopharmaceuticalStartDateTime = 282276.0, injected  # Zr-89: 78.4 h

    make_pet_series(tmp_path / "zr", (1.0, 1.0))
    edit_slices(tmp_path / "zr", zirconium)
    volume = read_volume(tmp_path / "zr")
    expected = 75.0 * 1000.0 / (370e6 * 2.0 ** (-3 * 86400.0 / 282276.0))
    assert volume.units == "SUVbw" and volume.meta["suv_factor"] == pytest.approx(expected, rel=1e-9)


@needs_real_ct
@pytest.mark.parametrize("name", ["ct_abdomen_3mm.nii.gz", "ct_dicom"])
def test_a_ct_in_hu_is_accepted_and_its_raw_stored_values_are_refused(name):
    """A CT model takes the real CTs in HU (NIfTI and DICOM); the same voxels without the DICOM rescale
    (unsigned stored values = HU + 1024, as a converter that ignores RescaleIntercept writes them) are
    refused in one sentence, whether or not the file claims HU."""
    card = {"modality": "CT", "id": "ct-test"}
    ct = read_volume(REAL_CT / name, modality="CT")
    check_modality(ct, card)
    for units in ("HU", None):
        raw = ct.with_voxels(np.clip(np.asarray(ct.voxels, dtype=np.float32) + 1024.0, 0, None), modality="CT",
                             units=units)
        with pytest.raises(VolumeError) as err:
            check_modality(raw, card)
        message = str(err.value)
        assert "raw stored values without the DICOM rescale" in message and "\n" not in message
    # crops in HU without air: soft tissue and fat, or tissue only (liver-like, 40-60 HU), are still CTs in HU
    check_modality(ct.with_voxels(np.clip(np.asarray(ct.voxels, dtype=np.float32), -100, 300)), card)
    check_modality(ct.with_voxels(np.clip(np.asarray(ct.voxels, dtype=np.float32), 40, 60)), card)


def test_a_pet_given_to_a_ct_model_is_refused(small_phantom):
    """A PET (declared, or a NIfTI whose modality nobody stated) given to a CT model: one sentence, nothing run."""
    card = {"modality": "CT", "id": "ct-test"}
    with pytest.raises(VolumeError, match=r"trained on CT but the input is PET"):
        check_modality(small_phantom, card)
    undeclared = small_phantom.with_voxels(np.asarray(small_phantom.voxels, dtype=np.float32), modality=None, units=None)
    with pytest.raises(VolumeError) as err:
        check_modality(undeclared, card)
    assert "like a PET in SUV, not a CT in Hounsfield units" in str(err.value) and "\n" not in str(err.value)
