"""Hostile parameters (issue 7): every verb and the worker protocol refuse a bad parameter before any work.

Each case asserts one sentence (the valid range in it), exit code 2 for the CLI, nothing written, the
input untouched, and no network evaluation and no resampling (observed by counting calls: nothing is
replaced). Tables: ``run``, ``evaluate`` / ``sweep``, the evaluation functions, the worker protocol,
and the resource bounds on what a run would compute.
"""

from __future__ import annotations

import io
import json
import math
import re

import numpy as np
import pytest
import torch

from DiffusionAnomalyLib import evaluation
from DiffusionAnomalyLib.methods import base
from DiffusionAnomalyLib.methods.igconda import IgcondaModel
from DiffusionAnomalyLib.volume import Volume, ijk_to_ras_matrix, write_volume
from DiffusionAnomalyLib.worker import Channel, Worker, serve

from conftest import run_refused, snapshot

NOISE_RANGE = r"noise level [DLQ] must be a whole number from 1 to 999"
GUIDANCE_RANGE = r"guidance scale w must be a finite number >= 0"
STEPS_RANGE = r"DDIM steps must be a whole number from 1 to 999"
FRACTION_RANGE = r"threshold value must be a finite number in \(0(\.0)?, 1(\.0)?\]"
ABSOLUTE_RANGE = r"threshold value must be a finite number > 0"
MIN_SIZE_RANGE = r"minimum lesion size \(ml\) must be a finite number >= 0"


@pytest.fixture()
def work(monkeypatch):
    """Calls of the network and of the resampling into model space, counted (their behaviour unchanged)."""
    calls: list[str] = []
    eps, to_model_space = IgcondaModel._eps, base.to_model_space

    def counted_eps(self, *args, **kwargs):
        calls.append("network")
        return eps(self, *args, **kwargs)

    def counted_resampling(*args, **kwargs):
        calls.append("resampling")
        return to_model_space(*args, **kwargs)

    monkeypatch.setattr(IgcondaModel, "_eps", counted_eps)
    monkeypatch.setattr(base, "to_model_space", counted_resampling)
    return calls


@pytest.fixture(scope="module")
def pet_file(tmp_path_factory, small_phantom_case):
    """The small phantom as NRRD (modality PT, units SUVbw in its header)."""
    return write_volume(small_phantom_case.pet, tmp_path_factory.mktemp("input") / "pet.nrrd")


@pytest.fixture(scope="module")
def thick_slices_file(tmp_path_factory, small_phantom_case):
    """The small phantom's 138 240 voxels (far inside the input voxel limit) with 500 mm slices: 29.5 m of
    body, 2 460 model slices at 12 mm. The model grid, not the input grid, is what is too large."""
    pet = small_phantom_case.pet
    m = ijk_to_ras_matrix((8.0, 8.0, 500.0), pet.origin_ras, pet.direction_ras)
    thick = Volume(pet.voxels.copy(), m, modality="PT", units="SUVbw")
    return write_volume(thick, tmp_path_factory.mktemp("thick") / "thick.nrrd")


# ---- run ---------------------------------------------------------------------------------------
CUDA = torch.cuda.is_available()

