"""The case pipeline and the IgCONDA method on a tiny real network: geometry of every output on an
oblique input, the result cache the Slicer sliders rely on, determinism, input refusals and
all-or-nothing output writing."""

from __future__ import annotations

import csv
import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import slicerio
import torch

from DiffusionAnomalyLib import pipeline
from DiffusionAnomalyLib.methods import load_checkpoint
from DiffusionAnomalyLib.diffusion import timestep_grid
from DiffusionAnomalyLib.files import OutputError
from DiffusionAnomalyLib.measurements import LESION_TABLE_COLUMNS
from DiffusionAnomalyLib.postprocessing import Thresholding
from DiffusionAnomalyLib.volume import VolumeError, lps_ras_flip, read_volume

OUTPUT_FILES = {"heatmap.nrrd", "counterfactual.nrrd", "lesions.seg.nrrd", "lesions.csv", "summary.json"}


@pytest.fixture(scope="module")
def oblique_case(tiny_checkpoint, oblique_pet):
    """(model, input volume, CaseResult) of one analysis of the oblique volume, shared by the module."""
    model = load_checkpoint(tiny_checkpoint, device="cpu")
    return model, oblique_pet, pipeline.analyse(model, oblique_pet)


def listing(folder: Path) -> set[str]:
    return {p.name for p in folder.iterdir()} if folder.exists() else set()


# =============================================================================================
# geometry and outputs
# =============================================================================================
def test_oblique_fixture_is_really_oblique(oblique_pet):
    d = oblique_pet.direction_ras
    assert not np.allclose(np.abs(d), np.eye(3), atol=0.05)  # not a permutation / flip of the axes
    assert np.allclose(d.T @ d, np.eye(3), atol=1e-9)
    assert np.linalg.norm(oblique_pet.origin_ras) > 100


def test_analyse_oblique_outputs_on_the_input_grid(oblique_case):
    model, volume, result = oblique_case
    heat, cf = result.heatmap, result.counterfactual
    for out in (heat, cf):
        assert out.voxels.shape == volume.voxels.shape
        np.testing.assert_array_equal(out.ijk_to_ras, volume.ijk_to_ras)
        assert np.all(np.isfinite(out.voxels))
    assert result.labels.shape == volume.voxels.shape
    assert heat.voxels.min() >= 0 and heat.voxels.max() > 0  # |x - counterfactual|, not all zero
    # the network saw every slice of the model grid: K encode steps + 2K decode steps per slice
    n_slices = result.method.model_input.shape[0]
    k = len(timestep_grid(50, 3)) - 1
    assert result.method.network_evaluations == 3 * k * n_slices
    assert result.method.parameters == {"noise_level": 50, "guidance_scale": 3.0, "steps": 3}

    ids = sorted(int(v) for v in np.unique(result.labels) if v != 0)
    assert result.lesion_count == len(result.table) == len(ids) > 0
    assert [row["id"] for row in result.table] == ids
    for row in result.table:
        assert row["voxels"] == int((result.labels == row["id"]).sum())
        assert row["max_heat"] == pytest.approx(float(heat.voxels[result.labels == row["id"]].max()))


def test_write_outputs_round_trip_with_input_geometry(oblique_case, tmp_path):
    model, volume, result = oblique_case
    out = tmp_path / "results"
    written = pipeline.write_outputs(result, out, {"input_path": "oblique.nrrd"})
    assert set(written) == OUTPUT_FILES
    assert listing(out) == OUTPUT_FILES  # nothing else: no .staging-* folder, no temporary files

    for name, expected in (("heatmap.nrrd", result.heatmap), ("counterfactual.nrrd", result.counterfactual)):
        back = read_volume(out / name)
        assert back.voxels.shape == volume.voxels.shape
        np.testing.assert_allclose(back.ijk_to_ras, volume.ijk_to_ras, atol=1e-4)
        np.testing.assert_allclose(back.voxels, expected.voxels, rtol=1e-6, atol=1e-6)

    seg = slicerio.read_segmentation(str(out / "lesions.seg.nrrd"))
    np.testing.assert_array_equal(seg["voxels"].transpose(2, 1, 0), result.labels)
    np.testing.assert_allclose(lps_ras_flip(seg["ijkToLPS"]), volume.ijk_to_ras, atol=1e-4)
    assert [s["labelValue"] for s in seg["segments"]] == [row["id"] for row in result.table]

    with open(out / "lesions.csv", newline="") as f:
        rows = list(csv.reader(f))
    assert rows[0] == list(LESION_TABLE_COLUMNS)
    assert len(rows) - 1 == result.lesion_count
    assert [int(r[0]) for r in rows[1:]] == [row["id"] for row in result.table]

    summary = json.loads((out / "summary.json").read_text())
    assert summary["lesion_count"] == result.lesion_count
    assert summary["input"]["shape_ijk"] == list(volume.shape_ijk)
    np.testing.assert_allclose(summary["input"]["ijk_to_ras"], volume.ijk_to_ras, atol=1e-4)
    assert summary["model"]["id"] == model.card["id"]
    assert summary["input_path"] == "oblique.nrrd"


