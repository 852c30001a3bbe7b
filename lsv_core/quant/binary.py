"""1-bit weight quantizers: the static and the adaptive binary schemes.

The paper proposes two binary schemes and reports the adaptive one as stronger (docs/method.md, "known"); its
formulas are not public, so these are our choices (docs/method.md, "our choice"):

* :class:`StaticBinaryQuantizer` (XNOR-Net, Rastegari et al. 2016): levels ``{-a, +a}``, threshold 0,
  ``a = mean(|W|)``, the closed-form L2-optimal scale for sign(W), recomputed from the latent weights in
  every forward. Nothing is learned except the latent weights. The gradient follows XNOR-Net:
  ``dL/dW_i = a * dL/dWq_i`` (straight-through through sign) plus the term through ``a``
  (``sign(W_i) / n * sum_j dL/dWq_j * sign(W_j)``). The packed file stores ``a`` only (one float32).
  Symmetric levels and a zero threshold suit zero-mean weights and cost nothing to store, but cannot
  follow a skewed or shifted weight distribution.
* :class:`AdaptiveBinaryQuantizer`: two levels ``l0 < l1`` that need not be symmetric, initialised by
  2-means of the weights (the optimal 1-bit codebook), threshold at their midpoint; the latent weights
  get a straight-through gradient. The levels adapt as ``KMQATConfig.centroid_update`` says, like every
  codebook: re-estimated by 2-means of the latent weights on the ``recluster`` schedule (``"kmeans"``,
  the default), learned by the shared-centroid gradient (``"gradient"``), or both. The default is not
  the gradient because the shared-centroid gradient sums ``dL/dWq`` over half a layer's weights: at a
  fine-tuning learning rate it moves the two levels by far more than their size, and on the embedded
  benchmark the network collapsed (EER ~46 % vs 3.3 % with 2-means levels; BENCHMARKS.md). It is the
  multi-bit codebook quantizer at ``2^1`` levels. Stored as two float32 levels.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch
from torch import Tensor

from lsv_core.quant.codebook import CodebookQuantizer, KMQATConfig, WeightQuantizer
from lsv_core.quant.recipe import register_quantizer

__all__ = ["AdaptiveBinaryQuantizer", "StaticBinaryQuantizer", "static_binary_scale"]


def static_binary_scale(latent: Tensor) -> Tensor:
    """``mean(|W|)`` as a 0-d tensor in ``latent``'s dtype, differentiable.

    Accumulated in float64 so that the mean of ``n`` copies of a float32 value is exactly that value
    (every partial sum is exactly representable): a model reloaded from the packed file, whose latent
    weights are ``+-a``, recomputes exactly the stored ``a``.
    """
    return latent.abs().to(torch.float64).mean().to(latent.dtype)


@register_quantizer("static", token_letter="s")
class StaticBinaryQuantizer(WeightQuantizer):
    """Levels ``{-a, +a}``, ``a = mean|W|``, threshold 0 (weights >= 0 map to ``+a``); see module docstring."""

    bits = 1
    mode = "static"
    clustered = False

    @classmethod
    def initial(cls, weight: Tensor, bits: int, config: KMQATConfig, centroids: Tensor | None) -> StaticBinaryQuantizer:
        return cls(config)

    @classmethod
    def stored_layout(cls, bits: int) -> dict[str, tuple[int, ...]]:
        return {"alpha": (1,)}

    @classmethod
    def stored_levels(cls, stored: Mapping[str, Tensor]) -> Tensor:
        alpha = stored["alpha"].reshape(())
        return torch.stack([-alpha, alpha])

    @classmethod
    def from_stored(cls, levels: Tensor, bits: int, config: KMQATConfig) -> StaticBinaryQuantizer:
        return cls(config)  # the scale is recomputed from the latent weights, which are set to +-alpha

    @classmethod
    def quantization_error(cls, weight: np.ndarray, bits: int, seed: int = 0) -> float:
        alpha = float(np.mean(np.abs(weight)))
        # Zero weights go to +alpha, as the forward maps weights >= 0 to +alpha.
        return float(np.sum((weight - np.where(weight >= 0, alpha, -alpha)) ** 2))

    def forward(self, latent: Tensor) -> Tensor:
        scale = static_binary_scale(latent)
        sign = torch.where(latent >= 0, 1.0, -1.0).to(latent.dtype)
        if torch.is_grad_enabled() and latent.requires_grad:
            # Straight-through estimator through sign: value unchanged (latent - latent == 0).
            sign = sign + (latent - latent.detach())
        return scale * sign

    def levels(self, latent: Tensor) -> Tensor:
        scale = static_binary_scale(latent.detach())
        return torch.stack([-scale, scale])

    def assign(self, latent: Tensor) -> Tensor:
        return (latent.detach() >= 0).to(torch.uint8)

    def recluster(self, latent: Tensor, seed: int = 0) -> bool:
        return False  # the scale is recomputed from the latent weights in every forward

    def packed_codebook(self, latent: Tensor) -> dict[str, Tensor]:
        return {"alpha": static_binary_scale(latent.detach()).reshape(1).to(torch.float32)}


@register_quantizer("adaptive", token_letter="a")
class AdaptiveBinaryQuantizer(CodebookQuantizer):
    """Two learnable levels from 2-means, threshold at their midpoint; see module docstring."""

    mode = "adaptive"

    def __init__(self, centroids: Tensor, bits: int, config: KMQATConfig) -> None:
        if bits != 1:
            raise ValueError(f"AdaptiveBinaryQuantizer is 1-bit, got bits={bits}")
        super().__init__(centroids, 1, config)

