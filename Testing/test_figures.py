"""The figures (DiffusionAnomalyLib.figures): radiological display whatever the storage order, the same pixels for
RAS-, LPS- and permuted-stored copies of one case, colour-blind-safe lesion colours, colour bars."""

from __future__ import annotations

import io
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from conftest import REAL_CT, needs_real_ct
from DiffusionAnomalyLib.export import LESION_PALETTE, lesion_colors
from DiffusionAnomalyLib.figures import (OKABE_ITO, PREDICTED_COLOUR, TRUTH_COLOUR, CaseFigures, _nice_ticks,
                                         _outline, _tick_text, _View, display_orientation, inferno_rgb, overview_png)
from DiffusionAnomalyLib.volume import Volume


def pixels(png: bytes | str) -> np.ndarray:
    """RGB pixels of a PNG (bytes or a path)."""
    with Image.open(io.BytesIO(png) if isinstance(png, bytes) else png) as im:
        return np.asarray(im.convert("RGB"))


def restored(volume: Volume, flips: tuple[bool, bool, bool] = (False, False, False),
             order: tuple[int, int, int] = (0, 1, 2)) -> tuple[Volume, callable]:
    """The same image stored another way: numpy axes [k, j, i] permuted by ``order`` (new axis t = old axis
    order[t]) and reversed where ``flips``; the IJK->RAS matrix changed to match, so every voxel keeps its place in
    the patient. Returns the volume and the function turning any [k, j, i] array of the grid the same way."""
    m = volume.ijk_to_ras
    shape = volume.voxels.shape

    def turn(arr):
        out = np.transpose(arr, order)
        return np.ascontiguousarray(out[tuple(slice(None, None, -1) if f else slice(None) for f in flips)])

    new = np.eye(4)
    new[:3, 3] = m[:3, 3]
    for t in range(3):  # new numpy axis t is ITK axis 2 - t; it walks old numpy axis order[t]
        old_itk = 2 - order[t]
        column = m[:3, old_itk].copy()
        if flips[t]:
            new[:3, 3] += column * (shape[order[t]] - 1)
            column = -column
        new[:3, 2 - t] = column
    return Volume(turn(volume.voxels), new, modality=volume.modality, units=volume.units), turn


@pytest.fixture(scope="module")
def case(small_phantom_case):
    pet = small_phantom_case.pet
    labels = small_phantom_case.lesion_labels.voxels.astype(np.int32)
    heat = pet.with_voxels((labels > 0).astype(np.float32) * 2.0 + 0.05, units="|SUVbw difference|")
    return pet, heat, labels


def test_storage_orders_map_to_the_radiological_frame():
    straight = display_orientation(np.diag([-2.0, -2.0, 3.0, 1.0]))  # LPS-stored (DICOM axial)
    assert straight.order == (0, 1, 2) and straight.flip == (False, False, False) and straight.stored == "LPS"
    assert straight.spacing == (3.0, 2.0, 2.0) and not straight.oblique
    ras = display_orientation(np.diag([2.0, 2.0, 3.0, 1.0]))  # NIfTI-style RAS: mirrored and upside down as stored
    assert ras.order == (0, 1, 2) and ras.flip == (False, True, True) and ras.stored == "RAS"
    # sagittal storage: i anterior-to-posterior, j superior-to-inferior, k right-to-left
    m = np.zeros((4, 4))
    m[:3, 0], m[:3, 1], m[:3, 2], m[3, 3] = (0, -1.0, 0), (0, 0, -2.0), (-4.0, 0, 0), 1
    sag = display_orientation(m)
    assert sag.stored == "PIL" and sag.spacing == (2.0, 1.0, 4.0)
    arr = np.arange(5 * 6 * 7).reshape(5, 6, 7)  # [k, j, i]
    shown = sag.apply(arr)
    assert shown.shape == (6, 7, 5)  # [S, P, L] = [j, i, k]
    assert shown[0, 0, 0] == arr[0, 5, 0]  # most inferior (last j), most anterior (first i), rightmost (first k)
    assert sag.stored_index((0, 0, 0), arr.shape) == (0, 5, 0)
    assert sag.index((0, 5, 0), arr.shape) == (0, 0, 0)
    assert "stored PIL" in sag.words() and "oblique" not in sag.words()
    with pytest.raises(ValueError, match="degenerate"):
        display_orientation(np.diag([1.0, 0.0, 1.0, 1.0]))


def test_an_oblique_grid_is_said_to_be_shown_on_the_nearest_axes(oblique_pet):
    o = display_orientation(oblique_pet.ijk_to_ras)
    assert o.oblique and 5.0 < o.oblique_degrees < 25.0
    assert "oblique" in o.words() and "nearest patient axes without resampling" in o.words()


