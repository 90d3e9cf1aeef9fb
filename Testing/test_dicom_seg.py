"""Tests of DiffusionAnomalyLib.dicom_seg: lesion labels -> DICOM Segmentation referencing the source series,
read back with highdicom and pydicom and compared voxel by voxel, on a synthetic PET series and the real CT series."""

from __future__ import annotations

import os
import random
import re
import shutil
import time

import highdicom as hd
import numpy as np
import pydicom
import pytest

from DiffusionAnomalyLib import dicom_seg
from DiffusionAnomalyLib.dicom_seg import write_dicom_seg
from DiffusionAnomalyLib.export import LESION_TERMINOLOGY, lesion_colors
from DiffusionAnomalyLib.files import OutputError
from DiffusionAnomalyLib.version import __version__
from DiffusionAnomalyLib.volume import Volume, VolumeError, read_volume, write_volume

from conftest import REAL_CT, needs_real_ct
from test_volume import make_pet_series


# =============================================================================================
# helpers
# =============================================================================================
def slice_of_each_file(folder) -> dict[str, int]:
    """Source file -> its slice index, found independently of the engine: rank along the slice normal."""
    headers = {str(f): pydicom.dcmread(f, stop_before_pixels=True) for f in sorted(folder.iterdir())}
    iop = np.array([float(v) for v in next(iter(headers.values())).ImageOrientationPatient])
    normal = np.cross(iop[:3], iop[3:])
    along = {f: float(np.dot([float(v) for v in ds.ImagePositionPatient], normal)) for f, ds in headers.items()}
    return {f: k for k, f in enumerate(sorted(along, key=along.get))}


def instance_uid(ds) -> str:
    return str(ds.get("SOPInstanceUID", "") or "") or str(ds.file_meta.MediaStorageSOPInstanceUID)


def check_seg(path, labels: np.ndarray, folder, series_uid: str | None, names=None) -> pydicom.Dataset:
    """Read the SEG back (pydicom and highdicom) and compare every frame and every lesion voxel with ``labels``."""
    ids = [int(v) for v in np.unique(labels) if v != 0]
    names = names or [f"Lesion {v}" for v in ids]
    slice_of = slice_of_each_file(folder)
    sources = {f: pydicom.dcmread(f, stop_before_pixels=True) for f in slice_of}
    k_of_uid = {instance_uid(ds): slice_of[f] for f, ds in sources.items()}
    position_of_uid = {instance_uid(ds): [float(v) for v in ds.ImagePositionPatient] for ds in sources.values()}

    ds = pydicom.dcmread(path)
    assert ds.Modality == "SEG" and ds.SegmentationType == "BINARY" and ds.ContentQualification == "RESEARCH"
    (referenced,) = ds.ReferencedSeriesSequence
    if series_uid is not None:
        assert referenced.SeriesInstanceUID == series_uid
    assert {i.ReferencedSOPInstanceUID for i in referenced.ReferencedInstanceSequence} == set(k_of_uid)
    assert ds.FrameOfReferenceUID == next(iter(sources.values())).FrameOfReferenceUID
    assert "PatientName" not in ds or str(ds.PatientName) == str(next(iter(sources.values())).get("PatientName", ""))

    # segments: count, labels, codes (those of the Slicer segments), algorithm, colours
    assert len(ds.SegmentSequence) == len(ids)
    colors = lesion_colors(len(ids))
    for n, segment in enumerate(ds.SegmentSequence):
        assert segment.SegmentNumber == n + 1 and segment.SegmentLabel == names[n]
        assert segment.SegmentedPropertyTypeCodeSequence[0].CodeValue == LESION_TERMINOLOGY["type"][1]
        assert segment.SegmentedPropertyCategoryCodeSequence[0].CodeValue == LESION_TERMINOLOGY["category"][1]
        assert segment.SegmentedPropertyCategoryCodeSequence[0].CodeMeaning == "Morphologically Abnormal Structure"
        assert segment.SegmentAlgorithmType == "AUTOMATIC"
        algorithm = segment.SegmentationAlgorithmIdentificationSequence[0]
        assert (algorithm.AlgorithmName, algorithm.AlgorithmVersion) == ("DiffusionAnomaly", __version__)
        rgb = hd.color.CIELabColor.from_dicom_value(segment.RecommendedDisplayCIELabValue).to_rgb()
        np.testing.assert_allclose(rgb, np.array(colors[n]) * 255, atol=1.5)

    # pydicom: every frame is the mask of its segment on the slice of the source image it references
    pixels = ds.pixel_array.reshape(-1, ds.Rows, ds.Columns)
    found = np.zeros((len(ids),) + labels.shape, dtype=bool)
    for frame, groups in zip(pixels, ds.PerFrameFunctionalGroupsSequence):
        identified = groups if "SegmentIdentificationSequence" in groups else ds.SharedFunctionalGroupsSequence[0]
        number = identified.SegmentIdentificationSequence[0].ReferencedSegmentNumber
        uid = groups.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID
        k = k_of_uid[uid]
        np.testing.assert_allclose([float(v) for v in groups.PlanePositionSequence[0].ImagePositionPatient],
                                   position_of_uid[uid], atol=1e-4)
        assert frame.any(), "empty frames are left out"
        assert np.array_equal(frame.astype(bool), labels[k] == ids[number - 1]), f"segment {number}, slice {k}"
        found[number - 1, k] = frame.astype(bool)
    for n, value in enumerate(ids):  # no lesion voxel lost
        assert np.array_equal(found[n], labels == value)

    # highdicom: the label map by source instance, in slice order
    seg = hd.seg.segread(path)
    assert seg.number_of_segments == len(ids)
    uids = sorted(k_of_uid, key=k_of_uid.get)
    label_map = seg.get_pixels_by_source_instance(uids, combine_segments=True, assert_missing_frames_are_empty=True)
    expected = np.searchsorted(np.array([0, *ids]), labels)
    assert np.array_equal(label_map, expected)
    return ds