RUN_CASES = [
    pytest.param(["--guidance-scale", "nan"], GUIDANCE_RANGE + r", got NaN", id="guidance-nan"),
    pytest.param(["--guidance-scale", "inf"], GUIDANCE_RANGE, id="guidance-inf"),
    pytest.param(["--guidance-scale=-inf"], GUIDANCE_RANGE, id="guidance-minus-inf"),
    pytest.param(["--guidance-scale", "-1"], GUIDANCE_RANGE, id="guidance-negative"),
    pytest.param(["--noise-level", "0"], NOISE_RANGE, id="noise-0"),
    pytest.param(["--noise-level", "1000"], NOISE_RANGE, id="noise-T"),
    pytest.param(["--noise-level", "-5"], NOISE_RANGE, id="noise-negative"),
    pytest.param(["--noise-level", "20.7"], NOISE_RANGE, id="noise-20.7"),
    pytest.param(["--steps", "0"], r"steps must be >= 1", id="steps-0"),
    pytest.param(["--steps", "5000"], STEPS_RANGE, id="steps-above-T"),
    pytest.param(["--steps", "fast"], r"steps must be a whole number >= 1 or 'reference'", id="steps-text"),
    pytest.param(["--threshold-fraction", "nan"], FRACTION_RANGE + r".*got NaN", id="threshold-nan"),
    pytest.param(["--threshold-fraction", "1.5"], FRACTION_RANGE, id="threshold-fraction-above-1"),
    pytest.param(["--threshold-fraction", "0"], FRACTION_RANGE, id="threshold-fraction-0"),
    pytest.param(["--threshold-fraction", "50"], FRACTION_RANGE + r".*'50%' for 50 %.*got 50", id="threshold-50-percent"),
    pytest.param(["--threshold-fraction", "150%"], FRACTION_RANGE, id="threshold-150-percent"),
    pytest.param(["--threshold-absolute", "inf"], ABSOLUTE_RANGE, id="threshold-absolute-inf"),
    pytest.param(["--threshold-absolute", "-2"], ABSOLUTE_RANGE, id="threshold-absolute-negative"),
    pytest.param(["--threshold", "0.5"], r"ambiguous option: --threshold could match --threshold-fraction, "
                 r"--threshold-absolute, --threshold-otsu", id="threshold-without-rule"),
    pytest.param(["--threshold-otsu", "--threshold-fraction", "0.3"], r"not allowed with argument --threshold-otsu",
                 id="two-threshold-rules"),
    pytest.param(["--min-size-ml", "-1"], MIN_SIZE_RANGE, id="min-size-negative"),
    pytest.param(["--min-size-ml", "nan"], MIN_SIZE_RANGE, id="min-size-nan"),
    pytest.param(["--device", "cuda"], r"CUDA", id="device-cuda-without-cuda",
                 marks=pytest.mark.skipif(CUDA, reason="this machine has CUDA")),
    pytest.param(["--device", "tpu"], r"unknown device 'tpu'", id="device-unknown"),
    pytest.param(["--tau", "0.5"], r"--tau does not apply to method igconda \(it takes --noise-level, "
                 r"--guidance-scale, --steps; 'tau' belongs to cdm, cg-cdm\)", id="tau-to-igconda"),
    pytest.param(["--method", "cdm", "--guidance-scale", "3"], r"--guidance-scale does not apply to method cdm",
                 id="guidance-to-cdm"),
    pytest.param(["--method", "cdm", "--tau", "1"], r"tau must be a finite number in \(0, 1\)", id="cdm-tau-1"),
    pytest.param(["--method", "cdm", "--noise-level", "20", "--steps", "30"], r"CDM steps R must be a whole number "
                 r"from 1 to 20", id="cdm-steps-above-q"),
    pytest.param(["--method", "cg-ddim", "--classifier", "/nonexistent/c.safetensors"], r"checkpoint not found",
                 id="classifier-missing"),
    pytest.param(["--method", "igconda-pet"], r"invalid choice", id="method-unknown"),
]


@pytest.mark.parametrize("extra, message", RUN_CASES)
def test_run_refuses_a_bad_parameter_before_any_work(capsys, tmp_path, tiny_checkpoint, pet_file, work, extra, message):
    out = tmp_path / "out"
    line = run_refused(capsys, "run", "--checkpoint", tiny_checkpoint, "--input", pet_file, "--out", out, *extra,
                       watch=(pet_file, tiny_checkpoint, out.parent))
    assert work == [], f"work was done before the refusal: {work}"
    assert re.search(message, line), line
    assert not out.exists()


def test_run_refuses_a_model_grid_too_large_for_the_input_voxel_limit(capsys, tmp_path, tiny_checkpoint,
                                                                    thick_slices_file, work):
    """Large slice spacing: few input voxels, but metres of body for the model (hours of CPU, or an allocation)."""
    out = tmp_path / "out"
    line = run_refused(capsys, "run", "--checkpoint", tiny_checkpoint, "--input", thick_slices_file, "--out", out,
                       watch=(thick_slices_file, out.parent))
    # the input check (spacing plausibility) may refuse first; either way, nothing was computed
    assert "model slices" in line or "spacing" in line, line
    assert work == []


