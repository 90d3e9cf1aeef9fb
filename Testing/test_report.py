"""The report (DiffusionAnomalyLib.report): content, embedded figures, identity and provenance, escaping, the same
figures whatever the storage order, PDF through Chromium or an HTML-only report said in one line, speed."""

from __future__ import annotations

import base64
import io
import re
import time

import numpy as np
import pytest
from scipy import ndimage as ndi

from DiffusionAnomalyLib import report as report_module
from DiffusionAnomalyLib.card import NOT_FOR_CLINICAL_USE
from DiffusionAnomalyLib.export import format_number, lesion_colors
from DiffusionAnomalyLib.files import OutputError
from DiffusionAnomalyLib.measurements import MTV_RULES, definitions, lesion_columns
from DiffusionAnomalyLib.pipeline import CaseResult
from DiffusionAnomalyLib.postprocessing import Thresholding
from DiffusionAnomalyLib.report import find_chromium, render_pdf, report_html, write_report
from DiffusionAnomalyLib.version import software
from DiffusionAnomalyLib.volume import Volume

needs_chromium = pytest.mark.skipif(find_chromium() is None, reason="no chromium / google-chrome on PATH")

#: what a DICOM PET read by volume.read_volume records (helper "dicom"'s keys)
DICOM_META = {
    "format": "dicom", "series_description": "PET WB <AC>", "series_instance_uid": "1.2.826.0.1.3680043.2.1125.7",
    "study_date": "2024-03-05", "study_description": "PET-CT whole body", "files": [f"f{i}.dcm" for i in range(60)],
    "suv_provenance": {"weight_kg": 72.0, "injected_dose_bq": 3.1e8, "decay_correction": "START",
                       "half_life_s": 6586.2, "injection_time": "2024-03-05T09:01:00",
                       "reference_time": "2024-03-05T10:02:11", "factor": 0.000241, "source": "DICOM tags"},
    "patient_name": "Doe^Jane",  # were a reader to copy it, the report must still not show it
}


def pet_case(pet: Volume, lesion_labels: np.ndarray, card: dict, organs=None, counterfactual=None,
             parameters=None, value: float = 0.5, min_size_ml: float = 0.0, blur: float = 0.0) -> CaseResult:
    """A case as the pipeline makes it: a heat map that is the lesions (smoothed by ``blur`` voxels), thresholded at
    ``value`` of its maximum."""
    heat = ndi.gaussian_filter((lesion_labels > 0).astype(np.float32), blur) * 2.5 + 0.01
    heat = pet.with_voxels(heat.astype(np.float32), units="|SUVbw difference|")
    return CaseResult(volume=pet, heatmap=heat, counterfactual=counterfactual, card=card,
                      parameters=parameters or {}, thresholding=Thresholding("fraction", value, min_size_ml),
                      organs=organs, method_name=card["method"]).threshold()


def embedded_pngs(text: str) -> list[np.ndarray]:
    from PIL import Image

    out = []
    for data in re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', text):
        with Image.open(io.BytesIO(base64.b64decode(data))) as im:
            assert im.format == "PNG"
            out.append(np.asarray(im.convert("RGB")))
    return out


@pytest.fixture(scope="module")
def phantom(small_phantom_case):
    pet = small_phantom_case.pet.with_voxels(small_phantom_case.pet.voxels)
    pet.meta.update(DICOM_META)
    return pet, small_phantom_case.lesion_labels.voxels, small_phantom_case.organs


def _card(tiny_card):
    card = dict(tiny_card)
    card["provenance"] = {**tiny_card["provenance"], "training_data": "synthetic phantoms <b>only</b>"}
    return card


