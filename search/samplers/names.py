"""The names ``study.sampler`` accepts.

Owned here so that the config's validation (:mod:`search.config`) and the sampler factories
(:data:`search.cluster.storage.SAMPLERS`, which import the samplers, which read configs) share one list without
importing each other.
"""

__all__ = ["SAMPLER_NAMES"]

SAMPLER_NAMES = ("tpe", "nsga2", "gp", "random", "hessian", "probe")