def test_patient_right_is_on_the_left_and_anterior_up():
    """A bright voxel at the patient's right, anterior, superior corner lands at display [S high, P low, L low]
    for every storage order."""
    arr = np.zeros((6, 7, 8), np.float32)
    lps = Volume(arr, np.diag([-1.0, -1.0, 1.0, 1.0]))  # i -> L, j -> P, k -> S
    arr[5, 0, 0] = 1.0  # k last (superior), j first (anterior), i first (right)
    for flips in [(False, False, False), (True, True, True), (False, True, True)]:
        for order in [(0, 1, 2), (2, 0, 1), (1, 2, 0)]:
            vol, _ = restored(lps, flips, order)
            o = display_orientation(vol.ijk_to_ras)
            shown = o.apply(vol.voxels)
            assert shown.shape == (6, 7, 8)
            assert np.unravel_index(shown.argmax(), shown.shape) == (5, 0, 0), (flips, order)


def test_ras_lps_and_permuted_copies_draw_the_same_pixels(case):
    pet, heat, labels = case
    colours = dict(zip([1, 2], lesion_colors(2)))
    drawn = []
    for flips, order in [((False, False, False), (0, 1, 2)), ((False, True, True), (0, 1, 2)),
                         ((True, False, True), (1, 0, 2))]:
        vol, turn = restored(pet, flips, order)
        hot = Volume(turn(heat.voxels), vol.ijk_to_ras, units=heat.units)
        figs = CaseFigures(vol, hot, turn(labels), colours, cut_off=1.0, image_units="SUVbw",
                           heat_units=heat.units)
        drawn.append([pixels(figs.coronal())] + [pixels(figs.key_image(n)) for n in (1, 2)])
        # the hottest voxel is one place in the patient whatever the storage
        kji = figs.stored_index(figs.hottest(1))
        assert labels.shape and turn(labels)[kji] == 1
    for other in drawn[1:]:
        for a, b in zip(drawn[0], other):
            assert a.shape == b.shape and np.array_equal(a, b)


def test_the_overview_is_radiological_for_any_storage(case, tmp_path):
    pet, heat, labels = case
    truth = (labels > 0).astype(np.int16)
    images = []
    for n, flips in enumerate([(False, False, False), (False, True, True)]):
        vol, turn = restored(pet, flips)
        path = overview_png(tmp_path / f"o{n}.png", vol.voxels, None, turn(heat.voxels), turn(labels), turn(truth),
                            ijk_to_ras=vol.ijk_to_ras, image_units="SUVbw", heat_units="|SUVbw difference|")
        images.append(pixels(str(path)))
    assert np.array_equal(images[0], images[1])
    # predicted (blue, solid) and truth (vermillion, dashed) are both drawn, and there is no red or green
    rgb = images[0].astype(int)
    for colour in (PREDICTED_COLOUR, TRUTH_COLOUR):
        target = np.array([int(colour[i:i + 2], 16) for i in (1, 3, 5)])
        assert (np.abs(rgb - target).max(axis=-1) <= 12).sum() > 10, colour
    # stored as is, without the matrix, the RAS copy comes out mirrored: the matrix is what makes it right
    vol, turn = restored(pet, (False, True, True))
    plain = overview_png(tmp_path / "plain.png", vol.voxels, None, turn(heat.voxels), turn(labels), turn(truth))
    assert not np.array_equal(pixels(str(plain)), images[0])


def test_lesion_colours_are_colour_blind_safe_and_match_the_figures():
    first = lesion_colors(7)
    okabe = [tuple(round(int(h[i:i + 2], 16) / 255, 4) for i in (1, 3, 5)) for h in OKABE_ITO[:7]]
    assert first == okabe  # Okabe-Ito without black, in its order
    assert len(set(LESION_PALETTE)) == len(LESION_PALETTE) == 15
    for r, g, b in LESION_PALETTE:  # no pure red or pure green
        assert not (r > 0.8 and g < 0.3 and b < 0.3) and not (g > 0.7 and r < 0.3 and b < 0.3)
    assert len(set(lesion_colors(200))) == 200


def test_each_candidate_is_drawn_in_its_segment_colour_with_a_colour_bar(case):
    pet, heat, labels = case
    colours = dict(zip([1, 2], lesion_colors(2)))
    figs = CaseFigures(pet, heat, labels, colours, cut_off=1.0, image_units="SUVbw", heat_units="|SUVbw difference|")
    for n in (1, 2):
        rgb = pixels(figs.key_image(n)).astype(int)
        own = np.round(np.array(colours[n]) * 255)
        assert (np.abs(rgb - own).max(axis=-1) <= 12).sum() > 20, n
    mip = pixels(figs.coronal()).astype(int)
    for n in (1, 2):
        assert (np.abs(mip - np.round(np.array(colours[n]) * 255)).max(axis=-1) <= 12).sum() > 5, n
    cut = np.array([int(OKABE_ITO[4][i:i + 2], 16) for i in (1, 3, 5)])  # the cut-off line on the heat colour bar
    assert (np.abs(mip - cut).max(axis=-1) <= 12).sum() > 5
    with pytest.raises(ValueError, match="does not cross"):
        figs.key_image(1, at=(0, 0, 0))


