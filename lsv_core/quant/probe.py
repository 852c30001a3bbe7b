"""One-shot probes: what quantizing one unit alone does to the verification score (issue 14).

The Hessian proxy Ω (:mod:`lsv_core.quant.sensitivity`) is a second-order estimate of the *training*
loss's increase. On the embedded benchmark its order of "EER cost per byte saved" has rank correlation
+0.05 with the trials' (BENCHMARKS.md, ``bench/proxy_check.py``): it calls the embedding layer the most
sensitive per byte where quantizing it costs almost nothing, and the stem conv cheap where it is not.
A probe measures instead: every unit sits at a *context* width (4 bit, lossless in the paper and on the
benchmark) except one, quantized one-shot (k-means, no fine-tuning) to a probed width, and the model is
scored on the evaluation trials. ``damage = score(probe) - score(context)``.

Probes are few on purpose: each unit at every 1-bit mode and at its lowest multi-bit width (2 bit for
the usual choices), which is where the damage is large enough to rank units. The other widths are
estimated by :func:`estimated_damage`: the multi-bit probe calibrates a per-unit slope of damage over
k-means error (what Ω calls the Hessian trace, measured on the score instead of estimated on the loss),
applied to that unit's k-means error at each width. A 1-bit width is never extrapolated (the binary
quantizers are not k-means); it is always probed.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from torch import nn

from lsv_core.errors import ConfigError
from lsv_core.quant.quantize import quantize
from lsv_core.quant.recipe import BitRecipe, LayerSpec

__all__ = ["ProbeResult", "context_token", "estimated_damage", "probe_tokens", "probe_units"]

Score = Callable[[nn.Module], float]


@dataclass(frozen=True)
class ProbeResult:
    """Measured one-shot damages. ``damage[unit][token]``: score with that unit alone at ``token`` minus
    ``reference`` (the score with every unit at ``context``), in the score's unit (EER percent)."""

    context: str
    reference: float
    damage: dict[str, dict[str, float]]
    wall_s: float = 0.0
    threads: int = 1  # CPU threads the probes ran with (what they cost, next to a trial's)
    settings: dict[str, Any] = field(default_factory=dict)  # how they were scored (frames, trials)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ProbeResult:
        try:
            return cls(context=str(data["context"]), reference=float(data["reference"]),
                       damage={str(u): {str(t): float(v) for t, v in d.items()} for u, d in data["damage"].items()},
                       wall_s=float(data.get("wall_s", 0.0)), threads=int(data.get("threads", 1)),
                       settings=dict(data.get("settings") or {}))
        except (KeyError, TypeError, ValueError, AttributeError) as err:
            raise ConfigError(f"not a probe result ({type(err).__name__}: {err})") from None


def context_token(choices: Sequence[str]) -> str:
    """The width every other unit holds during a probe: 4 bit when it is a choice (lossless on every
    benchmark we ran), else the widest multi-bit choice below 4 bit, else the narrowest one above it."""
    specs = {t: LayerSpec.from_token(t) for t in choices}
    multi = [t for t, s in specs.items() if s.bits > 1]
    below = [t for t in multi if specs[t].bits <= 4]
    if below:
        return max(below, key=lambda t: specs[t].bits)
    if multi:
        return min(multi, key=lambda t: specs[t].bits)
    raise ConfigError(f"probes need a multi-bit choice to hold the other units at; choices are {list(choices)}")


def probe_tokens(choices: Sequence[str], context: str) -> tuple[str, ...]:
    """The widths probed: every 1-bit choice and the lowest multi-bit choice below ``context``."""
    specs = {t: LayerSpec.from_token(t) for t in choices}
    binary = [t for t in choices if specs[t].bits == 1]
    lower = [t for t in choices if 1 < specs[t].bits < specs[context].bits]
    return tuple(binary + ([min(lower, key=lambda t: specs[t].bits)] if lower else []))


def probe_units(model: nn.Module, units: Mapping[str, Sequence[str]], choices: Sequence[str], score: Score, *,
                codebooks: Any = None, progress: bool = False,
                settings: Mapping[str, Any] | None = None) -> ProbeResult:
    """Probe every unit of ``units`` (name -> its layers, tied ones included) at :func:`probe_tokens`.

    ``model`` is the float baseline (not changed: each probe quantizes a copy); ``score`` maps a model to
    the number to minimise (EER in percent); ``codebooks``: the baseline's cached initial codebooks
    (:class:`lsv_core.quant.InitialCodebooks`), so no probe runs k-means again.
    """
    import torch

    context = context_token(choices)
    tokens = probe_tokens(choices, context)
    layers = [n for ls in units.values() for n in ls]
    if len(set(layers)) != len(layers):
        raise ConfigError("probe_units: a layer belongs to two units")
    t0 = time.monotonic()

    def scored(overrides: Mapping[str, str]) -> float:
        recipe = BitRecipe({n: LayerSpec.from_token(overrides.get(u, context)) for u, ls in units.items() for n in ls})
        return float(score(quantize(copy.deepcopy(model), recipe, codebooks=codebooks)))

    from tqdm import tqdm

    jobs = [(u, t) for u in units for t in tokens]
    damage: dict[str, dict[str, float]] = {u: {} for u in units}
    with tqdm(total=len(jobs) + 1, desc="probing units", unit="probe", disable=not progress) as bar:
        reference = scored({})
        bar.update()
        for u, t in jobs:
            damage[u][t] = scored({u: t}) - reference
            bar.update()
    return ProbeResult(context, reference, damage, wall_s=time.monotonic() - t0, threads=torch.get_num_threads(),
                       settings=dict(settings or {}))


def estimated_damage(probe: ProbeResult, errors: Mapping[str, Mapping[int, float]],
                     choices: Sequence[str]) -> dict[str, dict[str, float]]:
    """Damage of every (unit, choice): measured where probed, 0 at the context, else the unit's slope
    (its multi-bit probe's damage over its k-means error increase, never negative) times its k-means error
    increase at that width (negative above the context: more bits, a little less damage).

    ``errors[unit][bits]``: the unit's summed k-means error at each multi-bit width
    (:func:`lsv_core.quant.sensitivity.quantization_errors`, summed over the unit's layers).
    """
    ctx_bits = LayerSpec.from_token(probe.context).bits
    out: dict[str, dict[str, float]] = {}
    for unit, measured in probe.damage.items():
        err = errors[unit]
        multi = [(LayerSpec.from_token(t).bits, d) for t, d in measured.items() if LayerSpec.from_token(t).bits > 1]
        slope = 0.0
        if multi:
            bits, d = multi[0]
            gap = float(err[bits]) - float(err[ctx_bits])
            slope = max(0.0, d) / gap if gap > 0 else 0.0
        row: dict[str, float] = {}
        for t in choices:
            spec = LayerSpec.from_token(t)
            if t in measured:
                row[t] = float(measured[t])
            elif t == probe.context:
                row[t] = 0.0
            elif spec.bits == 1:
                raise ConfigError(f"unit {unit!r} has no probe at {t!r}; 1-bit widths are never extrapolated")
            else:
                row[t] = slope * (float(err[spec.bits]) - float(err[ctx_bits]))
        out[unit] = row
    return out
