"""Dashboards of a study: its figures (:mod:`dashboards.plots`) and the static HTML report.

The Pareto math and the reading of results live in :mod:`search.results.pareto` and :mod:`search.results.reading`; this
package only draws them (dashboards import search, never the reverse).
"""

from dashboards.report import write_report

__all__ = ["write_report"]
