"""The search space: one categorical bit-width choice per unit (a layer, a residual block or a stage).

Choices are tokens: ``"8"``, ``"4"``, ``"3"``, ``"2"`` and, for 1 bit, ``"1a"`` (adaptive) / ``"1s"``
(static). Tied projection shortcuts follow their block's ``conv1`` and are not searched separately;
``fixed`` layers keep the bits the config gives them (None = float).

Blocks and stages, by layer name (:data:`_UNITS`; README "Models"): ResNet ``layer2.1`` / ``layer2``;
DF-ResNet ``stages.1.0`` / ``stages.1``; ECAPA-TDNN: a block is one of an SE-Res2Block's four parts
(``layer2.se_res2block.1``, the seven Res2Net convs; ``.0``/``.2`` the 1x1 convs; ``.3`` the SE Linears),
a stage the SE-Res2Block (``layer2``), and the attentive pooling's two convs are one unit (``pool``) at
both; CAM++: a block is one CAM dense layer (``xvector.block1.tdnnd3``, its 1x1 bottleneck, local conv
and the two mask convs) or one FCM residual block (``head.layer1.0``), a stage a dense block
(``xvector.block1``) or an FCM stage (``head.layer1``). Anything else (stems, transit layers, the
aggregation conv, embedding layers) is a unit of its own at every granularity.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from optuna.distributions import CategoricalDistribution
from torch import nn

from lsv_core.errors import ConfigError
from lsv_core.quant import BitRecipe, quantizable_layers, shortcut_owner
from lsv_core.quant.recipe import LayerSpec
from search.config import SpaceSection

__all__ = ["SearchSpace"]

# Each pattern names a layer's block (the whole prefix) and stage; the first that matches wins.
_UNITS: tuple[re.Pattern[str], ...] = (
    # ResNet, DF-ResNet, CAM++'s FCM head: numbered residual blocks inside numbered stages
    re.compile(r"^(?P<block>(?P<stage>(?:head\.)?layer\d+|downsample_layers\.\d+|stages\.\d+)\.\d+)\."),
    # ECAPA-TDNN: the four parts of an SE-Res2Block
    re.compile(r"^(?P<block>(?P<stage>layer\d+)\.se_res2block\.\d+)\."),
    # CAM++: CAM dense layers inside dense blocks
    re.compile(r"^(?P<block>(?P<stage>xvector\.block\d+)\.tdnnd\d+)\."),
    # attentive statistics pooling: its two 1x1 convs
    re.compile(r"^(?P<block>(?P<stage>pool))\."),
)


def _unit_name(layer: str, granularity: str) -> str:
    if granularity == "layer":
        return layer
    for pattern in _UNITS:
        m = pattern.match(layer)
        if m is not None:
            return m["block"] if granularity == "block" else m["stage"]
    return layer  # stem conv and embedding layers are units of their own


@dataclass(frozen=True)
class SearchSpace:
    units: dict[str, list[str]]  # unit -> layers it sets, in model order
    choices: tuple[str, ...]  # tokens, smallest first
    fixed: dict[str, LayerSpec | None]
    tied: dict[str, str]  # shortcut layer -> layer whose spec it copies

    @classmethod
    def build(cls, model: nn.Module, space: SpaceSection) -> SearchSpace:
        layers = quantizable_layers(model)
        unknown = [name for name in space.fixed if name not in layers]
        if unknown:
            raise ConfigError(f"space.fixed names unknown layer(s) {unknown}; valid layers: {layers[:8]} "
                              f"... ({len(layers)} in all)")
        fixed = {n: (None if b is None else LayerSpec(b)) for n, b in space.fixed.items()}
        tied: dict[str, str] = {}
        if space.tie_shortcuts:
            for name in layers:
                owner = shortcut_owner(name, layers)
                if owner is not None and name not in fixed:
                    tied[name] = owner
        units: dict[str, list[str]] = {}
        for name in layers:
            if name in fixed or name in tied:
                continue
            units.setdefault(_unit_name(name, space.granularity), []).append(name)
        if not units:
            raise ConfigError("space: every layer is fixed; nothing left to search")
        tokens = [LayerSpec(b, m).token for b in space.bits
                  for m in (sorted(space.binary_modes, reverse=True) if b == 1 else [None])]
        return cls(units, tuple(tokens), fixed, tied)

    # -- Optuna --------------------------------------------------------------------------------------
    def distributions(self) -> dict[str, CategoricalDistribution]:
        return {f"b:{u}": CategoricalDistribution(list(self.choices)) for u in self.units}

    def unit_layers(self) -> dict[str, list[str]]:
        """Every unit's layers, the shortcuts tied to them included (what a unit's choice quantizes)."""
        return {u: list(ls) + [s for s, owner in self.tied.items() if owner in ls] for u, ls in self.units.items()}

    def recipe_from_params(self, params: Mapping[str, str]) -> BitRecipe:
        mapping: dict[str, LayerSpec | None] = dict(self.fixed)
        for unit, layers in self.units.items():
            token = params[f"b:{unit}"]
            if token not in self.choices:
                raise ConfigError(f"b:{unit}={token!r} is not a choice; allowed: {list(self.choices)}")
            for layer in layers:
                mapping[layer] = LayerSpec.from_token(token)
        for short, owner in self.tied.items():
            mapping[short] = mapping.get(owner)
        return BitRecipe({k: v for k, v in mapping.items() if v is not None})

    def params_from_recipe(self, recipe: BitRecipe) -> dict[str, str]:
        """Optuna params for a recipe that assigns one spec per unit (seeds, repaired recipes)."""
        params = {}
        for unit, layers in self.units.items():
            spec = recipe.get(layers[0])
            if spec is None or spec.token not in self.choices:
                raise ConfigError(f"recipe gives {layers[0]} {spec}, not one of the choices {list(self.choices)}")
            params[f"b:{unit}"] = spec.token
        return params

    def uniform(self, token: str) -> BitRecipe:
        return self.recipe_from_params({f"b:{u}": token for u in self.units})

    def repair(self, params: Mapping[str, str], budget_bytes: int,
               size_of: Callable[[BitRecipe], int]) -> dict[str, str] | None:
        """Step units down one choice at a time, biggest byte saving first, until the recipe fits.

        Returns the repaired params (unchanged if they already fit) or None if even the smallest
        choice everywhere is over budget. Deterministic: ties go to the unit listed first.
        """
        params = dict(params)
        size = size_of(self.recipe_from_params(params))
        while size > budget_bytes:
            best: tuple[int, str, str] | None = None
            for unit in self.units:
                key = f"b:{unit}"
                i = self.choices.index(params[key])
                if i == 0:
                    continue
                trial = {**params, key: self.choices[i - 1]}
                saved = size - size_of(self.recipe_from_params(trial))
                if best is None or saved > best[0]:
                    best = (saved, key, self.choices[i - 1])
            if best is None:
                return None
            params[best[1]] = best[2]
            size -= best[0]
        return params
