"""Preflight of every Ray node before the first trial: a node that cannot run trials is named, with why.

Without it a node lacking the data (or running other code) fails every trial placed on it, one failed
trial at a time. :func:`check_nodes` runs :func:`check_node` once on each alive node (pinned there) and
collects :class:`NodeReport` s: the data paths and every audio file they list exist on that node, the
baseline received through the object store has the driver's digest, the node runs the same lsv-quant
code, and, when trials ask for GPUs, torch sees CUDA there. The study stops (exit 2) listing the bad
nodes, or with ``resources.bad_nodes = "skip"`` goes on without them (trials are kept off them by a
placement-group label selector on Ray's ``ray.io/node-id`` label).
"""

from __future__ import annotations

import hashlib
import platform
import socket
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["NodeExpectations", "NodeReport", "check_node", "check_nodes", "code_digest", "node_selector"]

NODE_ID_LABEL = "ray.io/node-id"


@dataclass(frozen=True)
class NodeExpectations:
    """What every node must have: data paths by config field (``data.train`` -> path), the driver's code
    digest and version, the baseline's state-dict digest, and whether trials need CUDA."""

    data: dict[str, str]
    listings: tuple[str, ...]  # the fields among ``data`` that are data dirs whose audio files must exist
    lsv_version: str
    code_digest: str
    baseline_digest: str | None
    need_cuda: bool


@dataclass
class NodeReport:
    node_id: str
    address: str
    hostname: str
    problems: list[str] = field(default_factory=list)
    facts: dict[str, Any] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.problems

    def describe(self) -> str:
        where = f"node {self.hostname} ({self.address}, id {self.node_id[:12]})"
        return where + (": ok" if self.ok else ": " + "; ".join(self.problems))


def code_digest() -> str:
    """SHA-256 (16 hex) of the lsv-quant sources this process imports: nodes must run the same code."""
    import lsv_core
    import search

    h = hashlib.sha256()
    for package in (lsv_core, search):
        root = Path(package.__file__).parent
        for path in sorted(root.rglob("*.py")):
            h.update(str(path.relative_to(root.parent)).encode())
            h.update(path.read_bytes())
    return h.hexdigest()[:16]


def check_node(expect: NodeExpectations, baseline: Any = None) -> dict[str, Any]:
    """Run on one node: the problems found there (see the module docstring), as a plain dict."""
    import torch

    import lsv_core
    from lsv_core.data.manifest import read_data
    from lsv_core.errors import LsvError

    problems: list[str] = []
    for name, path in expect.data.items():
        p = Path(path)
        if not p.exists():
            problems.append(f"{name}={path} does not exist")
            continue
        if name not in expect.listings:
            continue
        try:
            data = read_data(p)
        except LsvError as err:
            problems.append(f"{name}={path}: {err}")
            continue
        missing = [u for u in data if not u.path.is_file()]
        if missing:
            problems.append(f"{name}={path}: {len(missing):,} of {len(data):,} audio files missing "
                            f"(first: {missing[0].path})")
    if lsv_core.__version__ != expect.lsv_version:
        problems.append(f"lsv-quant {lsv_core.__version__} here, {expect.lsv_version} on the driver")
    digest = code_digest()
    if digest != expect.code_digest:
        problems.append(f"lsv-quant code differs from the driver's (digest {digest} != {expect.code_digest}); "
                        "install the same version on every node")
    if expect.baseline_digest is not None and baseline is not None:
        from lsv_core.models.baseline import Baseline
        from lsv_core.quant.sensitivity import state_dict_digest

        got = state_dict_digest(Baseline.from_weights(baseline).model)
        if got != expect.baseline_digest:
            problems.append(f"the baseline received here has digest {got[:12]}, the driver's is "
                            f"{expect.baseline_digest[:12]}")
    cuda = torch.cuda.is_available()
    if expect.need_cuda and not cuda:
        problems.append("trials ask for GPUs (resources.gpu > 0) but torch sees no CUDA device on this node")
    return {"problems": problems, "facts": {"lsv_version": lsv_core.__version__, "code_digest": digest,
                                            "torch": torch.__version__, "cuda": cuda,
                                            "cuda_devices": torch.cuda.device_count() if cuda else 0,
                                            "python": platform.python_version(), "hostname": socket.gethostname()}}


def check_nodes(expect: NodeExpectations, baseline_ref: Any = None, *, timeout_s: float = 300.0) -> list[NodeReport]:
    """Run :func:`check_node` on every alive node of the connected Ray cluster, in parallel."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    remote = ray.remote(num_cpus=0, max_retries=0)(check_node)
    pending: dict[Any, NodeReport] = {}
    for node in ray.nodes():
        if not node.get("Alive"):
            continue
        report = NodeReport(node["NodeID"], node.get("NodeManagerAddress", "?"),
                            node.get("NodeManagerHostname", "?"))
        ref = remote.options(scheduling_strategy=NodeAffinitySchedulingStrategy(node["NodeID"], soft=False)).remote(
            expect, baseline_ref)
        pending[ref] = report
    ready, not_ready = ray.wait(list(pending), num_returns=len(pending), timeout=timeout_s)
    for ref in ready:
        report = pending[ref]
        try:
            out = ray.get(ref)
        except Exception as err:  # noqa: BLE001 - any failure of the check is the node's problem
            report.problems.append(f"the preflight task failed there ({type(err).__name__}: "
                                   f"{str(err).strip().splitlines()[-1] if str(err).strip() else ''})")
            continue
        report.problems.extend(out["problems"])
        report.facts = out["facts"]
        report.hostname = out["facts"].get("hostname", report.hostname)
    for ref in not_ready:
        pending[ref].problems.append(f"the preflight did not answer within {timeout_s:g} s")
        ray.cancel(ref, force=True)
    return sorted(pending.values(), key=lambda r: (r.ok, r.address))


def node_selector(excluded: list[str]) -> list[dict[str, str]] | None:
    """A placement-group ``bundle_label_selector`` that keeps trials off ``excluded`` node ids."""
    if not excluded:
        return None
    return [{NODE_ID_LABEL: f"!in({','.join(excluded)})"}]
