"""Export: Slicer .seg.nrrd round trip (slicerio and SimpleITK), CSV, JSON, output folders."""

from __future__ import annotations

import csv
import errno
import json
import os
from pathlib import Path

import nrrd
import numpy as np
import pytest
import SimpleITK as sitk
import slicerio

from DiffusionAnomalyLib.export import (
    format_number,
    write_json,
    write_labelmap,
    write_segmentation,
    write_table_csv,
)
from DiffusionAnomalyLib.files import (
    LOCK_NAME,
    OutputError,
    check_output_folder,
    check_writable_dir,
    output_folder,
    staged,
)
from DiffusionAnomalyLib.measurements import LESION_TABLE_COLUMNS, lesion_table
from DiffusionAnomalyLib.postprocessing import segment
from DiffusionAnomalyLib.volume import Volume, ijk_to_ras_matrix, lps_ras_flip

SHAPE = (9, 11, 13)  # k, j, i


def oblique_matrix() -> np.ndarray:
    a, b = np.radians(25.0), np.radians(-12.0)
    rz = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
    rx = np.array([[1, 0, 0], [0, np.cos(b), -np.sin(b)], [0, np.sin(b), np.cos(b)]])
    return ijk_to_ras_matrix((0.9, 1.3, 3.0), (-120.5, 64.25, -411.0), rz @ rx)


@pytest.fixture()
def reference() -> Volume:
    rng = np.random.default_rng(3)
    return Volume(rng.uniform(0, 5, SHAPE).astype(np.float32), oblique_matrix(), modality="PT", units="SUVbw")


@pytest.fixture()
def labels() -> np.ndarray:
    lab = np.zeros(SHAPE, np.int32)
    lab[1:4, 2:5, 3:7] = 1
    lab[6:8, 7:10, 1:3] = 2
    lab[8, 10, 12] = 3  # the last voxel of the grid
    return lab


def listing(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


# ---- .seg.nrrd -------------------------------------------------------------------------------
def test_segmentation_round_trip_slicerio(tmp_path, reference, labels):
    path = write_segmentation(labels, reference, tmp_path / "lesions.seg.nrrd")
    assert path == tmp_path / "lesions.seg.nrrd"
    assert listing(tmp_path) == ["lesions.seg.nrrd"]  # no temporary file left

    seg = slicerio.read_segmentation(str(path))
    # slicerio holds voxels [i, j, k]; ours are [k, j, i].
    np.testing.assert_array_equal(seg["voxels"].transpose(2, 1, 0), labels)
    np.testing.assert_allclose(lps_ras_flip(seg["ijkToLPS"]), reference.ijk_to_ras, atol=1e-9)
    assert seg["masterRepresentation"] == "Binary labelmap"
    assert seg["containedRepresentationNames"] == ["Binary labelmap"]
    assert seg["referenceImageExtentOffset"] == [0, 0, 0]

    segments = seg["segments"]
    assert [s["name"] for s in segments] == ["Lesion 1", "Lesion 2", "Lesion 3"]
    assert [s["labelValue"] for s in segments] == [1, 2, 3]
    assert [s["layer"] for s in segments] == [0, 0, 0]
    assert len({s["id"] for s in segments}) == 3
    colors = [tuple(s["color"]) for s in segments]
    assert len(set(colors)) == 3 and all(0 <= c <= 1 for rgb in colors for c in rgb)
    for s in segments:
        assert s["terminology"]["type"] == ["SCT", "52988006", "Lesion"]
        mask = slicerio.segment_mask(seg, s["id"])  # [i, j, k]
        nz = np.nonzero(mask)
        assert s["extent"] == [int(v) for ax in nz for v in (ax.min(), ax.max())]
    assert segments[2]["extent"] == [12, 12, 10, 10, 8, 8]

    # The raw header carries the Slicer segmentation fields (IJK->LPS geometry, LPS space).
    header = nrrd.read_header(str(path))
    assert header["space"] == "left-posterior-superior"
    for field in ("ID", "Name", "Color", "LabelValue", "Layer", "Extent", "Tags"):
        assert f"Segment0_{field}" in header and f"Segment2_{field}" in header
    assert header["Segmentation_MasterRepresentation"] == "Binary labelmap"
    geometry = next(
        p.split("|")[1] for p in header["Segmentation_ConversionParameters"].split("&")
        if p.startswith("Reference image geometry|")
    )
    values = [float(v) for v in geometry.rstrip(";").split(";")]
    np.testing.assert_allclose(np.reshape(values[:16], (4, 4)), reference.ijk_to_ras, atol=1e-9)
    assert values[16:] == [0, 12, 0, 10, 0, 8]


def test_segmentation_geometry_matches_volume_in_simpleitk(tmp_path, reference, labels):
    path = write_segmentation(labels, reference, tmp_path / "lesions.seg.nrrd")
    image = sitk.ReadImage(str(path))
    expected = reference.to_sitk()
    assert image.GetSize() == expected.GetSize()
    np.testing.assert_allclose(image.GetOrigin(), expected.GetOrigin(), atol=1e-9)
    np.testing.assert_allclose(image.GetSpacing(), expected.GetSpacing(), atol=1e-9)
    np.testing.assert_allclose(image.GetDirection(), expected.GetDirection(), atol=1e-9)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(image), labels)
    # And back through Volume: the IJK->RAS matrix is the reference's.
    np.testing.assert_allclose(Volume.from_sitk(image).ijk_to_ras, reference.ijk_to_ras, atol=1e-9)


