"""Screenshots of a finished study in the clients users browse it with, for the README's "Browse" section.

    ../shared/loopback-only .venv/bin/python docs/screenshots.py studies/quickstart.toml [--out docs/img]

starts the MLflow UI on the study's tracking store and optuna-dashboard on its Optuna storage (both on
127.0.0.1, stopped afterwards), and writes, with headless Chromium (Debian ``chromium``):

    mlflow_front.png        the runs table filtered to the Pareto front (tags.pareto_optimal = "true")
    mlflow_progress.png     the parent run's metric histories (hypervolume, front size, ... per finished trial)
    mlflow_pareto.png       the parent run's pareto.png artifact, as `lsv run` logged it
    mlflow_front_table.png  the parent run's front.csv artifact, shown as a table
    optuna_dashboard.png    optuna-dashboard's page of the study

Each PNG is kept under 300 kB (reduced to a 256-colour palette when bigger).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from search.config import load_study_config  # noqa: E402
from search.results.tracking import StudyTracker  # noqa: E402
from tests.services import MlflowServer, OptunaDashboard, chromium_page  # noqa: E402

MAX_BYTES = 300_000


def _small(png: Path) -> Path:
    """The PNG itself when under :data:`MAX_BYTES`, else the same picture in a 256-colour palette."""
    if png.stat().st_size <= MAX_BYTES:
        return png
    from PIL import Image

    with Image.open(png) as image:
        image.convert("RGB").quantize(colors=256).save(png, optimize=True)
    if png.stat().st_size > MAX_BYTES:
        raise RuntimeError(f"{png} is {png.stat().st_size:,} bytes even with 256 colours (limit {MAX_BYTES:,})")
    return png


def mlflow_shots(study: Path, out: Path) -> list[Path]:
    config = load_study_config(study)
    tracker = StudyTracker(config.mlflow_uri, config.study.name)
    parent = tracker.parent_run_id
    server = MlflowServer(backend_store_uri=config.mlflow_uri).start()
    base = f"{server.uri}/#/experiments/{tracker.experiment_id}/runs/{parent}"
    # The experiment's chart view (the trial runs folded under the study's run) draws the parent run's
    # histories; the run page's own "Model metrics" tab never finishes drawing in headless Chromium.
    charts = f"{server.uri}/#/experiments/{tracker.experiment_id}/runs?compareRunsMode=CHART"
    shots = [(tracker.front_url(server.uri), out / "mlflow_front.png", (1500, 560), 20000),
             (charts, out / "mlflow_progress.png", (1500, 1400), 60000),
             (f"{base}/artifacts/pareto.png", out / "mlflow_pareto.png", (1500, 900), 20000),
             (f"{base}/artifacts/front.csv", out / "mlflow_front_table.png", (1500, 560), 20000)]
    try:
        for url, png, size, budget_ms in shots:
            chromium_page(url, screenshot=png, size=size, budget_ms=budget_ms)
    finally:
        server.stop()
    return [_small(png) for _, png, _, _ in shots]


def dashboard_shot(study: Path, out: Path) -> Path:
    config = load_study_config(study)
    dashboard = OptunaDashboard(config.optuna_url).start()
    try:
        summary = next(s for s in dashboard.get("/api/studies")["study_summaries"]
                       if s["study_name"] == config.study.name)
        png = out / "optuna_dashboard.png"
        chromium_page(f"{dashboard.uri}/dashboard/studies/{summary['study_id']}", screenshot=png, size=(1500, 1100))
    finally:
        dashboard.stop()
    return _small(png)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("study", type=Path, help="a finished study's config (.toml)")
    p.add_argument("--out", type=Path, default=ROOT / "docs" / "img")
    args = p.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    for png in [*mlflow_shots(args.study, args.out), dashboard_shot(args.study, args.out)]:
        print(f"{png} ({png.stat().st_size:,} bytes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