# ---- evaluate and sweep ------------------------------------------------------------------------
EVALUATION_CASES = [
    pytest.param(["evaluate", "--phantoms", "0"], r"whole number >= 1", id="evaluate-0-phantoms"),
    pytest.param(["evaluate", "--phantoms", "-3"], r"whole number >= 1", id="evaluate-negative-phantoms"),
    pytest.param(["evaluate", "--phantoms", "2.5"], r"whole number >= 1", id="evaluate-fractional-phantoms"),
    pytest.param(["evaluate", "--phantoms", "1", "--seed", "1.5"], r"seed", id="evaluate-fractional-seed"),
    pytest.param(["evaluate", "--phantoms", "1", "--guidance-scale", "nan"], GUIDANCE_RANGE,
                 id="evaluate-guidance-nan"),
    pytest.param(["evaluate", "--phantoms", "1", "--noise-level", "5000"], NOISE_RANGE, id="evaluate-noise-5000"),
    pytest.param(["evaluate", "--phantoms", "1", "--steps", "5000"], STEPS_RANGE, id="evaluate-steps-5000"),
    pytest.param(["evaluate", "--phantoms", "1", "--methods", "igconda,bogus"], r"--methods must list.*'bogus'",
                 id="evaluate-unknown-method"),
    pytest.param(["evaluate", "--phantoms", "1", "--methods", "igconda,suv41,igconda"], r"igconda more than once",
                 id="evaluate-method-twice"),
    pytest.param(["evaluate", "--phantoms", "1", "--methods", "suv41"], r"names no diffusion method",
                 id="evaluate-baseline-only"),
    pytest.param(["evaluate", "--phantoms", "1", "--methods", "igconda,cdm", "--noise-level", "20"],
                 r"--noise-level: method parameters apply to one method", id="evaluate-parameters-with-two-methods"),
    pytest.param(["evaluate", "--phantoms", "1", "--tau", "0.5"], r"--tau does not apply to method igconda.*cdm, cg-cdm",
                 id="evaluate-tau-to-igconda"),
    pytest.param(["evaluate", "--phantoms", "1", "--methods", "cdm", "--tau", "1"],
                 r"embedding weight tau must be a finite number in \(0, 1\)", id="evaluate-cdm-tau-1"),
    pytest.param(["sweep", "--phantoms", "0"], r"whole number >= 1", id="sweep-0-phantoms"),
    pytest.param(["sweep", "--phantoms", "1", "--noise-levels", ""], r"noise.levels", id="sweep-empty-noise-levels"),
    pytest.param(["sweep", "--phantoms", "1", "--noise-levels", "20,,40"], r"noise.levels", id="sweep-hole-in-list"),
    pytest.param(["sweep", "--phantoms", "1", "--noise-levels", "20.7"], r"noise.level", id="sweep-noise-20.7"),
    pytest.param(["sweep", "--phantoms", "1", "--noise-levels", "20,0"], NOISE_RANGE, id="sweep-noise-0"),
    pytest.param(["sweep", "--phantoms", "1", "--noise-levels", "20,99999"], NOISE_RANGE, id="sweep-noise-huge"),
    pytest.param(["sweep", "--phantoms", "1", "--guidance-values", "1,nan"], r"guidance.scale",
                 id="sweep-guidance-nan"),
    pytest.param(["sweep", "--phantoms", "1", "--guidance-values", "-1"], GUIDANCE_RANGE, id="sweep-guidance-negative"),
]


@pytest.mark.parametrize("argv, message", EVALUATION_CASES)
def test_evaluate_and_sweep_refuse_bad_parameters_before_any_work(capsys, tmp_path, tiny_checkpoint, work, argv,
                                                                   message):
    out = tmp_path / "out"
    line = run_refused(capsys, *argv, "--checkpoint", tiny_checkpoint, "--out", out,
                       watch=(tiny_checkpoint, out.parent))
    assert re.search(message, line), line
    assert work == [] and not out.exists()


