"""The HTML report (DiffusionAnomalyLib.report): content, embedded figure, escaping, atomic write."""

from __future__ import annotations

import base64
import io
import re

import numpy as np
import pytest

from DiffusionAnomalyLib.card import NOT_FOR_CLINICAL_USE
from DiffusionAnomalyLib.export import format_number
from DiffusionAnomalyLib.files import OutputError
from DiffusionAnomalyLib.pipeline import CaseResult
from DiffusionAnomalyLib.postprocessing import Thresholding
from DiffusionAnomalyLib.report import report_html, write_report


@pytest.fixture(scope="module")
def case(small_phantom_case):
    pet = small_phantom_case.pet
    heat = pet.with_voxels((small_phantom_case.lesion_labels.voxels > 0).astype(np.float32) * 2.0 + 0.01,
                           units="|SUV difference|")
    return pet, heat


def _case(pet, heat, card, counterfactual=None, parameters=None) -> CaseResult:
    """A case as the pipeline would make it, thresholded at half the map maximum."""
    return CaseResult(volume=pet, heatmap=heat, counterfactual=counterfactual, card=card,
                      parameters=parameters or {}, thresholding=Thresholding("fraction", 0.5, 0.0)).threshold()


def _card(tiny_card, **changes):
    card = {**tiny_card, **changes}
    card["provenance"] = {**tiny_card["provenance"], "training_data": "synthetic phantoms <b>only</b>"}
    return card


def test_report_holds_everything(case, tiny_card, tmp_path):
    pet, heat = case
    result = _case(pet, heat, _card(tiny_card), counterfactual=pet,
                   parameters={"noise_level": 50, "guidance_scale": 3.0, "steps": 3})
    table = result.table
    assert len(table) >= 2
    path = write_report(tmp_path / "report.html", result, title="Case <1>", parameters={"roi": "whole"})
    text = path.read_text(encoding="utf-8")
    assert text.count(NOT_FOR_CLINICAL_USE) == 2
    assert "<title>Case &lt;1&gt;</title>" in text  # escaped
    assert "synthetic phantoms &lt;b&gt;only&lt;/b&gt;" in text and "<b>only</b>" not in text
    for row in table:  # every lesion row, formatted like lesions.csv
        assert f'<td class="num">{format_number(row["suv_max"])}</td>' in text
        assert f'<td class="num">{format_number(row["centroid_s"])}</td>' in text
    assert "Lesion candidates (%d)" % len(table) in text
    for needle in ("noise_level", "guidance_scale", "threshold_method", "min_size_ml", "roi", tiny_card["id"],
                   "Spacing (mm)"):
        assert needle in text
    pngs = re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', text)
    assert len(pngs) == 1
    from PIL import Image

    with Image.open(io.BytesIO(base64.b64decode(pngs[0]))) as im:
        assert im.format == "PNG" and im.size[0] > 300 and im.size[1] > 300
    assert not list(tmp_path.glob(".*partial"))


def test_no_lesions_and_bad_inputs(case, tiny_card, tmp_path):
    pet, heat = case
    empty = _case(pet, heat.with_voxels(np.zeros_like(heat.voxels)), _card(tiny_card))
    text = report_html(empty)
    assert "No lesion candidates above the threshold." in text and NOT_FOR_CLINICAL_USE in text
    bad = _case(pet, heat, tiny_card)
    bad.labels = bad.labels[:-1]
    with pytest.raises(ValueError, match="one grid"):
        report_html(bad)
    with pytest.raises(OutputError, match="does not exist"):
        write_report(tmp_path / "missing" / "r.html", _case(pet, heat, tiny_card))
