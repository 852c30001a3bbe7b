"""``quantize(model, recipe)``: attach codebook quantizers in place, and the helpers around quantized models.

The quantizers are ``torch.nn.utils.parametrize`` parametrizations of each layer's ``weight`` (why: see
``lsv_core/quant/codebook.py``). A training loop calls :func:`recluster_all` after each optimizer step
with the step count, which re-generates the k-means centroids every ``KMQATConfig.recluster_every`` steps.

Checkpoints: ``model.state_dict()`` of a quantized model holds the latent weights and the quantizers'
tensors under ``<layer>.parametrizations.weight.*``; to restore one, quantize a fresh model with the same
recipe (:func:`recipe_of`) and ``load_state_dict``. ``dequantized_state_dict`` gives the plain layout and
``lsv_core.export.save_packed`` the deployable file. (Whole-module pickling, ``torch.save(model)``, is
not supported by PyTorch for parametrized modules.)
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from lsv_core.quant.codebook import KMQATConfig, WeightQuantizer
from lsv_core.quant.initial_codebooks import InitialCodebooks
from lsv_core.quant.kmeans import kmeans_1d
from lsv_core.quant.recipe import BitRecipe, LayerSpec, SpecLike

__all__ = [
    "dequantized_state_dict",
    "is_quantized",
    "latent_weight",
    "layer_codebooks",
    "make_quantizer",
    "plain_state_items",
    "quantize",
    "quantized_layers",
    "quantizer_of",
    "recipe_of",
    "recluster_all",
]


def make_quantizer(weight: Tensor, spec: LayerSpec, config: KMQATConfig, seed: int = 0, *,
                   name: str | None = None, codebooks: InitialCodebooks | None = None) -> WeightQuantizer:
    """The quantizer registered for ``spec``, initialised from ``weight`` (k-means / 2-means / nothing for
    static); with ``codebooks`` (and the layer's ``name``) the k-means result may come from that cache."""
    cls = spec.quantizer_class
    centroids = None
    if cls.clustered:
        if codebooks is not None and name is not None:
            centroids = codebooks.centroids(name, weight, spec.n_levels, seed=seed, max_iter=config.kmeans_max_iter)
        else:
            centroids, _ = kmeans_1d(weight.detach(), spec.n_levels, seed=seed, max_iter=config.kmeans_max_iter)
    return cls.initial(weight, spec.bits, config, centroids)


def quantize(
    model: nn.Module,
    recipe: BitRecipe | Mapping[str, SpecLike],
    *,
    seed: int = 0,
    config: KMQATConfig | None = None,
    codebooks: InitialCodebooks | None = None,
) -> nn.Module:
    """Quantize the recipe's layers of ``model`` in place and return ``model``.

    Each layer's weight becomes a latent weight plus a quantizer (k-means codebook of ``2^b`` centroids
    over that layer's weights, or a binary scheme for 1 bit). Layers not in the recipe are left as they
    are, so progressive schemes (MSFT) can call this once per stage: a layer already quantized with the
    same spec keeps its trained state (and config); one with a different spec is re-quantized from its
    latent weights.

    Args:
        model: a network from :func:`lsv_core.models.build_model` (any device); changed in place.
        recipe: layer -> bits / (1, mode); see :class:`BitRecipe`. Validated against ``model``.
        seed: passed to k-means (which is deterministic; kept for reproducibility records).
        config: training behaviour of the new quantizers; default :class:`KMQATConfig()`.
        codebooks: a cache of initial codebooks of the baseline (:class:`InitialCodebooks`); layers whose
            weights are the baseline's take their k-means result from it (identical values, less time).

    Raises:
        ConfigError: a recipe layer is not a quantizable layer of ``model``.
    """
    recipe = recipe if isinstance(recipe, BitRecipe) else BitRecipe(recipe)
    recipe.validate(model)
    config = config if config is not None else KMQATConfig()
    modules = dict(model.named_modules())
    for name, spec in recipe.items():
        module = modules[name]
        current = quantizer_of(module)
        if current is not None:
            if current.spec == spec:
                continue
            # Drop the old quantizer and go back to the latent weight before re-quantizing.
            parametrize.remove_parametrizations(module, "weight", leave_parametrized=False)
        quantizer = make_quantizer(module.weight, spec, config, seed=seed, name=name, codebooks=codebooks)
        # unsafe=True skips parametrize's consistency probe (an extra forward through k-means-sized work);
        # the quantizer returns a tensor of the weight's shape and dtype by construction.
        parametrize.register_parametrization(module, "weight", quantizer, unsafe=True)
    return model


def quantizer_of(module: nn.Module) -> WeightQuantizer | None:
    """The quantizer attached to ``module.weight``, or None."""
    if not parametrize.is_parametrized(module, "weight"):
        return None
    plist = module.parametrizations["weight"]
    for p in plist:
        if isinstance(p, WeightQuantizer):
            return p
    return None


def latent_weight(module: nn.Module) -> Tensor:
    """The float weight that trains (the parametrization's ``original``), or the plain weight if unquantized."""
    if parametrize.is_parametrized(module, "weight"):
        return module.parametrizations["weight"].original
    return module.weight


def quantized_layers(model: nn.Module) -> Iterator[tuple[str, nn.Module, WeightQuantizer]]:
    """``(name, module, quantizer)`` for every quantized layer, in definition order."""
    for name, module in model.named_modules():
        q = quantizer_of(module)
        if q is not None:
            yield name, module, q


def is_quantized(model: nn.Module) -> bool:
    """Whether any layer of ``model`` carries a quantizer."""
    return any(True for _ in quantized_layers(model))


def recipe_of(model: nn.Module) -> BitRecipe:
    """The recipe that describes the quantizers currently attached to ``model``."""
    return BitRecipe({name: q.spec for name, _, q in quantized_layers(model)})


@torch.no_grad()
def recluster_all(model: nn.Module, step: int | None = None, *, force: bool = False, seed: int = 0) -> int:
    """Re-generate k-means codebooks from the latent weights; returns how many layers were re-clustered.

    With ``step`` (optimizer steps done so far), a layer re-clusters only when its config's
    ``recluster_every`` divides ``step`` (and is > 0); without it, every eligible layer re-clusters now.
    Eligible: ``centroid_update`` is ``"kmeans"`` or ``"both"`` (or ``force=True``). Static binary layers
    have nothing to re-cluster (their scale is recomputed in every forward).
    """
    count = 0
    for _, module, q in quantized_layers(model):
        cfg = q.config
        if not force:
            if not cfg.uses_kmeans:
                continue
            if step is not None and (cfg.recluster_every == 0 or step % cfg.recluster_every != 0):
                continue
        if q.recluster(latent_weight(module), seed=seed):
            count += 1
    return count


@torch.no_grad()
def layer_codebooks(model: nn.Module) -> dict[str, tuple[Tensor, Tensor, int]]:
    """``{layer: (levels, indices, bits)}`` for every quantized layer.

    ``levels`` is the ascending codebook (``2^bits`` values; ``[-a, +a]`` for static binary), ``indices``
    a uint8 tensor of the weight's shape such that ``levels[indices.long()]`` equals ``module.weight``.
    """
    out: dict[str, tuple[Tensor, Tensor, int]] = {}
    for name, module, q in quantized_layers(model):
        latent = latent_weight(module)
        out[name] = (q.levels(latent), q.assign(latent), q.bits)
    return out


def plain_state_items(model: nn.Module) -> Iterator[tuple[str, Tensor, bool]]:
    """State-dict entries in the unquantized (WeSpeaker) layout: ``(key, tensor, is_latent)``.

    For a quantized layer the entry ``<layer>.weight`` carries the *latent* weight (``is_latent=True``);
    the quantizers' own tensors are skipped. Order follows ``model.state_dict()`` with each quantized
    layer's weight placed before its bias, as in the unquantized module.
    """
    owners = {name: module for name, module, _ in quantized_layers(model)}
    emitted: set[str] = set()
    for key, value in model.state_dict(keep_vars=True).items():
        owner = None
        if ".parametrizations.weight." in f".{key}":
            owner = "" if key.startswith("parametrizations.") else key.split(".parametrizations.weight.")[0]
            if owner not in owners:
                owner = None
        if owner is None:
            prefix = key.rpartition(".")[0]
            if prefix in owners and prefix not in emitted:  # WeSpeaker's order: weight before bias
                emitted.add(prefix)
                yield _weight_key(prefix), latent_weight(owners[prefix]), True
            yield key, value, False
        elif owner not in emitted:
            emitted.add(owner)
            yield _weight_key(owner), latent_weight(owners[owner]), True


def _weight_key(owner: str) -> str:
    return f"{owner}.weight" if owner else "weight"


@torch.no_grad()
def dequantized_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """A plain state dict in the unquantized layout (``conv1.weight``, ...) with the quantized weights.

    Loads into a fresh model from :func:`lsv_core.models.build_model` (same arch) with
    ``load_state_dict(strict=True)``; the quantizers' own tensors and the latent weights are left out.
    """
    modules = dict(model.named_modules())
    out: dict[str, Tensor] = {}
    for key, value, is_latent in plain_state_items(model):
        if is_latent:
            out[key] = modules[key.rpartition(".")[0]].weight.detach().clone()
        else:
            out[key] = value.detach()
    return out
