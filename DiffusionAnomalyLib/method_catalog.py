"""Which analysis methods exist and what their parameters are (torch-free: the CLI, the worker, the
Slicer module and the reports all read it).

One record per method (:class:`MethodSpec`): its name, title, the network it runs on, whether it
needs a noise-conditioned classifier, whether it makes a counterfactual, and its parameters
(:class:`Parameter`: name, label, unit, range, what a change recomputes). The rules that check a
value are :mod:`.card`'s; the defaults of a run are the method's built-in ones (METHODS.md),
overridden by the model card (:func:`method_defaults`). The method objects (``methods/``) resolve
their parameters through :func:`resolve_parameters`, so a value is checked the same way whether it
comes from the command line, a worker request or a Slicer slider.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from .card import (ANALYSIS_METHODS, REFERENCE_STEPS, CheckpointError, check_analysis_model, check_cdm_steps, check_guidance_scale, check_noise_level, check_seed, check_steps,
                   check_tau, number_from_text, parse_steps, real_number, shown)

#: what a change of a parameter recomputes (the slider-reuse rules, tested per method)
RECOMPUTE_ALL = "all"          # every network evaluation of the run
RECOMPUTE_DECODE = "decode"    # the guided decoding only: the inverted latents are reused
RECOMPUTE_WORDS = {RECOMPUTE_ALL: "recomputes the whole run",
                   RECOMPUTE_DECODE: "re-decodes only (the inverted latents are reused)"}


@dataclass(frozen=True)
class Parameter:
    """One method parameter: how it is named, shown, bounded and checked.

    ``check(value, context)`` returns the checked value or raises ValueError with ``field`` named;
    ``context`` holds the model's ``timesteps`` (T), ``max_noise_level`` and the run's resolved
    ``noise_level`` (for a bound that depends on it). ``minimum``/``maximum`` are the widget
    range (the model-dependent upper bounds are checked by ``check``).
    """

    name: str
    label: str
    help: str
    kind: str  # "int", "float" or "steps" (a whole number or "reference")
    minimum: float
    maximum: float
    check: Callable[[Any, dict[str, Any], str], Any]
    recompute: str = RECOMPUTE_ALL
    decimals: int = 0
    cli: str = ""  # the command-line option when not ``--<name>`` (``--seed`` already names the phantom seed)

    @property
    def words(self) -> str:
        """The label inside a sentence: "noise level D", "DDIM steps" (an acronym keeps its capitals)."""
        first = self.label.split()[0]
        return self.label if first.isupper() else self.label[0].lower() + self.label[1:]

    @property
    def option(self) -> str:
        """The command-line option: ``--noise-level``."""
        return self.cli or "--" + self.name.replace("_", "-")

    @property
    def setting(self) -> str:
        """The Slicer parameter-node name: ``NoiseLevel``."""
        return "".join(part.capitalize() for part in self.name.split("_"))


def _noise_level(value: Any, context: dict[str, Any], field: str) -> int:
    level = check_noise_level(value, context["timesteps"], field)
    if level > context["max_noise_level"]:
        raise ValueError(f"{field} must be at most {context['max_noise_level']} for this model's noise schedule "
                         f"(beyond it alpha_bar vanishes and DDIM breaks down), got {level}.")
    return level


def _ddim_steps(value: Any, context: dict[str, Any], field: str):
    try:
        steps = parse_steps(value)
    except ValueError as exc:  # parse_steps names the value "steps"
        raise ValueError(f"{field}{str(exc)[len('steps'):]}") from None
    return check_steps(steps, context["timesteps"], field)


def _guidance(value: Any, context: dict[str, Any], field: str) -> float:
    return check_guidance_scale(value, field)


def _classifier_scale(value: Any, context: dict[str, Any], field: str) -> float:
    return real_number(value, field, 0.0, why=" (0 = no classifier guidance)")


def _cdm_steps(value: Any, context: dict[str, Any], field: str) -> int:
    return check_cdm_steps(value, context["noise_level"], field)


def _tau(value: Any, context: dict[str, Any], field: str) -> float:
    return check_tau(value, field)


def _seed(value: Any, context: dict[str, Any], field: str) -> int:
    return check_seed(value, field)


_STEPS_HELP = f"DDIM steps each way: a whole number K (a strided grid, fast) or '{REFERENCE_STEPS}' (stride 1)"

NOISE_LEVEL = Parameter("noise_level", "Noise level D", "how far the input is noised before it is made healthy "
                        "(timesteps of the model's schedule)", "int", 1, 999, _noise_level)
GUIDANCE_SCALE = Parameter("guidance_scale", "Guidance scale w", "implicit (classifier-free) guidance towards "
                           "'healthy'; 0 = none", "float", 0.0, 100.0, _guidance, RECOMPUTE_DECODE, 2)
STEPS = Parameter("steps", "DDIM steps", _STEPS_HELP, "steps", 1, 999, _ddim_steps)
CLASSIFIER_SCALE = Parameter("classifier_scale", "Classifier scale s", "classifier guidance towards 'healthy' "
                             "(the gradient of log C(healthy | x_t, t)); 0 = none", "float", 0.0, 10000.0,
                             _classifier_scale, RECOMPUTE_DECODE, 1)
SEED = Parameter("seed", "Noise seed", "seed of the random noise (the same seed gives the same map)", "int", 0,
                 2**31 - 1, _seed, cli="--noise-seed")
#: cg-ddpm samples afresh from the noised input for every scale: a scale change recomputes everything
CG_DDPM_SCALE = Parameter("classifier_scale", CLASSIFIER_SCALE.label, CLASSIFIER_SCALE.help, "float", 0.0, 10000.0,
                          _classifier_scale, RECOMPUTE_ALL, 1)
CG_NOISE_LEVEL = Parameter("noise_level", "Noise level L", NOISE_LEVEL.help, "int", 1, 999, _noise_level)
CDM_NOISE_LEVEL = Parameter("noise_level", "Noise level Q", "the level the input is noised to before the two "
                            "trajectories start (timesteps)", "int", 1, 999, _noise_level)
CDM_STEPS = Parameter("steps", "CDM steps R", "unit DDIM steps of the two trajectories (at most Q)", "int", 1, 999,
                      _cdm_steps)
TAU = Parameter("tau", "Embedding weight tau", "weight of 'unhealthy' in the second trajectory's condition "
                "(strictly between 0 and 1)", "float", 0.01, 0.99, _tau, RECOMPUTE_ALL, 2)
CG_CDM_SCALE = Parameter("classifier_scale", "Classifier scale s", "classifier guidance of both trajectories "
                         "(towards 'unhealthy' and 'healthy'); 0 = plain CDM", "float", 0.0, 10000.0,
                         _classifier_scale, RECOMPUTE_ALL, 1)


#: the model card methods whose network has an unconditional (null-label) branch beside the healthy and
#: unhealthy conditions: IgCONDA-PET's (trained with condition dropout); classifier guidance uses that branch
UNCONDITIONAL_BRANCH = ("igconda",)
#: ... and those whose network has the two class conditions CDM interpolates (a network trained for CDM alone
#: need not have the null branch)
CLASS_CONDITIONS = ("igconda", "cdm")


@dataclass(frozen=True)
class MethodSpec:
    """One analysis method: what it is called, what it runs on, its parameters and built-in defaults."""

    name: str
    title: str
    networks: tuple[str, ...]  # the model card methods whose network it can run on
    parameters: tuple[Parameter, ...]
    defaults: dict[str, Any]  # built-in defaults (METHODS.md); the card may override them (:func:`method_defaults`)
    classifier: bool = False  # needs a noise-conditioned classifier of the same schedule and model grid
    counterfactual: bool = True
    summary: str = ""
    defaults_source: str = ""  # where the built-in defaults come from, in words
    card_defaults: str = ""   # "" = the card's top-level inference_defaults; else the card section holding them
    guidance: str = ""        # the parameter a sweep grids against the noise level (its "guidance" axis)
    #: the threshold rule of the method's paper, used when the model card's thresholds were tuned for another
    #: method (its maps have other units and scales); None: the card's own
    threshold: tuple[str, float | None] | None = None

    @property
    def parameter_names(self) -> tuple[str, ...]:
        return tuple(p.name for p in self.parameters)

    def parameter(self, name: str) -> Parameter:
        for p in self.parameters:
            if p.name == name:
                return p
        raise KeyError(name)


METHODS: dict[str, MethodSpec] = {spec.name: spec for spec in (
    MethodSpec("igconda", "IgCONDA-PET (implicit guidance)", UNCONDITIONAL_BRANCH,
               (NOISE_LEVEL, GUIDANCE_SCALE, STEPS),
               {"noise_level": 400, "guidance_scale": 3.0, "steps": REFERENCE_STEPS},
               summary="DDIM inversion to D, then decoding with classifier-free guidance towards 'healthy'; "
                       "map = |input - counterfactual|",
               defaults_source="the model card (tuned on phantom tuning seeds)", card_defaults="",
               guidance="guidance_scale"),
    MethodSpec("cg-ddim", "Classifier-guided DDIM", UNCONDITIONAL_BRANCH,
               (CG_NOISE_LEVEL, CLASSIFIER_SCALE, STEPS),
               {"noise_level": 500, "classifier_scale": 100.0, "steps": 100}, classifier=True,
               summary="unguided DDIM inversion to L, then DDIM decoding guided by the classifier's gradient "
                       "towards 'healthy'; map = |input - counterfactual|",
               defaults_source="Wolleb et al.'s reference code (L = 500, s = 100) with 100 strided steps instead of "
                               "500 stride-1 steps (CPU time)", card_defaults="cg-ddim", guidance="classifier_scale",
               threshold=("fraction", 0.35)),
    MethodSpec("cg-ddpm", "Classifier-guided DDPM", UNCONDITIONAL_BRANCH,
               (CG_NOISE_LEVEL, CG_DDPM_SCALE, STEPS, SEED),
               {"noise_level": 500, "classifier_scale": 100.0, "steps": 100, "seed": 0}, classifier=True,
               summary="closed-form noising to L with a seed, then ancestral DDPM sampling guided by the "
                       "classifier's gradient towards 'healthy'; map = |input - counterfactual|",
               defaults_source="Wolleb et al.'s reference code (L = 500, s = 100; noised at the requested level, not "
                               "its fixed t = 499) with 100 strided steps", card_defaults="cg-ddpm",
               guidance="classifier_scale", threshold=("fraction", 0.35)),
    MethodSpec("cdm", "CDM (conditional-diffusion finite differences)", CLASS_CONDITIONS,
               (CDM_NOISE_LEVEL, CDM_STEPS, TAU, SEED), {"noise_level": 400, "steps": 10, "tau": 0.95, "seed": 0},
               counterfactual=False,
               summary="two DDIM trajectories from the noised input for R steps, conditioned on 'unhealthy' and on "
                       "the interpolated embedding e(tau); map = |sum of their differences| / (1 - tau)",
               defaults_source="Hu et al.'s reference code (Q = 400, R = 10, tau = 0.95)", card_defaults="cdm",
               guidance="tau", threshold=("otsu", None)),
    MethodSpec("cg-cdm", "CG-CDM (CDM with classifier guidance)", CLASS_CONDITIONS,
               (CDM_NOISE_LEVEL, CDM_STEPS, TAU, CG_CDM_SCALE, SEED),
               {"noise_level": 400, "steps": 10, "tau": 0.95, "classifier_scale": 10.0, "seed": 0}, classifier=True,
               counterfactual=False,
               summary="CDM with classifier guidance on both trajectories (towards 'unhealthy' and 'healthy')",
               defaults_source="Hu et al. (s = 10) and CDM's defaults", card_defaults="cg-cdm",
               guidance="classifier_scale", threshold=("otsu", None)),
)}

#: the baselines ``evaluate`` runs beside the methods (no network)
BASELINES: dict[str, str] = {"suv41": "41 % SUVmax thresholding (PET)"}


def method_spec(name: Any) -> MethodSpec:
    """The record of method ``name``; an unknown name is refused with the list of methods."""
    if not isinstance(name, str) or name not in METHODS:
        raise ValueError(f"unknown method {shown(name)}; the methods are: {', '.join(METHODS)}.")
    return METHODS[name]


def methods_for_network(card_method: str) -> tuple[str, ...]:
    """The methods a checkpoint trained for ``card_method`` can run, its own first (CDM, CG: the conditional network)."""
    served = tuple(name for name, spec in METHODS.items() if card_method in spec.networks)
    return tuple(sorted(served, key=lambda name: name != card_method))


def default_method(card: dict[str, Any]) -> str:
    """The method a checkpoint runs when none is asked for: ``inference_defaults.method`` when the card names
    one (a CT model trained with the null branch runs classifier-guided DDIM), else the card's own."""
    return (card.get("inference_defaults", {}) or {}).get("method") or card["method"]