EVALUATION_API_CASES = [
    pytest.param("evaluate", {"n_cases": 0}, r"number of phantoms must be a whole number >= 1", id="0-phantoms"),
    pytest.param("evaluate", {"n_cases": -1}, r"number of phantoms must be a whole number >= 1", id="negative"),
    pytest.param("evaluate", {"n_cases": 2.5}, r"number of phantoms must be a whole number >= 1", id="fractional"),
    pytest.param("evaluate", {"n_cases": "3"}, r"number of phantoms must be a whole number", id="text-count"),
    pytest.param("evaluate", {"seed": -1}, r"first phantom seed must be a whole number >= 0", id="negative-seed"),
    pytest.param("evaluate", {"seed": 1.5}, r"first phantom seed must be a whole number >= 0", id="fractional-seed"),
    pytest.param("evaluate", {"parameters": {"igconda": {"guidance_scale": float("nan")}}}, GUIDANCE_RANGE,
                 id="evaluate-guidance-nan"),
    pytest.param("evaluate", {"parameters": {"igconda": {"noise_level": 20.7}}}, NOISE_RANGE, id="evaluate-noise-20.7"),
    pytest.param("evaluate", {"parameters": {"igconda": {"tau": 0.5}}}, r"no parameter 'tau'", id="evaluate-tau"),
    pytest.param("sweep", {"noise_levels": []}, r"list of noise levels", id="sweep-no-noise-levels"),
    pytest.param("sweep", {"guidance_values": ""}, r"list of guidance scales", id="sweep-empty-text"),
    pytest.param("sweep", {"noise_levels": "20,x"}, NOISE_RANGE + r'.*got "x"', id="sweep-noise-text"),
    pytest.param("sweep", {"noise_levels": [20.7]}, NOISE_RANGE, id="sweep-noise-20.7"),
    pytest.param("sweep", {"guidance_values": [1.0, float("inf")]}, GUIDANCE_RANGE, id="sweep-guidance-inf"),
    pytest.param("sweep", {"n_cases": 0}, r"number of phantoms", id="sweep-0-phantoms"),
]


@pytest.mark.parametrize("verb, changes, message", EVALUATION_API_CASES)
def test_evaluation_functions_check_their_arguments_first(tmp_path, tiny_model, work, verb, changes, message):
    out = tmp_path / "out"
    if verb == "evaluate":
        args = {"n_cases": 1, "seed": 5_000_000, "out_dir": out, **changes}
        call = lambda: evaluation.evaluate({"igconda": tiny_model}, log=lambda m: None, **args)  # noqa: E731
    else:
        args = {"n_cases": 1, "seed": 800_000, "out_dir": out, "noise_levels": [20], "guidance_values": [1.0],
                **changes}
        call = lambda: evaluation.sweep(tiny_model, log=lambda m: None, **args)  # noqa: E731
    with pytest.raises(ValueError, match=message):
        call()
    assert work == [] and not out.exists() and tiny_model.network_evaluations == 0


# ---- the worker protocol -----------------------------------------------------------------------
@pytest.fixture(scope="module")
def worker(tiny_checkpoint):
    return Worker(tiny_checkpoint, device="cpu")


def _with(**changes):
    """A run request with ``changes`` applied (a value of ... removes the key)."""
    return ("run", changes)


def _parameters(**changes):
    """A run request whose method parameters have ``changes`` applied."""
    return ("run", {"parameters": {"noise_level": 20, "guidance_scale": 2.0, **changes}})


