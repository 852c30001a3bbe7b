"""Where a study runs and keeps its state: the Ray cluster side (``ray_cluster``), per-node checks (``nodes``),
trial artifacts sent through Ray, the driver lease, and the Optuna storage.

Import from the modules themselves."""
