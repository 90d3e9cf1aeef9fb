"""The worker process protocol (DiffusionAnomalyLib.worker): in-process serve() and a real subprocess
driven by the Slicer module's client (DiffusionAnomalyModuleLib.process.WorkerClient)."""

from __future__ import annotations

import io
import json
import time

import numpy as np
import pytest

from DiffusionAnomalyLib.volume import Volume, read_volume, write_volume
from DiffusionAnomalyLib.worker import Channel, Worker, serve


from DiffusionAnomalyModuleLib.process import WorkerClient  # noqa: E402


@pytest.fixture(scope="module")
def worker(tiny_checkpoint):
    return Worker(tiny_checkpoint, device="cpu")


@pytest.fixture()
def slab_file(tmp_path, pet_slab):
    return write_volume(pet_slab, tmp_path / "input.nrrd")


def _serve(worker, requests):
    out = io.StringIO()
    lines = "".join(json.dumps(r) + "\n" for r in requests)
    assert serve(worker, io.StringIO(lines), Channel(out)) == 0
    return [json.loads(line) for line in out.getvalue().splitlines()]


def test_protocol_run_cache_and_errors(worker, slab_file, pet_slab, tmp_path):
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    run = {"cmd": "run", "input": str(slab_file), "out_dir": str(out_dir),
           "parameters": {"noise_level": 20, "guidance_scale": 2.0}}
    msgs = _serve(worker, [
        {"id": 1, **run},
        {"id": 2, **run},                               # unchanged: served from the cache
        {"id": 3, **run, "parameters": {"noise_level": 20, "guidance_scale": 4.0}},  # new guidance: decode only
        {"id": 4, "cmd": "stats"},
        {"id": 5, "cmd": "run", "input": str(tmp_path / "missing.nrrd"), "out_dir": str(out_dir)},
        {"id": 6, "cmd": "frobnicate"},
        {"id": 7, "cmd": "quit"},
        {"id": 8, "cmd": "stats"},                     # after quit: never answered
    ])
    assert msgs[0]["type"] == "ready" and msgs[0]["model_id"] == worker.model.card["id"]
    assert msgs[0]["device"] == "cpu" and msgs[0]["gpu"] is False and msgs[0]["protocol"] == 2
    assert msgs[0]["method"] == "igconda" and msgs[0]["methods"][0] == "igconda" and "cdm" in msgs[0]["methods"]
    results = {m["id"]: m for m in msgs if m["type"] == "result"}
    assert sorted(results) == [1, 2, 3]
    first, again, guided = results[1], results[2], results[3]
    assert first["network_evaluations"] > 0
    assert again["network_evaluations"] == 0
    # tiny card: 3 grid points -> 2 encode steps x N slices, 2 decode steps x 2N (uncond + healthy)
    assert 0 < guided["network_evaluations"] < first["network_evaluations"]
    assert guided["network_evaluations"] == 2 * first["network_evaluations"] // 3
    progress = [m for m in msgs if m["type"] == "progress" and m["id"] == 1]
    assert progress and progress[-1]["fraction"] == 1.0
    assert all(0.0 <= m["fraction"] <= 1.0 for m in progress)
    heat = read_volume(first["heatmap"], validate=False)
    cf = read_volume(first["counterfactual"])
    assert heat.same_geometry(pet_slab) and cf.same_geometry(pet_slab)
    assert float(heat.voxels.max()) > 0
    assert first["parameters"]["noise_level"] == 20 and first["parameters"]["guidance_scale"] == 2.0
    assert first["method"] == "igconda" and first["classifier_evaluations"] == 0
    assert first["classifier_confidence"] is None
    stats = next(m for m in msgs if m["type"] == "stats")
    assert stats["id"] == 4 and stats["total_network_evaluations"] == guided["total_network_evaluations"]
    errors = {m["id"]: m for m in msgs if m["type"] == "error"}
    assert "file not found" in errors[5]["message"] and errors[5]["kind"] == "VolumeError"
    assert "unknown worker command" in errors[6]["message"]
    assert msgs[-1] == {"type": "bye", "id": 7}