def one_sentence(text: str) -> str:
    assert "\n" not in text and text.endswith(".") and not re.search(r"\.\s+[A-Z]", text), text
    return text


def assert_refused(exc_type, match, *args, **kwargs):
    path = args[2]
    before = sorted(os.listdir(path.parent))
    with pytest.raises(exc_type, match=match) as info:
        write_dicom_seg(*args, **kwargs)
    assert sorted(os.listdir(path.parent)) == before, "a refused write left something behind"
    return one_sentence(str(info.value))


def pet_labels(shape) -> np.ndarray:
    """Three lesions, asymmetric along k (a slice order mix-up shows), label values 1, 2 and 5."""
    labels = np.zeros(shape, dtype=np.uint16)
    labels[0, 1:3, 2:5] = 1
    labels[1, 1:4, 2:4] = 1
    labels[2:5, 5:7, 5:8] = 2
    labels[4, 0, 0] = 5
    labels[3, 7, 0:2] = 5
    return labels


@pytest.fixture()
def pet(tmp_path):
    folder = tmp_path / "pet"
    make_pet_series(folder, (1.0, 1.5, 0.5, 2.0, 1.0, 0.75))  # files named against position order
    return folder, read_volume(folder)


# =============================================================================================
# synthetic PET series
# =============================================================================================
def test_pet_series_seg_frames_lie_on_their_source_images(pet, tmp_path):
    folder, volume = pet
    labels = pet_labels(volume.voxels.shape)
    # GDCM's order is not the files' name order in this series
    assert [os.path.basename(f) for f in volume.meta["files"]] != sorted(os.listdir(folder))
    out = write_dicom_seg(labels, volume, tmp_path / "lesions.dcm")
    assert out == tmp_path / "lesions.dcm"
    ds = check_seg(out, labels, folder, volume.meta["series_instance_uid"])
    assert len(ds.PerFrameFunctionalGroupsSequence) == 2 + 3 + 2  # one frame per (segment, slice) with pixels
    assert ds.SeriesDescription == dicom_seg.SERIES_DESCRIPTION


def test_frames_follow_positions_not_the_order_of_the_file_list(pet, tmp_path):
    folder, volume = pet
    labels = pet_labels(volume.voxels.shape)
    shuffled = list(volume.meta["files"])
    random.Random(3).shuffle(shuffled)
    volume.meta["files"] = shuffled[::-1]
    check_seg(write_dicom_seg(labels, volume, tmp_path / "s.dcm"), labels, folder, volume.meta["series_instance_uid"])