WORKER_CASES = [
    pytest.param("not json", None, r"not valid JSON", id="not-json"),
    pytest.param('{"cmd": "run", ', None, r"not valid JSON", id="truncated-json"),
    pytest.param("[1, 2]", None, r"must be a JSON object.*got \[1, 2\]", id="a-list"),
    pytest.param('"run"', None, r"must be a JSON object", id="a-string"),
    pytest.param('{"id": [1], "cmd": "stats"}', None, r"request id must be", id="list-id"),
    pytest.param('{"id": NaN, "cmd": "stats"}', None, r"request id must be", id="nan-id"),
    pytest.param('{"id": 1}', 1, r"has no 'cmd'", id="no-cmd"),
    pytest.param('{"id": 1, "cmd": ["run"]}', 1, r"unknown worker command", id="list-cmd"),
    pytest.param('{"id": 1, "cmd": "stats", "verbose": true}', 1, r"unknown field.*'verbose'", id="stats-extra-key"),
    pytest.param(_with(guidance=3.0), 1, r"unknown field.*'guidance'", id="misspelt-key"),
    pytest.param(_parameters(guidance_scale=float("nan")), 1, GUIDANCE_RANGE + r", got NaN", id="guidance-nan"),
    pytest.param(_parameters(guidance_scale=float("inf")), 1, GUIDANCE_RANGE, id="guidance-inf"),
    pytest.param(_parameters(guidance_scale=-0.5), 1, GUIDANCE_RANGE, id="guidance-negative"),
    pytest.param(_parameters(guidance_scale="strong"), 1, GUIDANCE_RANGE, id="guidance-text"),
    pytest.param(_parameters(noise_level=20.7), 1, NOISE_RANGE + r".*got 20.7", id="noise-20.7"),
    pytest.param(_parameters(noise_level="20.7"), 1, NOISE_RANGE, id="noise-text-20.7"),
    pytest.param(_parameters(noise_level=True), 1, NOISE_RANGE, id="noise-true"),
    pytest.param(_parameters(noise_level=0), 1, NOISE_RANGE, id="noise-0"),
    pytest.param(_parameters(noise_level=[20]), 1, NOISE_RANGE, id="noise-list"),
    pytest.param(_parameters(steps=0), 1, r"steps must be >= 1", id="steps-0"),
    pytest.param(_parameters(steps=10**9), 1, STEPS_RANGE, id="steps-huge"),
    pytest.param(_with(seed=3), 1, r"unknown field.*'seed'", id="seed-is-a-method-parameter"),
    pytest.param(_with(noise_level=20), 1, r"unknown field.*'noise_level'", id="parameter-outside-parameters"),
    pytest.param(_parameters(seed=3), 1, r"method igconda has no parameter 'seed'.*cg-ddpm, cdm, cg-cdm",
                 id="seed-of-another-method"),
    pytest.param(_parameters(tau=0.5), 1, r"no parameter 'tau'.*'tau' belongs to cdm, cg-cdm", id="tau-to-igconda"),
    pytest.param(_with(parameters="fast"), 1, r"'parameters' must be an object", id="parameters-text"),
    pytest.param(_with(method=5), 1, r"'method' must be a method name or null", id="method-number"),
    pytest.param(_with(method="igconda-pet"), 1, r"unknown method \"igconda-pet\"; the methods are: igconda, cg-ddim",
                 id="method-unknown"),
    pytest.param(_with(counterfactual="yes"), 1, r"'counterfactual' must be true or false", id="counterfactual-text"),
    pytest.param(_with(input=42), 1, r"'input' must be a path as text", id="input-number"),
    pytest.param(_with(modality=5), 1, r"'modality' must be a text or null", id="modality-number"),
    pytest.param(_with(out_dir=...), 1, r"has no 'out_dir'", id="no-out-dir"),
    pytest.param(_with(out_dir="MISSING"), 1, r"does not exist", id="out-dir-missing"),
]


@pytest.mark.parametrize("request_line, reply_id, message", WORKER_CASES)
def test_worker_refuses_a_bad_request_with_one_sentence(worker, tmp_path, pet_slab, work, request_line, reply_id,
                                                        message):
    slab = write_volume(pet_slab, tmp_path / "input.nrrd")
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    if isinstance(request_line, tuple):
        request = {"id": 1, "cmd": "run", "input": str(slab), "out_dir": str(out_dir),
                   "parameters": {"noise_level": 20, "guidance_scale": 2.0}}
        for key, value in request_line[1].items():
            if value is ...:
                request.pop(key)
            else:
                request[key] = str(tmp_path / "missing") if value == "MISSING" else value
        request_line = json.dumps(request)  # NaN and Infinity as Python's json writes them
    before = snapshot(tmp_path)
    evaluations = worker.model.network_evaluations
    out = io.StringIO()
    assert serve(worker, io.StringIO(request_line + "\n" + json.dumps({"id": 2, "cmd": "stats"}) + "\n"),
                 Channel(out)) == 0
    messages = [json.loads(line) for line in out.getvalue().splitlines()]
    assert [m["type"] for m in messages] == ["ready", "error", "stats"]  # one answer, and the worker goes on
    error = messages[1]
    assert error["id"] == reply_id
    assert re.search(message, error["message"]), error["message"]
    assert "\n" not in error["message"] and "Traceback" not in error["message"]
    assert "detail" not in error  # an expected refusal: no traceback
    assert worker.model.network_evaluations == evaluations and work == []
    assert snapshot(tmp_path) == before