def nrrd_encoding(path: Path) -> str:
    """The 'encoding' field of an attached NRRD header."""
    with open(path, "rb") as f:
        header = f.read(4096).split(b"\n\n", 1)[0].decode("latin-1")
    return next(line.split(":", 1)[1].strip() for line in header.splitlines() if line.startswith("encoding:"))


def test_dense_maps_are_written_raw_and_sparse_ones_gzipped(oblique_case, tmp_path):
    """A dense float map gains little from gzip and reads several times slower with it (a re-threshold's time); a
    map that is mostly zeros (an organ ROI) is compressed. Both read back bit for bit."""
    _, volume, result = oblique_case
    dense = result.heatmap.with_voxels(result.heatmap.voxels + 0.5)  # no zero voxel
    sparse_voxels = np.zeros_like(result.heatmap.voxels)
    sparse_voxels[:2] = 1.0
    sparse = result.heatmap.with_voxels(sparse_voxels)
    for name, heat, encoding in (("dense", dense, "raw"), ("sparse", sparse, "gzip")):
        case = dataclasses.replace(result, heatmap=heat, counterfactual=heat, roi=None)
        out = pipeline.write_outputs(case, tmp_path / name)["heatmap.nrrd"].parent
        for map_name in ("heatmap.nrrd", "counterfactual.nrrd"):
            assert nrrd_encoding(out / map_name) == encoding, (name, map_name)
            np.testing.assert_array_equal(read_volume(out / map_name, validate=False).voxels, heat.voxels)