def test_labels_as_a_volume_names_descriptions_and_parameters(pet, tmp_path):
    folder, volume = pet
    labels = pet_labels(volume.voxels.shape)
    names, words = ["Lesion 1 (liver)", "Lesion 2", "Lesion 5 (bone)"], ["SUVmax 7.1", "SUVmax 3.2", "SUVmax 4.0"]
    out = write_dicom_seg(volume.with_voxels(labels, units=None), volume, tmp_path / "s.dcm", names, words,
                          parameters={"threshold": "0.5 of the map maximum", "steps": 20})
    ds = check_seg(out, labels, folder, volume.meta["series_instance_uid"], names=names)
    assert [s.SegmentDescription for s in ds.SegmentSequence] == words
    parameters = ds.SegmentSequence[0].SegmentationAlgorithmIdentificationSequence[0].AlgorithmParameters
    assert "threshold=0.5 of the map maximum" in parameters and "steps=20" in parameters


def test_one_lesion_and_a_boolean_mask(pet, tmp_path):
    folder, volume = pet
    mask = pet_labels(volume.voxels.shape) == 2
    check_seg(write_dicom_seg(mask, volume, tmp_path / "s.dcm"), mask.astype(np.uint8), folder, None)


# =============================================================================================
# refusals: one sentence, nothing written
# =============================================================================================
def test_refuses_an_image_not_read_from_dicom(pet, tmp_path):
    folder, volume = pet
    nrrd = read_volume(write_volume(volume, tmp_path / "pet.nrrd"))
    sentence = assert_refused(VolumeError, "must reference the DICOM series", pet_labels(nrrd.voxels.shape), nrrd,
                              tmp_path / "s.dcm")
    assert "pet.nrrd is not a DICOM series" in sentence and ".seg.nrrd" in sentence
    bare = Volume(volume.voxels, volume.ijk_to_ras)
    assert_refused(VolumeError, "the image is not a DICOM series", pet_labels(bare.voxels.shape), bare,
                   tmp_path / "s.dcm")


def test_refuses_when_source_files_are_gone(pet, tmp_path):
    folder, volume = pet
    gone = volume.meta["files"][2]
    os.remove(gone)
    sentence = assert_refused(VolumeError, r"^1 of the 6 source DICOM files are no longer there",
                              pet_labels(volume.voxels.shape), volume, tmp_path / "s.dcm")
    assert gone in sentence


def test_refuses_labels_off_the_grid(pet, tmp_path):
    folder, volume = pet
    labels = pet_labels(volume.voxels.shape)
    assert_refused(ValueError, r"label image \(shape \(5, 8, 8\)\) is not on the grid", labels[:5], volume,
                   tmp_path / "s.dcm")
    shifted = volume.with_voxels(labels)
    shifted.ijk_to_ras[:3, 3] += 4.0
    assert_refused(ValueError, "is not on the grid of the image it should segment", shifted, volume, tmp_path / "s.dcm")
    assert_refused(ValueError, "must hold integers", labels.astype(np.float32), volume, tmp_path / "s.dcm")
    assert_refused(ValueError, "holds no lesion", np.zeros_like(labels), volume, tmp_path / "s.dcm")
    assert_refused(ValueError, "2 segment names given for 3 lesions", labels, volume, tmp_path / "s.dcm",
                   names=["a", "b"])
    assert_refused(ValueError, "at most|1 to 64 characters", labels, volume, tmp_path / "s.dcm",
                   names=["a", "b", "x" * 65])


def test_refuses_an_image_that_left_its_series_grid(pet, tmp_path):
    folder, volume = pet
    cropped = volume.crop((slice(1, 5), slice(0, 8), slice(0, 8)))  # meta (files) copied, grid changed
    sentence = assert_refused(VolumeError, "no longer on the grid of its source DICOM series",
                              pet_labels(volume.voxels.shape)[1:5], cropped, tmp_path / "s.dcm")
    assert "cropped, resampled or reoriented" in sentence
    flipped = volume.with_voxels(volume.voxels[:, ::-1].copy())
    flipped.ijk_to_ras = volume.ijk_to_ras @ np.array([[1, 0, 0, 0], [0, -1, 0, 7], [0, 0, 1, 0], [0, 0, 0, 1.0]])
    assert_refused(VolumeError, "no longer on the grid", pet_labels(flipped.voxels.shape), flipped,
                   tmp_path / "s.dcm")