def test_modality_mismatch_is_a_sentence(worker, tmp_path, pet_slab):
    ct = pet_slab.with_voxels(pet_slab.voxels * 100 - 1000, modality="CT", units="HU")
    path = write_volume(ct, tmp_path / "ct.nrrd")
    msgs = _serve(worker, [{"id": 1, "cmd": "run", "input": str(path), "out_dir": str(tmp_path)}])
    err = msgs[-1]
    assert err["type"] == "error" and "trained on PET but the input is CT" in err["message"]
    assert "detail" not in err  # an expected failure: no traceback
    assert not (tmp_path / "heatmap.nrrd").exists()


def test_steps_in_a_request(worker, slab_file, tmp_path):
    """One reading of ``steps`` (card.parse_steps): absent/null/"" = the card's default, "reference", or an int >= 1."""
    run = {"cmd": "run", "input": str(slab_file), "out_dir": str(tmp_path)}
    base = {"noise_level": 4, "guidance_scale": 2.0}
    requests = [{**run, "parameters": base}] + [{**run, "parameters": {**base, "steps": steps}}
                                                for steps in (None, "", "reference", 2, "2", 0, "fast")]
    msgs = [m for m in _serve(worker, [{"id": i, **r} for i, r in enumerate(requests)]) if m["type"] != "progress"]
    default = worker.model.card["inference_defaults"]["steps"]
    assert default == 3
    assert [m["type"] for m in msgs[1:]] == ["result"] * 6 + ["error"] * 2
    assert [m["parameters"]["steps"] for m in msgs[1:7]] == [default, default, default, "reference", 2, 2]
    assert "DDIM steps must be >= 1" in msgs[7]["message"] and "'reference'" in msgs[7]["message"]
    assert "DDIM steps must be a whole number" in msgs[8]["message"]


def test_request_fields_accepted_and_refused_up_front(worker, slab_file, tmp_path):
    """Numbers may come as text when whole ("20", as the parameter node stores them); everything is
    checked before the input is read, so a refused request does no work (see test_hostile_parameters)."""
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    run = {"cmd": "run", "input": str(slab_file), "out_dir": str(out_dir)}
    p = {"guidance_scale": 2.0, "steps": 2}
    before = worker.model.network_evaluations
    msgs = [m for m in _serve(worker, [
        {"id": 1, **run, "parameters": {**p, "noise_level": "6"}, "counterfactual": False},
        {"id": 2, **run, "parameters": {**p, "noise_level": 6.0, "guidance_scale": "2"}},  # the same: from the cache
        {"id": 3, **run, "parameters": {**p, "noise_level": 6.5}},
        {"id": 4, **run, "parameters": {**p, "noise_level": 6, "guidance_scale": float("nan")}},
        {"id": 5, **run, "parameters": {**p, "noise_level": 6}, "guidanceScale": 1.0},
        {"id": 6, **run, "parameters": {**p, "tau": 0.5}},          # a parameter of another method
        {"id": 7, **run, "method": "cg-nothing"},
        {"id": 8, **run, "parameters": [6]},
    ]) if m["type"] in ("result", "error")]
    assert [(m["id"], m["type"]) for m in msgs] == [(1, "result"), (2, "result"), (3, "error"), (4, "error"),
                                                   (5, "error"), (6, "error"), (7, "error"), (8, "error")]
    assert msgs[0]["parameters"] == msgs[1]["parameters"] == {"noise_level": 6, "guidance_scale": 2.0, "steps": 2}
    assert msgs[0]["counterfactual"] is None and msgs[1]["network_evaluations"] == 0
    assert worker.model.network_evaluations == before + msgs[0]["network_evaluations"]
    assert "whole number from 1 to 999" in msgs[2]["message"] and "got 6.5" in msgs[2]["message"]
    assert "finite number >= 0" in msgs[3]["message"] and "got NaN" in msgs[3]["message"]
    assert "unknown field(s) 'guidanceScale'" in msgs[4]["message"]
    assert "method igconda has no parameter 'tau'" in msgs[5]["message"] and "cdm, cg-cdm" in msgs[5]["message"]
    assert "unknown method \"cg-nothing\"" in msgs[6]["message"] and "cg-cdm" in msgs[6]["message"]
    assert "'parameters' must be an object" in msgs[7]["message"]
    assert all("detail" not in m for m in msgs)


@pytest.fixture(scope="module")
def client(tiny_checkpoint):
    c = WorkerClient(tiny_checkpoint, device="cpu", threads=1).start()
    yield c
    c.close()