def test_report_holds_everything(phantom, tiny_card, tmp_path):
    pet, labels, organs = phantom
    result = pet_case(pet, labels, _card(tiny_card), organs=organs, counterfactual=pet,
                      parameters={"noise_level": 50, "guidance_scale": 3.0, "steps": 3})
    table = result.table
    assert len(table) >= 2
    path = write_report(tmp_path / "report.html", result, title="Case <1>", parameters={"roi": "whole"},
                        subject="PSN-0042 <x>", pdf=False)
    text = path.read_text(encoding="utf-8")
    assert text.count(NOT_FOR_CLINICAL_USE) == 2
    assert "<title>Case &lt;1&gt;</title>" in text  # escaped
    assert "synthetic phantoms &lt;b&gt;only&lt;/b&gt;" in text and "<b>only</b>" not in text
    # identity: series, UID, study, subject; nothing identifying
    for needle in ("PET WB &lt;AC&gt;", DICOM_META["series_instance_uid"], "2024-03-05", "PET-CT whole body",
                   "PSN-0042 &lt;x&gt;", "DICOM series of 60 files", "PET (PT)"):
        assert needle in text, needle
    assert "Doe" not in text and "Jane" not in text
    # SUV provenance with units
    for needle in ("DICOM tags", "72 kg", "310 MBq", "START", "6586.2 s (109.8 min)", "2024-03-05T09:01:00",
                   "2024-03-05T10:02:11", "0.000241 (SUVbw per Bq/ml)"):
        assert needle in text, needle
    # software, thresholding in words with the absolute cut-off, MTV rule
    assert software() in text
    assert result.applied_threshold is not None
    words = result.thresholding.words(result.heat_units, result.applied_threshold)
    assert words.replace("|", "|") in text.replace("&#x27;", "'") and f"{result.applied_threshold:.4g} |SUVbw" in text
    assert MTV_RULES[result.mtv_rule] in text.replace("&#x27;", "'")
    # the table: every row as lesions.csv formats it, headings with units, the definitions, totals, reference region
    columns = lesion_columns(pet.modality, pet.units, table, heat_units=result.heat_units, mtv_rule=result.mtv_rule)
    for row in table:
        for name in ("suv_max", "suv_peak", "mtv_ml", "tlg", "centroid_s"):
            assert f'<td class="num">{format_number(row[name])}</td>' in text, name
    for c in columns:
        assert f"<th>{c.heading.replace('|', '|')}</th>" in text
    for heading, sentence in definitions(columns):
        assert sentence.replace("'", "&#x27;") in text, heading
    for label, _, _ in result.totals:
        assert f"<th>{label}</th>" in text
    ref = result.reference
    assert ref is not None and f"{ref['label']} {format_number(ref['mean'])}" in text
    # each candidate's id beside a swatch of its Slicer segment colour, in the table and the key image caption
    for n, rgb in zip((r["id"] for r in table), lesion_colors(len(table))):
        swatch = "#" + "".join(f"{round(255 * c):02x}" for c in rgb)
        assert text.count(f"background:{swatch}") == 2
        assert f"<b>Candidate {n}</b>" in text
    for needle in ("noise_level", "guidance_scale", "threshold_method", "min_size_ml", "roi", tiny_card["id"],
                   "Spacing (mm)", "Voxels stored LPS", "radiological convention"):
        assert needle in text, needle
    images = embedded_pngs(text)
    assert len(images) == 1 + len(table)  # the coronal MIP, one key image per candidate
    assert all(im.shape[0] > 200 and im.shape[1] > 400 for im in images)
    assert not list(tmp_path.glob(".*partial")) and not (tmp_path / "report.pdf").exists()


def test_blank_subject_no_dicom_and_no_organ_map(phantom, tiny_card):
    pet, labels, _ = phantom
    nifti = Volume(pet.voxels, pet.ijk_to_ras, modality="PT", units="SUVbw")
    text = report_html(pet_case(nifti, labels, tiny_card))
    assert '<span class="fill"' in text  # a line to write the pseudonym on
    for row in ("Series description", "Series instance UID", "Study date"):
        assert f"<th>{row}</th><td>not recorded in the input</td>" in text
    assert "how the voxels came to be in SUVbw is not recorded" in text
    assert "Reference region</b>: none (no organ map was given)" in text


def test_no_lesions_and_bad_inputs(phantom, tiny_card, tmp_path):
    pet, labels, _ = phantom
    empty = pet_case(pet, labels, tiny_card)
    empty.heatmap = empty.heatmap.with_voxels(np.zeros_like(empty.heatmap.voxels))
    text = report_html(empty.threshold())
    assert "No lesion candidates above the threshold." in text and NOT_FOR_CLINICAL_USE in text
    assert "No candidates, no key images." in text and len(embedded_pngs(text)) == 1
    bad = pet_case(pet, labels, tiny_card)
    bad.labels = bad.labels[:-1]
    with pytest.raises(ValueError, match="one grid"):
        report_html(bad)
    with pytest.raises(OutputError, match="does not exist"):
        write_report(tmp_path / "missing" / "r.html", pet_case(pet, labels, tiny_card), pdf=False)


def test_the_key_images_stop_at_the_limit(phantom, tiny_card):
    pet, labels, _ = phantom
    text = report_html(pet_case(pet, labels, tiny_card), max_key_images=1)
    assert len(embedded_pngs(text)) == 2 and "1 more candidates have no key image" in text


def test_an_oblique_grid_is_said_so(oblique_pet, small_phantom_case, tiny_card):
    text = report_html(pet_case(oblique_pet, small_phantom_case.lesion_labels.voxels, tiny_card))
    assert "The grid is oblique" in text and "nearest patient axes without resampling" in text