def test_segmentation_custom_names_colours_and_sparse_labels(tmp_path, reference, labels):
    labels = labels.copy()
    labels[labels == 2] = 7
    names = ["spleen lesion", "liver lesion", "node"]
    colors = [(1.0, 0.0, 0.0), (0.0, 1.0, 0.0), (0.0, 0.0, 1.0)]
    path = write_segmentation(labels, reference, tmp_path / "x.seg.nrrd", names=names, colors=colors)
    seg = slicerio.read_segmentation(str(path))
    assert [s["name"] for s in seg["segments"]] == names
    assert [s["labelValue"] for s in seg["segments"]] == [1, 3, 7]
    assert [s["color"] for s in seg["segments"]] == [list(c) for c in colors]
    np.testing.assert_array_equal(slicerio.segment_mask(seg, "liver lesion").transpose(2, 1, 0), labels == 3)


def test_segmentation_without_lesions(tmp_path, reference):
    path = write_segmentation(np.zeros(SHAPE, np.int32), reference, tmp_path / "none.seg.nrrd")
    seg = slicerio.read_segmentation(str(path))
    assert seg["segments"] == []
    assert seg["voxels"].shape == SHAPE[::-1] and not seg["voxels"].any()
    np.testing.assert_allclose(lps_ras_flip(seg["ijkToLPS"]), reference.ijk_to_ras, atol=1e-9)
    assert sitk.ReadImage(str(path)).GetSize() == SHAPE[::-1]


def test_segmentation_many_lesions_use_uint16_and_distinct_colours(tmp_path):
    shape = (2, 20, 20)
    ref = Volume(np.zeros(shape, np.float32), oblique_matrix())
    lab = np.arange(1, 801, dtype=np.int32).reshape(shape)
    path = write_segmentation(lab, ref, tmp_path / "many.seg.nrrd")
    seg = slicerio.read_segmentation(str(path))
    assert seg["voxels"].dtype == np.uint16
    assert len(seg["segments"]) == 800
    assert len({tuple(s["color"]) for s in seg["segments"]}) == 800
    np.testing.assert_array_equal(seg["voxels"].transpose(2, 1, 0), lab)


def test_segmentation_rejects_bad_input(tmp_path, reference, labels):
    with pytest.raises(ValueError, match=r"\(9, 11, 12\).*\(9, 11, 13\)"):
        write_segmentation(labels[:, :, :-1], reference, tmp_path / "a.seg.nrrd")
    with pytest.raises(ValueError, match="2 segment names given for 3 lesions"):
        write_segmentation(labels, reference, tmp_path / "a.seg.nrrd", names=["a", "b"])
    with pytest.raises(ValueError, match="colour"):
        write_segmentation(labels, reference, tmp_path / "a.seg.nrrd", colors=[(255, 0, 0)] * 3)
    with pytest.raises(ValueError, match=".seg.nrrd"):
        write_segmentation(labels, reference, tmp_path / "a.nii.gz")
    with pytest.raises(ValueError, match="integers"):
        write_segmentation(labels.astype(float), reference, tmp_path / "a.seg.nrrd")
    assert listing(tmp_path) == []