def test_the_report_figures_need_no_matplotlib():
    """The report is rewritten at every threshold change: its figures must not pay matplotlib's import."""
    code = """
import sys
import numpy as np
from DiffusionAnomalyLib.figures import CaseFigures
from DiffusionAnomalyLib.volume import Volume
m = np.diag([-2.0, -2.0, 3.0, 1.0])
image = np.zeros((20, 30, 30), np.float32)
image[8:12, 10:14, 12:16] = 5.0
labels = (image > 0).astype(np.int32)
figures = CaseFigures(Volume(image, m), Volume(image * 0.5, m), labels, {1: (0.0, 0.45, 0.7)}, cut_off=1.0,
                      image_units="SUVbw", heat_units="heat")
assert figures.coronal().startswith(b"\\x89PNG") and figures.key_image(1).startswith(b"\\x89PNG")
print(sorted(name for name in sys.modules if name.split(".")[0] == "matplotlib"))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_the_inferno_table_is_matplotlibs():
    matplotlib = pytest.importorskip("matplotlib")
    table = inferno_rgb()
    assert table.shape == (256, 3) and table.dtype == np.uint8 and not table.flags.writeable
    assert np.array_equal(table, matplotlib.colormaps["inferno"](np.linspace(0, 1, 256), bytes=True)[:, :3])


@pytest.mark.parametrize("low, high", [(0.0, 1.0), (0.0, 3.87), (0.0, 9.6), (-160.0, 240.0), (0.0, 37.83),
                                       (0.0, 0.0123), (2.0, 2.5), (0.0, 25000.0), (-1.0, 1.0), (0.3, 0.31)])
def test_colour_bar_ticks_are_nice_values_inside_the_bar(low, high):
    ticks, decimals = _nice_ticks(low, high)
    assert 2 <= len(ticks) <= 8
    assert all(low <= t <= high for t in ticks)
    steps = np.diff(ticks)
    assert np.allclose(steps, steps[0], rtol=1e-9)
    mantissa = steps[0] / 10.0 ** np.floor(np.log10(steps[0]))
    assert any(np.isclose(mantissa, m) for m in (1.0, 2.0, 2.5, 5.0)), steps[0]
    assert all(np.isclose(t / steps[0], round(t / steps[0])) for t in ticks)  # multiples of the step
    texts = [_tick_text(t, decimals) for t in ticks]
    assert len(set(texts)) == len(texts) and all(np.isclose(float(x), t) for x, t in zip(texts, ticks))
    assert "-0" not in texts and "-0.0" not in texts


def test_outlines_follow_the_voxel_edges():
    """A 3 x 3 voxel candidate shown at 5 pixels a voxel: a 2-pixel line straddling its edges (pixels 15 and 30),
    one dark pixel on each side, nothing else painted."""
    mask = np.zeros((10, 10), bool)
    mask[3:6, 3:6] = True
    view = _View(mask.shape, (50, 50), (0, 10), (0, 10))
    canvas = view.pixels(np.zeros(mask.shape, np.uint8), np.full((256, 3), 200, np.uint8))
    _outline(canvas, view.window(mask, (0, 0)), (0, 114, 178), 1)
    coloured = (canvas == (0, 114, 178)).all(axis=-1)
    dark = (canvas == (26, 26, 26)).all(axis=-1)
    square = np.zeros((50, 50), bool)
    square[15:30, 15:30] = True

    def ring(outside: int, inside: int) -> np.ndarray:
        grown, shrunk = np.zeros_like(square), np.zeros_like(square)
        grown[15 - outside:30 + outside, 15 - outside:30 + outside] = True
        shrunk[15 + inside:30 - inside, 15 + inside:30 - inside] = True
        return grown & ~shrunk

    assert np.array_equal(coloured, ring(1, 1))
    assert np.array_equal(dark, ring(2, 2) & ~ring(1, 1))
    assert ((canvas == 200).all(axis=-1) | coloured | dark).all()


@needs_real_ct
@pytest.mark.parametrize("image, organs", [("ct_abdomen_3mm.nii.gz", "ct_abdomen_3mm_totalseg.nii.gz"),
                                           ("ct_dicom", "ct_dicom_totalseg.nii.gz")])
def test_real_ct_reads_radiologically_from_both_storage_orders(image, organs):
    """The NIfTI is stored RAS, the DICOM series LPS: in both displays the liver (patient right) is on the image's
    left, the aorta in between, the spleen on the right, and the spleen below (posterior to) the aorta."""
    from DiffusionAnomalyLib.roi import read_organ_labels
    from DiffusionAnomalyLib.volume import read_volume

    volume = read_volume(REAL_CT / image)
    o = display_orientation(volume.ijk_to_ras)
    labels = read_organ_labels(REAL_CT / organs).on_grid(volume)

    def centre(name):
        shown = o.apply(labels.mask(name))
        assert shown.any(), name
        return np.array(np.nonzero(shown)).mean(axis=1)

    liver, aorta, spleen = centre("liver"), centre("aorta"), centre("spleen")
    assert liver[2] < aorta[2] < spleen[2]
    assert aorta[1] < spleen[1]
    assert o.stored == ("RAS" if image.endswith(".nii.gz") else "LPS")