def card_methods(card: dict[str, Any]) -> tuple[str, ...]:
    """The methods a checkpoint of ``card`` serves, its default first (menus, the worker's list)."""
    first = default_method(card)
    return tuple(sorted(methods_for_network(card["method"]), key=lambda name: name != first))


def served_method(card: dict[str, Any], method: str | None = None) -> str:
    """The method to run with a checkpoint of ``card``: ``method``, or the card's default (:func:`default_method`)
    when None or "".

    Refuses, in one sentence (CheckpointError), a classifier card, a method this version does not
    have, and a method the checkpoint's network cannot serve.
    """
    own = check_analysis_model(card, f"model {card.get('id')}")["method"]
    name = default_method(card) if method in (None, "") else method
    if name in ANALYSIS_METHODS and name not in METHODS:  # a card method of the format, not built yet
        raise CheckpointError(f"method {name!r} is not available in this version of DiffusionAnomaly "
                              f"(available: {', '.join(METHODS)}).")
    if name not in METHODS:  # method_spec's sentence, as the refusal of a checkpoint
        try:
            method_spec(name)
        except ValueError as exc:
            raise CheckpointError(str(exc)) from None
    served = methods_for_network(own)
    if name not in served:
        can = f"it can run: {', '.join(served)}" if served else "it serves none of this version's methods"
        raise CheckpointError(f"model {card.get('id')} (a {own} network) cannot run method {name!r}; {can}.")
    return name