def test_failed_write_leaves_no_partial_file_and_keeps_the_old_one(tmp_path, reference, labels, monkeypatch):
    target = tmp_path / "lesions.seg.nrrd"
    write_segmentation(labels, reference, target)
    before = target.read_bytes()

    def disk_full(filename, segmentation, **kwargs):
        Path(filename).write_bytes(b"NRRD0005\ntype: uint8\n")  # half a file, then the disk is full
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(slicerio, "write_segmentation", disk_full)
    with pytest.raises(OutputError, match="No space left on device") as info:
        write_segmentation(np.zeros_like(labels), reference, target)
    assert str(target) in str(info.value)
    assert listing(tmp_path) == ["lesions.seg.nrrd"]
    assert target.read_bytes() == before


def test_write_into_missing_folder_is_an_output_error(tmp_path, reference, labels):
    missing = tmp_path / "not-there"
    with pytest.raises(OutputError, match="does not exist"):
        write_segmentation(labels, reference, missing / "a.seg.nrrd")
    with pytest.raises(OutputError, match="not-there"):
        write_table_csv([], missing / "t.csv")
    assert listing(tmp_path) == []


def test_write_labelmap_nifti(tmp_path, reference, labels):
    path = write_labelmap(labels, reference, tmp_path / "lesions.nii.gz")
    image = sitk.ReadImage(str(path))
    np.testing.assert_array_equal(sitk.GetArrayFromImage(image), labels)
    np.testing.assert_allclose(Volume.from_sitk(image).ijk_to_ras, reference.ijk_to_ras, atol=1e-5)


# ---- CSV -------------------------------------------------------------------------------------
def test_csv_round_trip_of_a_lesion_table(tmp_path, reference):
    heat = reference.with_voxels(np.zeros(SHAPE, np.float32), units="anomaly")
    heat.voxels[1:4, 2:5, 3:7] = 0.9
    heat.voxels[6:8, 7:10, 1:3] = 0.7
    rows = lesion_table(segment(heat), reference, heat)
    assert len(rows) == 2
    path = write_table_csv(rows, tmp_path / "lesions.csv")
    with open(path, newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        assert tuple(reader.fieldnames) == LESION_TABLE_COLUMNS
        read = list(reader)
    assert len(read) == 2
    for row, back in zip(rows, read):
        assert back["id"] == str(row["id"]) and back["voxels"] == str(row["voxels"])
        assert back["organ"] == row["organ"] == "none"  # the text column (no organ map given)
        for key in LESION_TABLE_COLUMNS:
            if key != "organ":
                assert float(back[key]) == pytest.approx(row[key], rel=1e-3, abs=5e-5), key
    assert listing(tmp_path) == ["lesions.csv"]


def test_csv_header_without_rows_and_validation(tmp_path):
    path = write_table_csv([], tmp_path / "empty.csv")
    assert path.read_text(encoding="utf-8").splitlines() == [",".join(LESION_TABLE_COLUMNS)]
    with pytest.raises(ValueError, match="missing.*centroid_s"):
        write_table_csv([{k: 1 for k in LESION_TABLE_COLUMNS[:-1]}], tmp_path / "bad.csv")
    with pytest.raises(ValueError, match="unexpected.*extra"):
        write_table_csv([{**{k: 1 for k in LESION_TABLE_COLUMNS}, "extra": 2}], tmp_path / "bad.csv")
    assert not (tmp_path / "bad.csv").exists()
    custom = write_table_csv([{"case": "a,b", "dsc": np.float32(0.81234567)}], tmp_path / "c.csv", columns=["case", "dsc"])
    assert list(csv.reader(open(custom, newline=""))) == [["case", "dsc"], ["a,b", "0.8123"]]


@pytest.mark.parametrize(
    "value, text",
    [
        (3, "3"), (np.int64(-7), "-7"), (12.345678, "12.3457"), (2.5, "2.5"), (-123.45671, "-123.4567"),
        (0.0, "0"), (0.000123456, "0.0001235"), (1234567.891, "1234567.891"), (np.float32(0.5), "0.5"),
        (float("nan"), "nan"), (True, "true"), ("Lesion 1", "Lesion 1"),
    ],
)
def test_format_number(value, text):
    assert format_number(value) == text


# ---- JSON ------------------------------------------------------------------------------------
def test_write_json_converts_numpy(tmp_path):
    obj = {
        "n": np.int32(3), "x": np.float32(0.25), "flag": np.bool_(True), "arr": np.arange(3),
        "nested": [{"m": np.eye(2)}], "path": tmp_path, "missing": float("nan"), 4: "int key",
    }
    path = write_json(obj, tmp_path / "out.json")
    back = json.loads(path.read_text(encoding="utf-8"))
    assert back == {
        "n": 3, "x": 0.25, "flag": True, "arr": [0, 1, 2], "nested": [{"m": [[1.0, 0.0], [0.0, 1.0]]}],
        "path": str(tmp_path), "missing": None, "4": "int key",
    }
    with pytest.raises(TypeError, match="object"):
        write_json({"bad": object()}, tmp_path / "bad.json")
    assert listing(tmp_path) == ["out.json"]


# ---- output folders --------------------------------------------------------------------------
def test_check_writable_dir_creates_parents(tmp_path):
    target = tmp_path / "a" / "b" / "c"
    assert check_writable_dir(target) == target
    assert target.is_dir() and listing(target) == []
    assert check_writable_dir(str(target)) == target  # existing folder: fine


def test_check_writable_dir_under_a_file(tmp_path):
    blocker = tmp_path / "file.txt"
    blocker.write_text("x")
    with pytest.raises(OutputError, match="output folder .*file.txt.*cannot be created") as info:
        check_writable_dir(blocker / "sub")
    assert isinstance(info.value, OSError)


@pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="needs Linux /proc")
def test_check_writable_dir_unwritable_folder_even_for_root():
    # /proc/<pid> exists and accepts no new files, whoever the user is.
    folder = Path(f"/proc/{os.getpid()}")
    with pytest.raises(OutputError, match=f"output folder {folder} is not writable"):
        check_writable_dir(folder)


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root ignores directory permissions")
def test_unwritable_folder_permissions(tmp_path, reference, labels):
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o500)
    try:
        with pytest.raises(OutputError, match="not writable"):
            check_writable_dir(folder)
        with pytest.raises(OutputError, match="Cannot write"):
            write_segmentation(labels, reference, folder / "a.seg.nrrd")
        assert listing(folder) == []
    finally:
        folder.chmod(0o700)



