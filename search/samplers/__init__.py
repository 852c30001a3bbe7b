"""Samplers of our own (``prior``: the hessian and probe samplers) and the names ``study.sampler`` accepts
(``names``).

Import from the modules themselves."""