def test_ras_and_lps_stored_copies_give_the_same_figures(phantom, tiny_card):
    """The same case stored as DICOM orders it (LPS) and as NIfTI usually does (RAS: i and j reversed) makes the
    same pictures, pixel for pixel, and the same table."""
    pet, labels, organs = phantom
    flip = np.diag([-1.0, -1.0, 1.0, 1.0])
    flip[:2, 3] = [pet.voxels.shape[2] - 1, pet.voxels.shape[1] - 1]
    ras = Volume(np.ascontiguousarray(pet.voxels[:, ::-1, ::-1]), pet.ijk_to_ras @ flip, modality="PT",
                 units="SUVbw", meta=dict(pet.meta))
    assert np.allclose(ras.ijk_to_ras_points([[0, 0, 0]]), pet.ijk_to_ras_points([[pet.voxels.shape[2] - 1,
                                                                                    pet.voxels.shape[1] - 1, 0]]))
    cases = [pet_case(pet, labels, tiny_card, organs=organs),
             pet_case(ras, np.ascontiguousarray(labels[:, ::-1, ::-1]), tiny_card, organs=organs)]
    texts = [report_html(c) for c in cases]
    assert "Voxels stored LPS" in texts[0] and "Voxels stored RAS" in texts[1]
    a, b = (embedded_pngs(t) for t in texts)
    assert len(a) == len(b) == 1 + len(cases[0].table)
    for x, y in zip(a, b):
        assert x.shape == y.shape and np.array_equal(x, y)


def test_ct_report_uses_hu_and_max_heat(tiny_card):
    from DiffusionAnomalyLib.volume import ijk_to_ras_matrix

    rng = np.random.default_rng(0)
    ct = Volume((rng.normal(40, 10, (20, 40, 40))).astype(np.float32), ijk_to_ras_matrix((2.0, 2.0, 3.0), (0, 0, 0)),
                modality="CT", units="HU")
    labels = np.zeros(ct.voxels.shape, np.int32)
    labels[8:12, 10:16, 12:18] = 1
    text = report_html(pet_case(ct, labels, {**tiny_card, "modality": "CT"}))
    assert "HU mean (HU)" in text and "SUV provenance" not in text and "MTV rule" not in text and "SUVmax" not in text
    assert "axial slice through its maximum heat" in text and "Reference region" not in text
    assert "the coronal CT slice through candidate 1" in text  # a projection of a CT would show bone only


def test_without_a_browser_the_html_is_the_report_said_in_one_line(phantom, tiny_card, tmp_path, monkeypatch):
    pet, labels, _ = phantom
    case = pet_case(pet, labels, tiny_card)
    (tmp_path / "report.pdf").write_bytes(b"%PDF-1.4 an older report")
    monkeypatch.setattr(report_module, "find_chromium", lambda: None)
    said = []
    path = write_report(tmp_path / "report.html", case, say=said.append)
    assert path.is_file() and not (tmp_path / "report.pdf").exists()
    assert len(said) == 1 and "\n" not in said[0]
    assert "no Chromium or Google Chrome found" in said[0] and "older report.pdf was removed" in said[0]


def test_a_browser_that_hangs_is_stopped(tmp_path):
    html = tmp_path / "r.html"
    html.write_text("<p>x</p>")
    slow = tmp_path / "fake-chromium"
    slow.write_text("#!/bin/sh\nsleep 30\n")
    slow.chmod(0o755)
    t0 = time.perf_counter()
    with pytest.raises(OutputError, match="did not finish within 0.5 s"):
        render_pdf(html, tmp_path / "r.pdf", timeout=0.5, binary=str(slow))
    assert time.perf_counter() - t0 < 10 and not (tmp_path / "r.pdf").exists()
    failing = tmp_path / "failing-chromium"
    failing.write_text("#!/bin/sh\necho 'cannot open display' >&2\nexit 3\n")
    failing.chmod(0o755)
    with pytest.raises(OutputError, match=r"the browser failed \(cannot open display\)"):
        render_pdf(html, tmp_path / "r.pdf", binary=str(failing))
    assert not list(tmp_path.glob(".*partial*"))


@needs_chromium
def test_the_pdf_is_written_beside_the_html(phantom, tiny_card, tmp_path):
    pet, labels, organs = phantom
    said = []
    path = write_report(tmp_path / "report.html", pet_case(pet, labels, tiny_card, organs=organs), say=said.append)
    pdf = (tmp_path / "report.pdf").read_bytes()
    assert path.is_file() and pdf.startswith(b"%PDF") and len(pdf) > 20_000 and not said
    assert not list(tmp_path.glob(".*partial*"))


@pytest.fixture(scope="module")
def demo_sized(tiny_card):
    """A demo-sized PET (128 x 128 x 200 voxels of 3 x 3 x 3.6 mm) with five candidates and its organ map."""
    from DiffusionAnomalyLib.phantoms import make_phantom

    c = make_phantom(seed=4, n_lesions=5, shape_ijk=(128, 128, 200), spacing=(3.0, 3.0, 3.6))
    c.pet.meta.update(DICOM_META)
    return pet_case(c.pet, c.lesion_labels.voxels, tiny_card, organs=c.organs, value=0.3, min_size_ml=0.1,
                    blur=1.0)


def test_the_demo_sized_report_is_fast(demo_sized):
    assert 3 <= len(demo_sized.table) <= 5
    report_html(demo_sized)  # the first draws load Pillow and its font
    seconds = min(_timed(lambda: report_html(demo_sized)) for _ in range(2))
    assert seconds < 1.0, f"report_html took {seconds:.2f} s"


def _timed(work) -> float:
    t0 = time.perf_counter()
    work()
    return time.perf_counter() - t0
