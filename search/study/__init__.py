"""Running a study: the driver (``run``), what a worker runs per trial (``trial``), the Optuna-backed searcher,
the early-stopping scheduler, the progress board and the preflight checks.

Import from the modules themselves."""