def test_write_failure_leaves_no_files(oblique_case, tmp_path, monkeypatch):
    model, _, result = oblique_case
    out = tmp_path / "results"

    def broken(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(pipeline, "write_table_csv", broken)
    with pytest.raises(OutputError, match="No space left on device"):
        pipeline.write_outputs(result, out)
    assert listing(out) == set()  # neither results nor the staging folder


def test_failure_while_moving_into_place_leaves_no_partial_set(oblique_case, tmp_path):
    model, _, result = oblique_case
    out = tmp_path / "results"
    (out / "summary.json").mkdir(parents=True)  # the last file to be moved cannot replace a folder
    (out / "summary.json" / "keep").write_text("x")
    with pytest.raises(OutputError):
        pipeline.write_outputs(result, out)
    assert listing(out) == {"summary.json"}  # only what was there before


# =============================================================================================
# cache: what a slider change recomputes
# =============================================================================================
def test_cache_recomputes_only_what_a_parameter_invalidates(tiny_model, pet_slab):
    model = tiny_model
    first = model.run(pet_slab)
    n = first.model_input.shape[0]
    k = len(timestep_grid(50, 3)) - 1
    assert first.network_evaluations == n * k + 2 * n * k
    assert model.network_evaluations == first.network_evaluations

    again = model.run(pet_slab, noise_level=50, guidance_scale=3.0, steps=3)  # same parameters, explicit
    assert again.network_evaluations == 0
    assert "encode" not in again.timings and "decode" not in again.timings
    np.testing.assert_array_equal(again.heatmap.voxels, first.heatmap.voxels)
    np.testing.assert_array_equal(again.counterfactual.voxels, first.counterfactual.voxels)

    # a copy of the input (same content, new object) hits the cache too
    copy = pet_slab.with_voxels(pet_slab.voxels.copy())
    assert model.run(copy).network_evaluations == 0

    guided = model.run(pet_slab, guidance_scale=1.0)  # decode only, from the cached latents
    assert guided.network_evaluations == 2 * n * k
    assert "decode" in guided.timings and "encode" not in guided.timings
    assert not np.array_equal(guided.heatmap.voxels, first.heatmap.voxels)

    back = model.run(pet_slab)  # slider moved back: the first counterfactual is still cached
    assert back.network_evaluations == 0
    np.testing.assert_array_equal(back.heatmap.voxels, first.heatmap.voxels)

    noisier = model.run(pet_slab, noise_level=80)  # re-encode and decode
    k80 = len(timestep_grid(80, 3)) - 1
    assert noisier.network_evaluations == n * k80 + 2 * n * k80
    assert "encode" in noisier.timings

    steps = model.run(pet_slab, steps=2)  # the grid is part of the latent key too
    assert steps.network_evaluations == 3 * n * (len(timestep_grid(50, 2)) - 1)
    assert model.network_evaluations == sum(r.network_evaluations for r in (first, guided, noisier, steps))


def test_threshold_change_needs_no_network(tiny_model, pet_slab):
    model = tiny_model
    result = pipeline.analyse(model, pet_slab)
    before = model.network_evaluations
    assert before > 0
    loose = Thresholding(method="fraction", value=0.2, min_size_ml=0.0)
    strict = Thresholding(method="fraction", value=0.7, min_size_ml=0.0)
    labels_loose, table_loose = pipeline.lesions_from_heat(result.heatmap, pet_slab, loose)
    labels_strict, table_strict = pipeline.lesions_from_heat(result.heatmap, pet_slab, strict)
    otsu_labels, _ = pipeline.lesions_from_heat(result.heatmap, pet_slab, Thresholding(method="otsu", value=None))
    assert model.network_evaluations == before
    assert (labels_strict > 0).sum() < (labels_loose > 0).sum()
    assert len(table_loose) == len(np.unique(labels_loose)) - 1
    assert otsu_labels.shape == pet_slab.voxels.shape


def test_fresh_models_give_bit_identical_heat_maps(tiny_checkpoint, pet_slab):
    heats = []
    for _ in range(2):
        model = load_checkpoint(tiny_checkpoint, device="cpu")
        heats.append(model.run(pet_slab, steps=2).heatmap.voxels)
    assert heats[0].dtype == heats[1].dtype
    assert np.array_equal(heats[0], heats[1])
    assert heats[0].max() > 0


# =============================================================================================
# the image-batch API
# =============================================================================================
def test_counterfactual_keeps_batch_shape(tiny_model):
    torch.manual_seed(1)
    images = torch.rand(2, 1, 32, 32)
    cf = tiny_model.counterfactual(images, noise_level=4, guidance_scale=2.0, steps="reference")
    assert cf.shape == images.shape
    assert torch.isfinite(cf).all()
    # steps="reference" is the stride-1 reference loop: D encode evaluations and 2 D decode evaluations per image
    assert tiny_model.network_evaluations == 2 * 4 + 2 * 2 * 4
    # encode/decode halves compose to the same result
    latents = tiny_model.encode(images, 4, "reference")
    assert latents.shape == images.shape
    torch.testing.assert_close(tiny_model.decode(latents, 4, 2.0, "reference"), cf)
    before = tiny_model.network_evaluations
    strided = tiny_model.counterfactual(images, noise_level=20, guidance_scale=2.0, steps=2)
    # a strided grid of K = 2 steps: 2 encode and 2 x 2 decode evaluations per image, whatever D is
    assert tiny_model.network_evaluations - before == 2 * 2 + 2 * 2 * 2
    assert strided.shape == images.shape and not torch.equal(strided, images)


def test_counterfactual_refuses_images_without_channel_axis(tiny_model):
    with pytest.raises(ValueError, match=r"\(B, 1, H, W\)"):
        tiny_model.counterfactual(torch.rand(2, 32, 32), noise_level=4, guidance_scale=2.0, steps="reference")
    with pytest.raises(ValueError, match=r"\(B, 1, H, W\)"):
        tiny_model.counterfactual(torch.rand(2, 3, 32, 32), noise_level=4, guidance_scale=2.0, steps="reference")
    assert tiny_model.network_evaluations == 0


# =============================================================================================
# modality and parameter checks
# =============================================================================================
def test_ct_modality_is_refused(tiny_model, small_phantom):
    ct = small_phantom.with_voxels(small_phantom.voxels * 100.0 - 50.0, modality="CT", units="HU")
    with pytest.raises(VolumeError, match="PET") as info:
        tiny_model.run(ct)
    assert "CT" in str(info.value)
    assert tiny_model.network_evaluations == 0


def test_hu_like_values_without_modality_are_refused(tiny_model, small_phantom):
    hu = small_phantom.with_voxels(small_phantom.voxels * 100.0 - 1000.0, modality=None, units=None)
    with pytest.raises(VolumeError, match="expects PET"):
        tiny_model.run(hu)
    assert tiny_model.network_evaluations == 0


def test_activity_units_are_refused(tiny_model, small_phantom):
    bqml = small_phantom.with_voxels(small_phantom.voxels * 5000.0, units="BQML")
    with pytest.raises(VolumeError, match="SUV") as info:
        tiny_model.run(bqml)
    assert "BQML" in str(info.value)
    assert tiny_model.network_evaluations == 0


def test_another_suv_normalisation_is_refused(tiny_model, small_phantom):
    """Lean-body-mass SUV is ~20-30 % lower than the body-weight SUV the model learned: not silently accepted."""
    lbm = small_phantom.with_voxels(small_phantom.voxels * 0.75, units="SUVlbm")
    with pytest.raises(VolumeError, match="SUVlbm, a different SUV normalisation"):
        tiny_model.run(lbm)
    assert tiny_model.network_evaluations == 0


def test_pet_without_metadata_is_accepted(tiny_model, pet_slab):
    """Unknown modality/units but PET-like values: analysed (the check must not be over-eager)."""
    plain = pet_slab.with_voxels(pet_slab.voxels, modality=None, units=None)
    result = tiny_model.run(plain, steps=1)
    assert result.network_evaluations > 0 and result.heatmap.voxels.max() > 0
    # the metadata only gates the input: the labelled volume is the same case (served from the cache)
    labelled = tiny_model.run(pet_slab, steps=1)
    assert labelled.network_evaluations == 0
    np.testing.assert_array_equal(result.heatmap.voxels, labelled.heatmap.voxels)


@pytest.mark.parametrize("kwargs, message", [
    ({"noise_level": 0}, "noise level"),
    ({"noise_level": 1000}, "noise level"),
    ({"guidance_scale": -1.0}, "guidance scale"),
])
def test_bad_parameters_are_refused(tiny_model, small_phantom, kwargs, message):
    with pytest.raises(ValueError, match=message):
        tiny_model.run(small_phantom, **kwargs)
    assert tiny_model.network_evaluations == 0


def test_invalid_volume_is_refused_before_the_network(tiny_model, small_phantom):
    voxels = small_phantom.voxels.copy()
    voxels[3, 4, 5] = np.nan
    with pytest.raises(VolumeError, match="NaN"):
        tiny_model.run(small_phantom.with_voxels(voxels))
    assert tiny_model.network_evaluations == 0


@pytest.mark.parametrize("direction", [np.diag([-1.0, -1.0, 1.0]), np.diag([1.0, 1.0, -1.0])])
def test_region_slices_cover_the_region_along_the_body_axis(direction):
    """The model slices an organ region needs: its S extent plus one slice each side, whichever way k runs."""
    from DiffusionAnomalyLib.methods.base import region_slices
    from DiffusionAnomalyLib.preprocessing import model_grid
    from DiffusionAnomalyLib.volume import Volume, ijk_to_ras_matrix

    vol = Volume(np.zeros((50, 8, 8), np.float32), ijk_to_ras_matrix((4.0, 4.0, 3.0), (0.0, 0.0, 0.0), direction))
    grid = model_grid(vol, {"spacing_mm": [4.0, 4.0, 6.0], "in_plane_size": [8, 8]})
    region = np.zeros(vol.voxels.shape, bool)
    region[20:26] = True
    s = vol.ijk_to_ras_points([[0, 0, 19.5], [0, 0, 25.5]])[:, 2]
    todo = region_slices(region, vol, grid)
    z = grid.origin[2] + todo * grid.spacing[2]
    assert np.array_equal(todo, np.arange(todo[0], todo[-1] + 1))  # contiguous
    assert z[0] <= s.min() < z[1] and z[-2] < s.max() <= z[-1]  # the first and last slice bracket the region
    assert np.array_equal(region_slices(None, vol, grid), np.arange(grid.size[2]))
    with pytest.raises(ValueError, match="the region to analyse is empty"):
        region_slices(np.zeros_like(region), vol, grid)