def method_defaults(card: dict[str, Any], name: str) -> tuple[dict[str, Any], set[str]]:
    """Method ``name``'s defaults for a checkpoint of ``card``, and the names whose default the card sets.

    The built-in defaults of :data:`METHODS`, overridden by the card: the card's own method by its
    top-level ``inference_defaults`` (noise_level, guidance_scale, steps), another method by its
    optional section ``inference_defaults.<name>``. The values are checked by
    :func:`resolve_parameters`, which blames the card for a bad one.
    """
    spec = method_spec(name)
    card_defaults = card.get("inference_defaults", {}) or {}
    section = card_defaults if spec.card_defaults == "" else card_defaults.get(spec.card_defaults, {})
    where = "inference_defaults" + (f".{spec.card_defaults}" if spec.card_defaults else "")
    if not isinstance(section, dict):
        raise ValueError(f"the model card's {where} must be an object, got {shown(section)}.")
    if spec.card_defaults:
        unknown = sorted(set(section) - set(spec.parameter_names))
        if unknown:
            raise ValueError(f"the model card's {where} may hold only {', '.join(spec.parameter_names)}; "
                             f"it has {', '.join(unknown)}.")
    from_card = {p for p in spec.parameter_names if section.get(p) is not None}
    return {p: section[p] if p in from_card else spec.defaults[p] for p in spec.parameter_names}, from_card


