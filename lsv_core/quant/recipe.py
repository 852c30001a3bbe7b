"""Per-layer bit widths: :class:`BitRecipe` (what to quantize) and :class:`QuantPolicy` (rules that edit one).

A recipe maps a layer name (``model.named_modules()`` name, WeSpeaker layout: ``conv1``,
``layer1.0.conv1``, ``layer2.0.shortcut.0``, ``seg_1``) to a :class:`LayerSpec`: ``b`` bits (2^b k-means
centroids; b in 1, 2, 3, 4, 8) and, for 1 bit, the binary scheme (``"static"`` or ``"adaptive"``, see
``lsv_core/quant/binary.py``). A layer left out stays float32.

Recipes are immutable and hashable and have one canonical JSON text (sorted keys, no spaces), so
``digest()`` can key caches of trained models and evaluations. They round-trip through JSON and TOML::

    format = "lsv-bit-recipe/1"

    [layers]
    "conv1" = 8
    "layer1.0.conv1" = 4
    "layer2.0.conv1" = { bits = 1, mode = "adaptive" }
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from torch import nn

from lsv_core.atomic import write_text_atomic
from lsv_core.errors import ConfigError

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: the same parser from PyPI
    import tomli as tomllib  # type: ignore[no-redef]

__all__ = [
    "ALLOWED_BITS",
    "DEFAULT_BINARY_MODE",
    "BitRecipe",
    "LayerSpec",
    "QuantPolicy",
    "apply_policy",
    "binary_modes",
    "quantizable_layers",
    "register_quantizer",
    "shortcut_owner",
]

# Multi-bit widths use the k-means codebook quantizer (any width 2..8 works); adding one here is all it takes.
ALLOWED_BITS: tuple[int, ...] = (1, 2, 3, 4, 8)
# A bare 1 means adaptive: the paper reports the adaptive binary scheme as the stronger one (docs/method.md).
DEFAULT_BINARY_MODE = "adaptive"
RECIPE_FORMAT = "lsv-bit-recipe/1"
# Module names (any dotted component) of training-only heads, never quantized nor exported.
TRAINING_ONLY_MODULES: tuple[str, ...] = ("projection",)
# The scheme name of multi-bit layers in the quantizer registry; 1-bit layers use their binary mode's name.
KMEANS_SCHEME = "kmeans"

_QUANTIZABLE_TYPES = (nn.Conv1d, nn.Conv2d, nn.Linear)
_SHORTCUT_RE = re.compile(r"^(?P<block>.+)\.(?:shortcut|downsample)\.0$")

BinaryMode = Literal["static", "adaptive"]

# scheme -> (quantizer class, token letter for 1 bit). Filled by ``register_quantizer`` when the quantizer
# modules are imported (``lsv_core.quant`` imports them first), as torchao registers a handler per config.
_QUANTIZERS: dict[str, tuple[type, str]] = {}


def register_quantizer(scheme: str, *, token_letter: str = "") -> Callable[[type], type]:
    """Class decorator: ``scheme`` is :data:`KMEANS_SCHEME` (every multi-bit width) or a 1-bit mode name,
    whose token is ``"1" + token_letter``. A new binary mode is one decorated class, nothing else."""

    def wrap(cls: type) -> type:
        if scheme != KMEANS_SCHEME and (len(token_letter) != 1 or not token_letter.isalpha()):
            raise ValueError(f"binary mode {scheme!r} needs a one-letter token_letter")
        taken = {letter: name for name, (_, letter) in _QUANTIZERS.items() if letter}
        if token_letter and taken.get(token_letter, scheme) != scheme:
            raise ValueError(f"token letter {token_letter!r} is taken by mode {taken[token_letter]!r}")
        _QUANTIZERS[scheme] = (cls, token_letter)
        return cls

    return wrap


def binary_modes() -> tuple[str, ...]:
    """The registered 1-bit schemes (``"static"``, ``"adaptive"``), in registration order."""
    return tuple(name for name in _QUANTIZERS if name != KMEANS_SCHEME)


def _allowed_text() -> str:
    return f"allowed bits: {list(ALLOWED_BITS)}; 1-bit modes: {list(binary_modes())}"


def shortcut_owner(name: str, layers: Iterable[str]) -> str | None:
    """The ``conv1`` of the block whose 1x1 projection shortcut is ``name``, when it is among ``layers``."""
    match = _SHORTCUT_RE.match(name)
    if match is None:
        return None
    owner = f"{match['block']}.conv1"
    return owner if owner in set(layers) else None


@dataclass(frozen=True, order=True)
class LayerSpec:
    """Quantization of one layer: ``bits`` (1, 2, 3, 4 or 8) and, only for 1 bit, ``mode``.

    ``LayerSpec(1)`` gets ``mode="adaptive"``; a mode with more than 1 bit is an error (multi-bit layers
    always use a k-means codebook of 2^bits centroids).
    """

    bits: int
    mode: BinaryMode | None = None

    def __post_init__(self) -> None:
        if isinstance(self.bits, bool) or not isinstance(self.bits, int) or self.bits not in ALLOWED_BITS:
            raise ConfigError(f"bits={self.bits!r} is not allowed; {_allowed_text()}")
        if self.bits == 1:
            if self.mode is None:
                object.__setattr__(self, "mode", DEFAULT_BINARY_MODE)
            elif self.mode not in binary_modes():
                raise ConfigError(f"mode={self.mode!r} is not allowed for 1 bit; {_allowed_text()}")
        elif self.mode is not None:
            raise ConfigError(f"mode={self.mode!r} given with bits={self.bits}; a mode only applies to 1 bit")

    @classmethod
    def parse(cls, value: SpecLike, *, layer: str = "?") -> LayerSpec | None:
        """Read one recipe entry; None (or ``"float"``) means the layer stays float. Errors name ``layer``."""
        try:
            if value is None or value == "float":
                return None
            if isinstance(value, LayerSpec):
                return value
            if isinstance(value, Mapping):
                unknown = set(value) - {"bits", "mode"}
                if unknown or "bits" not in value:
                    raise ConfigError(f"expected {{'bits': b[, 'mode': m]}}, got {dict(value)!r}")
                return cls(value["bits"], value.get("mode"))
            if isinstance(value, (tuple, list)):
                if len(value) != 2:
                    raise ConfigError(f"expected (bits, mode), got {value!r}")
                return cls(value[0], value[1])
            return cls(value)  # type: ignore[arg-type]
        except ConfigError as err:
            raise ConfigError(f"recipe layer {layer!r}: {err}") from None
        except TypeError:
            raise ConfigError(f"recipe layer {layer!r}: cannot read {value!r}; {_allowed_text()}") from None

    def to_json_value(self) -> int | dict[str, Any]:
        """``bits`` as a plain int, or ``{"bits": 1, "mode": ...}`` for 1 bit."""
        return self.bits if self.bits > 1 else {"bits": 1, "mode": self.mode}

    @property
    def n_levels(self) -> int:
        """Number of quantization levels, 2^bits."""
        return 2**self.bits

    @property
    def scheme(self) -> str:
        """The quantizer registry key: :data:`KMEANS_SCHEME` for multi-bit layers, else the binary mode."""
        return KMEANS_SCHEME if self.bits > 1 else str(self.mode)

    @property
    def quantizer_class(self) -> type:
        """The :class:`~lsv_core.quant.codebook.WeightQuantizer` subclass registered for this spec."""
        return _QUANTIZERS[self.scheme][0]

    @property
    def token(self) -> str:
        """Short text form used by search params, MLflow params and plots: ``"4"``, ``"1a"``, ``"1s"``."""
        return str(self.bits) if self.bits > 1 else "1" + _QUANTIZERS[self.scheme][1]

    @classmethod
    def from_token(cls, token: str) -> LayerSpec:
        """Inverse of :attr:`token`; a bare ``"1"`` is the default binary mode."""
        text = str(token)
        if len(text) == 2 and text[0] == "1" and text[1].isalpha():
            for name, (_, letter) in _QUANTIZERS.items():
                if letter == text[1]:
                    return cls(1, name)  # type: ignore[arg-type]
        elif text.isdigit():
            return cls(int(text))
        raise ConfigError(f"bit token {text!r} is not valid; use one of "
                          f"{[str(b) for b in ALLOWED_BITS if b > 1] + ['1' + letter for _, letter in _QUANTIZERS.values() if letter]}")


# What callers may write for one layer: 4, (1, "static"), {"bits": 1, "mode": "adaptive"}, a LayerSpec,
# or None (float: the layer is left out).
SpecLike = int | tuple[int, str] | Mapping[str, Any] | LayerSpec | None


class BitRecipe(Mapping[str, LayerSpec]):
    """Immutable mapping layer name -> :class:`LayerSpec`; layers not listed stay float32.

    Build from a mapping whose values are what :meth:`LayerSpec.parse` reads (4, ``(1, "static")``,
    ``{"bits": 1, "mode": "adaptive"}``, None for float). Iteration is in sorted name order. Equal recipes
    have equal hashes, the same :meth:`to_json` text and the same :meth:`digest`.
    """

    __slots__ = ("_items",)
    _items: tuple[tuple[str, LayerSpec], ...]

    def __init__(self, layers: Mapping[str, SpecLike] | Iterable[tuple[str, SpecLike]] | None = None) -> None:
        pairs = layers.items() if isinstance(layers, Mapping) else (layers or ())
        parsed: dict[str, LayerSpec] = {}
        for name, value in pairs:
            if not isinstance(name, str) or not name:
                raise ConfigError(f"recipe layer name {name!r} should be a non-empty string")
            if name in parsed:
                raise ConfigError(f"recipe layer {name!r} is given twice")
            spec = LayerSpec.parse(value, layer=name)
            if spec is not None:
                parsed[name] = spec
        object.__setattr__(self, "_items", tuple(sorted(parsed.items())))

    def __setattr__(self, key: str, value: Any) -> None:
        raise AttributeError("BitRecipe is immutable; use replace() to derive a new one")

    # -- Mapping -----------------------------------------------------------------------------------
    def __getitem__(self, name: str) -> LayerSpec:
        for key, spec in self._items:
            if key == name:
                return spec
        raise KeyError(name)

    def __iter__(self) -> Iterator[str]:
        return (name for name, _ in self._items)

    def __len__(self) -> int:
        return len(self._items)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, BitRecipe) and self._items == other._items

    def __hash__(self) -> int:
        return hash(self._items)

    def __repr__(self) -> str:
        return f"BitRecipe({self.to_dict()!r})"

    def __reduce__(self) -> tuple[Any, ...]:
        return (BitRecipe, (dict(self._items),))

    # -- queries -----------------------------------------------------------------------------------
    def bits(self, name: str) -> int | None:
        """Bit width of ``name``, or None if it stays float."""
        spec = self.get(name)
        return None if spec is None else spec.bits

    def replace(self, updates: Mapping[str, SpecLike]) -> BitRecipe:
        """A new recipe with ``updates`` applied; a value of None makes that layer float."""
        merged: dict[str, SpecLike] = dict(self._items)
        for name, value in updates.items():
            spec = LayerSpec.parse(value, layer=name)
            if spec is None:
                merged.pop(name, None)
            else:
                merged[name] = spec
        return BitRecipe(merged)

    def validate(self, model: nn.Module) -> None:
        """Raise ConfigError unless every layer of the recipe is a quantizable layer of ``model``."""
        valid = quantizable_layers(model)
        valid_set = set(valid)
        unknown = [name for name in self if name not in valid_set]
        if unknown:
            shown = ", ".join(valid[:8]) + (f", ... ({len(valid)} in all)" if len(valid) > 8 else "")
            arch = getattr(model, "arch", {}).get("name", type(model).__name__)
            raise ConfigError(
                f"recipe layer(s) {unknown[:5]}{' ...' if len(unknown) > 5 else ''} not quantizable in {arch}; "
                f"valid layers: {shown}; {_allowed_text()}"
            )

    # -- constructors ------------------------------------------------------------------------------
    @classmethod
    def uniform(
        cls,
        model: nn.Module,
        bits: int,
        mode: BinaryMode | None = None,
        keep: Mapping[str, SpecLike] | None = None,
    ) -> BitRecipe:
        """Every quantizable layer of ``model`` at ``bits`` (``mode`` for 1 bit), except the ``keep`` overrides.

        ``keep`` maps a layer to another spec or to None (float), e.g. ``keep={"conv1": None, "seg_1": 8}``.
        """
        spec = LayerSpec(bits, mode)
        layers: dict[str, SpecLike] = dict.fromkeys(quantizable_layers(model), spec)
        recipe = cls(layers)
        if keep:
            unknown = [name for name in keep if name not in layers]
            if unknown:
                raise ConfigError(
                    f"keep names unknown layer(s) {unknown}; valid layers: {list(layers)[:8]} ..."
                )
            recipe = recipe.replace(keep)
        return recipe

    # -- serialisation -----------------------------------------------------------------------------
    def to_dict(self) -> dict[str, int | dict[str, Any]]:
        """Plain JSON-ready dict layer -> bits (or ``{"bits": 1, "mode": ...}``), sorted by name."""
        return {name: spec.to_json_value() for name, spec in self._items}

    def to_json(self) -> str:
        """Canonical JSON text: sorted keys, no whitespace (what :meth:`digest` hashes)."""
        return json.dumps(
            {"format": RECIPE_FORMAT, "layers": self.to_dict()}, sort_keys=True, separators=(",", ":")
        )

    @classmethod
    def from_json(cls, text: str) -> BitRecipe:
        """Read :meth:`to_json` output, or a bare JSON object layer -> spec."""
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise ConfigError(f"recipe JSON is malformed: {err}") from None
        return cls.from_mapping(data)

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any]) -> BitRecipe:
        """From a parsed document: ``{"format": ..., "layers": {...}}`` or a bare mapping layer -> spec.

        Nested tables are flattened with dots (TOML turns an unquoted ``layer1.0.conv1 = 4`` into them).
        """
        if not isinstance(data, Mapping):
            raise ConfigError(f"a recipe should be a table/object, got {type(data).__name__}")
        fmt = data.get("format")
        if fmt is not None and fmt != RECIPE_FORMAT:
            raise ConfigError(f"recipe format={fmt!r} is not supported; expected {RECIPE_FORMAT!r}")
        layers = data["layers"] if "layers" in data else {k: v for k, v in data.items() if k != "format"}
        if not isinstance(layers, Mapping):
            raise ConfigError(f"recipe 'layers' should be a table/object, got {type(layers).__name__}")
        return cls(_flatten(layers))

    def to_toml(self) -> str:
        """TOML text (a ``[layers]`` table with quoted names) that :meth:`from_toml` reads back."""
        lines = [
            "# Bit widths per layer; layers not listed stay float32.",
            f'format = "{RECIPE_FORMAT}"',
            "",
            "[layers]",
        ]
        for name, spec in self._items:
            key = json.dumps(name)  # a TOML basic string: quoted, since names contain dots
            value = str(spec.bits) if spec.bits > 1 else f'{{ bits = 1, mode = "{spec.mode}" }}'
            lines.append(f"{key} = {value}")
        return "\n".join(lines) + "\n"

    @classmethod
    def from_toml(cls, text: str) -> BitRecipe:
        """Read :meth:`to_toml` output (or any TOML with a ``[layers]`` table)."""
        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as err:
            raise ConfigError(f"recipe TOML is malformed: {err}") from None
        return cls.from_mapping(data)

    def save(self, path: str | os.PathLike[str], *, overwrite: bool = False) -> Path:
        """Write as TOML (``.toml``) or JSON (any other suffix), atomically."""
        path = Path(path)
        text = self.to_toml() if path.suffix == ".toml" else self.to_json() + "\n"
        return write_text_atomic(path, text, overwrite=overwrite)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> BitRecipe:
        """Read a recipe file written by :meth:`save` (format chosen by suffix)."""
        path = Path(path)
        try:
            text = path.read_text()
        except OSError as err:
            raise ConfigError(f"cannot read recipe file {path}: {err}") from None
        try:
            return cls.from_toml(text) if path.suffix == ".toml" else cls.from_json(text)
        except ConfigError as err:
            raise ConfigError(f"{path}: {err}") from None

    def digest(self) -> str:
        """SHA-256 (hex) of :meth:`to_json`: a stable key for memoising trained/evaluated recipes."""
        return hashlib.sha256(self.to_json().encode()).hexdigest()


def _flatten(table: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in table.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and "bits" not in value:
            out.update(_flatten(value, prefix=f"{name}."))
        else:
            out[name] = value
    return out


def quantizable_layers(model: nn.Module) -> list[str]:
    """Names of the Conv1d/Conv2d/Linear modules of the embedding network, in definition order.

    docs/method.md: every Conv/Linear weight of the embedding network is quantized, including the embedding
    Linear ``seg_1``; training-only heads (any module under a ``projection`` component) are not.
    """
    names = []
    for name, module in model.named_modules():
        if not name or not isinstance(module, _QUANTIZABLE_TYPES):
            continue
        if any(part in TRAINING_ONLY_MODULES for part in name.split(".")):
            continue
        names.append(name)
    return names


# ----------------------------------------------------------------------------------------------- policies

KEEP_AS_RECIPE = "recipe"


@dataclass(frozen=True)
class QuantPolicy:
    """Rules applied on top of a recipe by :func:`apply_policy` (each off by default).

    Attributes:
        first_layer: spec for the first quantizable layer (``conv1``): bits, ``(1, mode)``, None for float,
            or ``"recipe"`` to leave it as the recipe says. The first layer has few weights but sees the
            raw features, so keeping it precise is a common choice.
        embedding_layers: spec for the layers after the statistics pooling (``seg_1``, ``seg_2``; ECAPA's
            ``linear``; CAM++'s ``xvector.dense.linear``), same values. ``seg_1`` is about 20 % of ResNet34's weights, so this trades size for accuracy.
        tie_shortcuts: the 1x1 projection shortcut ``layerX.Y.shortcut.0`` (or ``downsample.0``) gets the
            spec of its block's ``layerX.Y.conv1``, float if that one is float; keeps a residual block at
            one precision and shrinks the search space.
    """

    first_layer: Any = KEEP_AS_RECIPE
    embedding_layers: Any = KEEP_AS_RECIPE
    tie_shortcuts: bool = False

    def __post_init__(self) -> None:
        for field in ("first_layer", "embedding_layers"):
            value = getattr(self, field)
            if value != KEEP_AS_RECIPE:
                LayerSpec.parse(value, layer=f"QuantPolicy.{field}")
        if not isinstance(self.tie_shortcuts, bool):
            raise ConfigError(f"QuantPolicy.tie_shortcuts={self.tie_shortcuts!r} should be true or false")

    def replace(self, **changes: Any) -> QuantPolicy:
        return dataclasses.replace(self, **changes)


def embedding_layers(model: nn.Module) -> list[str]:
    """The segment-level layers: quantizable layers after the model's statistics pooling ``pool`` (WeSpeaker's
    ``seg_*``, ECAPA-TDNN's ``linear``, CAM++'s 1x1 ``xvector.dense.linear``); for a model without ``pool``,
    the Linear layers after the last quantizable convolution."""
    layers = quantizable_layers(model)
    pool = getattr(model, "pool", None)
    if isinstance(pool, nn.Module):
        order = [name for name, _ in model.named_modules()]
        # named_modules lists a module once, under its first name (CAM++ also registers it as xvector.stats)
        pool_name = next(name for name, module in model.named_modules() if module is pool)
        start = order.index(pool_name)
        return [n for n in layers if order.index(n) > start and not n.startswith(f"{pool_name}.")]
    modules = dict(model.named_modules())
    last_conv = max(
        (i for i, n in enumerate(layers) if isinstance(modules[n], (nn.Conv1d, nn.Conv2d))), default=-1
    )
    return [n for n in layers[last_conv + 1 :] if isinstance(modules[n], nn.Linear)]


def apply_policy(
    recipe: BitRecipe | Mapping[str, SpecLike], model: nn.Module, policy: QuantPolicy
) -> BitRecipe:
    """The recipe with ``policy`` applied for ``model`` (first layer, embedding layers, then shortcut ties)."""
    recipe = recipe if isinstance(recipe, BitRecipe) else BitRecipe(recipe)
    layers = quantizable_layers(model)
    updates: dict[str, SpecLike] = {}
    if policy.first_layer != KEEP_AS_RECIPE and layers:
        updates[layers[0]] = policy.first_layer
    if policy.embedding_layers != KEEP_AS_RECIPE:
        for name in embedding_layers(model):
            updates[name] = policy.embedding_layers
    recipe = recipe.replace(updates)
    if policy.tie_shortcuts:
        ties: dict[str, SpecLike] = {}
        for name in layers:
            owner = shortcut_owner(name, layers)
            if owner is not None:
                ties[name] = recipe.get(owner)
        recipe = recipe.replace(ties)
    return recipe
