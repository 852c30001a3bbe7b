"""A study's results: reading them (``reading``), the study record, the Pareto math, choosing a trial
(``selection``), re-running it (``verify``), exporting it (``export``), and MLflow (``tracking``).

Import from the modules themselves."""