def resolve_parameters(name: str, given: dict[str, Any], card: dict[str, Any], max_noise_level: int) -> dict[str, Any]:
    """The checked parameters of a run of method ``name`` with a checkpoint of ``card``: each given
    value, else its default (:func:`method_defaults`).

    ``given``: parameter name -> value (None or empty text = the default; a number may come as
    text, "20" but never "20.7"). A name the method does not take is refused, naming the method's parameters, so
    a misspelt or misplaced parameter never runs silently with a default. A bad default is blamed
    on the model card. Raises ValueError (one sentence with the valid range); changes nothing.
    """
    spec = method_spec(name)
    unknown = [key for key in given if key not in spec.parameter_names and given[key] is not None]
    if unknown:
        owners = unknown_owner(unknown)
        raise ValueError(f"method {name} has no parameter {', '.join(map(repr, unknown))}; it takes "
                         f"{', '.join(spec.parameter_names)}" + (f" ({owners})" if owners else "") + ".")
    defaults, from_card = method_defaults(card, name)
    context = {"timesteps": int(card["scheduler"]["num_train_timesteps"]), "max_noise_level": int(max_noise_level)}
    out: dict[str, Any] = {}
    for p in spec.parameters:  # in order: the noise level first, so R is checked against the run's Q
        value = given.get(p.name)
        if isinstance(value, str) and not value.strip():
            value = None  # empty text, as a settings field stores "the default"
        label = p.words
        if value is None:
            value = defaults[p.name]
            field = f"the default {label}"
            if p.name in from_card:
                field = (f"the model card's inference_defaults.{spec.card_defaults}.{p.name}" if spec.card_defaults
                         else f"the model card's default {label}")
        else:
            field = f"the {label}"
            value = number_from_text(value) if p.kind != "steps" else value
        context["noise_level"] = out.get("noise_level", context["max_noise_level"])
        out[p.name] = p.check(value, context, field)
    return out