# ---- resource bounds on what would be computed ---------------------------------------------------
RESOURCE_CASES = [
    pytest.param("MAX_MODEL_SLICES", 10, {}, r"would need 60 model slices \(at most 10\).*crop it", id="slices"),
    pytest.param("MAX_WORKING_BYTES", 2**20, {}, r"would need about [\d.]+ GiB of memory \(at most 0.000977 GiB\)",
                 id="memory"),
    pytest.param("MAX_NETWORK_EVALUATIONS", 1000, {"steps": "reference"},
                 r"would need 9,000 network evaluations on 60 model slices \(at most 1,000\)", id="evaluations"),
]


@pytest.mark.parametrize("bound, value, params, message", RESOURCE_CASES)
def test_run_refuses_work_beyond_the_resource_bounds(monkeypatch, tiny_model, small_phantom, work, bound, value,
                                                     params, message):
    monkeypatch.setattr(base, bound, value)
    with pytest.raises(ValueError, match=message):
        tiny_model.run(small_phantom, **params)
    assert work == [] and tiny_model.network_evaluations == 0


def test_resource_estimates_of_the_small_phantom(tiny_model, small_phantom):
    grid = base.model_grid(small_phantom, tiny_model.card["preprocessing"])
    assert grid.size == (32, 32, 60)
    assert base.working_bytes(small_phantom, grid) == 4 * (7 * 48 * 48 * 60 + 8 * 32 * 32 * 60)
    params = tiny_model.resolve()
    assert tiny_model.evaluations_per_slice(params) == 3 * 3  # 3 grid moves: 1 encode + 2 decode each
    base.check_resources(small_phantom, grid, tiny_model.evaluations_per_slice(params))  # well inside


def test_sweep_counts_every_grid_point_against_the_evaluation_bound(monkeypatch, tmp_path, tiny_model, work):
    monkeypatch.setattr(base, "MAX_NETWORK_EVALUATIONS", 50)
    out = tmp_path / "out"
    with pytest.raises(ValueError, match=r"network evaluations .*\(at most 50\)"):
        evaluation.sweep(tiny_model, 1, 800_000, out, [20, 40], [0.0, 1.0, 3.0], steps=2, log=lambda m: None)
    assert "network" not in work and not out.exists()


# ---- what is accepted --------------------------------------------------------------------------
@pytest.mark.parametrize("given, expected", [
    ({"noise_level": "20"}, {"noise_level": 20}),
    ({"noise_level": 20.0}, {"noise_level": 20}),
    ({"noise_level": np.int64(7)}, {"noise_level": 7}),
    ({"guidance_scale": "2.5"}, {"guidance_scale": 2.5}),
    ({"guidance_scale": 0}, {"guidance_scale": 0.0}),
    ({"steps": "reference"}, {"steps": "reference"}),
    ({"steps": "7"}, {"steps": 7}),
    ({"steps": ""}, {"steps": 3}),
    ({}, {"noise_level": 50, "guidance_scale": 3.0, "steps": 3}),
])
def test_resolve_reads_whole_numbers_and_their_text_without_rounding(tiny_model, given, expected):
    params = tiny_model.resolve(**given)
    assert {k: params[k] for k in expected} == expected
    assert type(params["noise_level"]) is int and type(params["guidance_scale"]) is float
    assert tiny_model.resolve(**params) == params  # idempotent, and nothing changed on the model
    assert tiny_model.network_evaluations == 0 and len(tiny_model.cache) == 0


def test_resolve_blames_a_bad_card_default_on_the_card(tiny_model, monkeypatch):
    monkeypatch.setitem(tiny_model.card["inference_defaults"], "guidance_scale", math.nan)
    with pytest.raises(ValueError, match=r"the model card's default " + GUIDANCE_RANGE):
        tiny_model.resolve()
    assert tiny_model.resolve(guidance_scale=1.0)["guidance_scale"] == 1.0