def test_check_output_folder_creates_nothing(tmp_path):
    target = tmp_path / "a" / "b"
    assert check_output_folder(target) == target
    assert listing(tmp_path) == []
    (tmp_path / "file.txt").write_text("x")
    with pytest.raises(OutputError, match="cannot be created .*file.txt is a file"):
        check_output_folder(tmp_path / "file.txt" / "sub" / "out")
    with pytest.raises(OutputError, match="file.txt is a file, not a folder"):
        check_output_folder(tmp_path / "file.txt")
    assert listing(tmp_path) == ["file.txt"]


def test_output_folder_holds_a_lock_and_removes_what_a_failure_created(tmp_path):
    out = tmp_path / "new" / "out"
    with output_folder(out) as held:
        assert held == out and listing(out) == [LOCK_NAME]
        record = json.loads((out / LOCK_NAME).read_text())
        assert record["pid"] == os.getpid()
    assert listing(out) == []  # success: the folder stays, the lock goes
    with pytest.raises(RuntimeError):
        with output_folder(tmp_path / "other" / "out"):
            raise RuntimeError("the run failed")
    assert listing(tmp_path) == ["new"]


def test_staged_moves_a_whole_set_or_nothing(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "a.txt").write_text("old a")
    (out / "b.txt").write_text("old b")
    (out / "user.txt").write_text("not ours")
    with staged(out, replaces=("a.txt", "b.txt")) as stage:
        (stage / "a.txt").write_text("new a")
    assert listing(out) == ["a.txt", "user.txt"]  # b.txt belonged to the previous set
    assert (out / "a.txt").read_text() == "new a"
    with pytest.raises(ValueError):
        with staged(out) as stage:
            (stage / "a.txt").write_text("newer a")
            raise ValueError("a writer failed")
    assert listing(out) == ["a.txt", "user.txt"] and (out / "a.txt").read_text() == "new a"