def check_card_sections(card: dict[str, Any]) -> dict[str, Any]:
    """``card`` after checking every method section of its ``inference_defaults`` (``inference_defaults.cdm``,
    ...): an object of that method's parameters only, each by its rule (:func:`resolve_parameters`); the
    noise level is bounded by T - 1 here, the schedule's own limit by the method object at load.
    CheckpointError (one sentence naming the card entry) otherwise; the card is returned unchanged."""
    defaults = card.get("inference_defaults", {}) or {}
    if "method" in defaults:
        served = methods_for_network(card["method"])
        if defaults["method"] not in served:
            raise CheckpointError(f"model card: inference_defaults.method must be one of the methods its network "
                                  f"serves ({', '.join(served)}), got {defaults['method']!r}.")
    limit = int(card["scheduler"]["num_train_timesteps"]) - 1
    for name, spec in METHODS.items():
        if spec.card_defaults and spec.card_defaults in defaults:
            try:
                resolve_parameters(name, {}, card, limit)
            except ValueError as exc:
                raise CheckpointError(str(exc)) from None
    return card


def unknown_owner(names: list[str]) -> str:
    """Which methods take the parameters ``names``, in words ("'tau' belongs to cdm, cg-cdm"), or ""."""
    parts = []
    for key in names:
        owners = [m for m, spec in METHODS.items() if key in spec.parameter_names]
        if owners:
            parts.append(f"{key!r} belongs to {', '.join(owners)}")
    return "; ".join(parts)


def parameter_words(name: str, params: dict[str, Any]) -> str:
    """A run's parameters in words for reports and logs: "noise level D 150, guidance scale w 14, DDIM steps 20"."""
    spec = method_spec(name)
    words = []
    for p in spec.parameters:
        if p.name in params:
            value = params[p.name]
            words.append(f"{p.words} {value:g}" if isinstance(value, float) else f"{p.words} {value}")
    return ", ".join(words)


__all__ = ["BASELINES", "check_card_sections", "METHODS", "MethodSpec", "Parameter", "RECOMPUTE_ALL", "RECOMPUTE_DECODE", "method_defaults",
           "card_methods", "default_method", "method_spec", "methods_for_network", "parameter_words", "resolve_parameters", "served_method",
           "unknown_owner"]