def test_refuses_files_of_another_series_and_unreadable_ones(pet, tmp_path):
    folder, volume = pet
    other = tmp_path / "other"
    make_pet_series(other, (1.0,) * 6)
    volume.meta["files"] = [str(f) for f in sorted(other.iterdir())]
    assert_refused(VolumeError, "no longer belongs to the series the image was read from",
                   pet_labels(volume.voxels.shape), volume, tmp_path / "s.dcm")
    (other / os.path.basename(volume.meta["files"][0])).write_bytes(b"not DICOM at all")
    assert_refused(VolumeError, "a source file of the image, is no longer a readable DICOM file",
                   pet_labels(volume.voxels.shape), volume, tmp_path / "s.dcm")


def test_write_is_atomic(pet, tmp_path, monkeypatch):
    folder, volume = pet
    labels = pet_labels(volume.voxels.shape)
    target = tmp_path / "out" / "s.dcm"
    with pytest.raises(OutputError, match="does not exist"):
        write_dicom_seg(labels, volume, target)
    target.parent.mkdir()
    target.write_bytes(b"old")

    def disk_full(self, filename, *args, **kwargs):
        with open(filename, "wb") as f:
            f.write(b"partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(hd.seg.Segmentation, "save_as", disk_full)
    with pytest.raises(OutputError, match="No space left on device"):
        write_dicom_seg(labels, volume, target)
    assert os.listdir(target.parent) == ["s.dcm"] and target.read_bytes() == b"old"


# =============================================================================================
# the real CT series (its files are named against GDCM's slice order; its UIDs were emptied by an anonymiser)
# =============================================================================================
@needs_real_ct
def test_real_ct_series_seg_read_back_voxel_by_voxel(tmp_path):
    folder = REAL_CT / "ct_dicom"
    t0 = time.perf_counter()
    volume = read_volume(folder)
    t1 = time.perf_counter()
    assert [os.path.basename(f) for f in volume.meta["files"]] == sorted(os.listdir(folder))[::-1]
    labels = np.zeros(volume.voxels.shape, dtype=np.uint8)
    labels[2:7, 200:260, 150:230] = 1  # five slices near the top of k
    labels[12, 300:305, 40:52] = 2
    labels[19, 0:3, 509:512] = 3  # the last slice, image corner
    t2 = time.perf_counter()
    out = write_dicom_seg(labels, volume, tmp_path / "ct.dcm")
    t3 = time.perf_counter()
    ds = check_seg(out, labels, folder, None)
    t4 = time.perf_counter()
    print(f"real CT 20x512x512: read {t1 - t0:.2f} s, write SEG {t3 - t2:.2f} s, check {t4 - t3:.2f} s, "
          f"{out.stat().st_size} bytes, {len(ds.PerFrameFunctionalGroupsSequence)} frames")
    # the anonymiser emptied the source Series/Study Instance UIDs: a stand-in derived from the instances,
    # the same for every SEG of this series
    assert volume.meta["series_instance_uid"] == ""
    stand_in = ds.ReferencedSeriesSequence[0].SeriesInstanceUID
    assert stand_in and pydicom.dcmread(write_dicom_seg(labels == 2, volume, tmp_path / "b.dcm")) \
        .ReferencedSeriesSequence[0].SeriesInstanceUID == stand_in
    assert ds.StudyDate == "20221208"


@needs_real_ct
def test_real_ct_copied_series_without_a_slice_is_refused(tmp_path):
    folder = tmp_path / "ct"
    shutil.copytree(REAL_CT / "ct_dicom", folder)
    volume = read_volume(folder)
    os.remove(volume.meta["files"][0])
    assert_refused(VolumeError, "1 of the 20 source DICOM files are no longer there",
                   np.ones(volume.voxels.shape, np.uint8), volume, tmp_path / "s.dcm")