def test_subprocess_run_then_terminate_mid_run(client, tmp_path, pet_slab):
    ready = client.wait_ready(timeout=180)
    assert ready["device"] == "cpu" and ready["precision"] in ("fp32", "bf16") and client.alive
    path = write_volume(pet_slab, tmp_path / "input.nrrd")
    seen = []
    res = client.request({"cmd": "run", "input": str(path), "out_dir": str(tmp_path), "parameters": {"noise_level": 20}},
                         progress=lambda f, m: seen.append((f, m)), timeout=300)
    assert res["type"] == "result" and res["network_evaluations"] > 0
    assert seen and seen[-1][0] == 1.0
    assert read_volume(res["heatmap"], validate=False).same_geometry(pet_slab)
    again = client.request({"cmd": "run", "input": str(path), "out_dir": str(tmp_path),
                            "parameters": {"noise_level": 20}}, timeout=120)
    assert again["network_evaluations"] == 0

    # a long run (stride-1 reference loop), terminated once it has started: the process is gone
    out2 = tmp_path / "cancelled"
    out2.mkdir()
    client.send({"cmd": "run", "input": str(path), "out_dir": str(out2),
                 "parameters": {"noise_level": 40, "steps": "reference"}})
    deadline = time.monotonic() + 120
    started = False
    while not started and time.monotonic() < deadline:
        started = any(m["type"] == "progress" and "encoding" in m["message"] for m in client.messages(timeout=0.2))
    assert started
    t0 = time.monotonic()
    client.terminate()
    assert time.monotonic() - t0 < 5.0
    assert not client.alive
    assert list(out2.iterdir()) == []
    with pytest.raises(RuntimeError, match="not running"):
        client.send({"cmd": "stats"})


def test_bad_checkpoint_fails_with_a_sentence(tmp_path):
    bad = tmp_path / "nothing.safetensors"
    c = WorkerClient(bad, device="cpu", threads=1).start()
    try:
        with pytest.raises(RuntimeError, match="checkpoint not found"):
            c.wait_ready(timeout=180)
        c.process.wait(timeout=30)
        assert c.process.returncode == 2
    finally:
        c.terminate()


def test_a_region_is_the_only_part_the_network_computes(worker, slab_file, pet_slab, tmp_path):
    """``region`` (an organ ROI's included organs, on the input's grid): fewer model slices and network evaluations,
    heat 0 in the slices it does not need; a region on another grid, or not a path, is refused before any work."""
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    mask = np.zeros(pet_slab.voxels.shape, np.uint8)
    mask[8:11, 10:30, 10:30] = 1  # three of the slab's 20 slices
    region = write_volume(pet_slab.with_voxels(mask, modality=None, units=None), tmp_path / "region.nrrd")
    shifted = pet_slab.ijk_to_ras.copy()
    shifted[:3, 3] += 30.0
    elsewhere = write_volume(Volume(mask, shifted), tmp_path / "elsewhere.nrrd")
    run = {"cmd": "run", "input": str(slab_file), "out_dir": str(out_dir),
           "parameters": {"noise_level": 7, "guidance_scale": 2.0}}
    before = worker.model.network_evaluations
    msgs = [m for m in _serve(worker, [{"id": 1, **run}, {"id": 2, **run, "region": str(region)},
                                       {"id": 3, **run, "region": str(elsewhere)}, {"id": 4, **run, "region": 5}])
            if m["type"] in ("result", "error")]
    assert [(m["id"], m["type"]) for m in msgs] == [(1, "result"), (2, "result"), (3, "error"), (4, "error")]
    whole, part = msgs[0], msgs[1]
    assert whole["model_slices"]["computed"] == whole["model_slices"]["total"]
    assert 0 < part["model_slices"]["computed"] < part["model_slices"]["total"] == whole["model_slices"]["total"]
    per_slice = whole["network_evaluations"] // whole["model_slices"]["computed"]
    assert part["network_evaluations"] == per_slice * part["model_slices"]["computed"]
    heat = read_volume(part["heatmap"], validate=False).voxels
    assert heat[9].any() and not heat[:4].any() and not heat[16:].any()  # computed around the region only
    assert "region" in msgs[2]["message"] and "not on the input's grid" in msgs[2]["message"]
    assert "'region' must be a text or null" in msgs[3]["message"]
    assert all("detail" not in m for m in msgs[2:])
    assert worker.model.network_evaluations == before + whole["network_evaluations"] + part["network_evaluations"]
