"""The report as a reader sees it: the HTML rendered by a headless Chromium to a picture that shows the notice, the
figures and each candidate's segment colour; the PDF print has pages."""

from __future__ import annotations

import re

import numpy as np
import pytest
from PIL import Image

from DiffusionAnomalyLib.export import lesion_colors
from DiffusionAnomalyLib.report import find_chromium, render_png, write_report
from test_report import DICOM_META, pet_case

pytestmark = pytest.mark.skipif(find_chromium() is None,
                                reason="no chromium / google-chrome on PATH to render the report with")


def near(rgb: np.ndarray, colour, tolerance: int = 10) -> int:
    """How many pixels lie within ``tolerance`` (per channel, 0-255) of ``colour`` (RGB in [0, 1] or 0-255)."""
    target = np.asarray(colour, dtype=float)
    target = np.round(target * 255) if target.max() <= 1.0 else target
    return int((np.abs(rgb.astype(int) - target.astype(int)).max(axis=-1) <= tolerance).sum())


@pytest.fixture(scope="module")
def rendered(small_phantom_case, tiny_card, tmp_path_factory):
    folder = tmp_path_factory.mktemp("rendered")
    pet = small_phantom_case.pet.with_voxels(small_phantom_case.pet.voxels)
    pet.meta.update({k: v for k, v in DICOM_META.items() if k != "patient_name"})
    case = pet_case(pet, small_phantom_case.lesion_labels.voxels, tiny_card, organs=small_phantom_case.organs)
    said = []
    html = write_report(folder / "report.html", case, subject="PSN-7", say=said.append)
    png = render_png(html, folder / "report.png", width=1000, height=4200)
    with Image.open(png) as im:
        pixels = np.asarray(im.convert("RGB"))
    return case, folder, pixels, said


def test_the_rendered_report_is_not_blank_and_shows_its_parts(rendered):
    case, _, pixels, said = rendered
    assert not said  # the PDF was written too
    assert pixels.shape[:2] == (4200, 1000)
    ink = (pixels.min(axis=-1) < 200).mean(axis=1)  # share of dark pixels per row
    assert (ink > 0.01).sum() > 1000  # text, tables and figures down the page, not an empty window
    assert near(pixels, (0xBB, 0x00, 0x00), 25) > 500  # the notice's red frame (and its text)
    for rgb in lesion_colors(len(case.table)):  # each candidate's segment colour: swatches, contours and ids
        assert near(pixels, rgb) > 50, rgb
    top = pixels[:150]
    assert near(top, (0x22, 0x22, 0x22), 30) > 200  # the title is at the top


def test_the_pdf_has_pages(rendered):
    _, folder, _, _ = rendered
    pdf = (folder / "report.pdf").read_bytes()
    assert pdf.startswith(b"%PDF")
    pages = len(re.findall(rb"/Type\s*/Page\b", pdf))
    assert 2 <= pages <= 8, pages
