"""Files a trial produces reach the driver through Ray, not through a shared filesystem.

A Ray cluster rarely has one: a worker that wrote its packed model to ``runs/<study>/trials/`` on its own
node left the driver (which logs it to MLflow and exports from it) with a path that does not exist
there. :class:`ArtifactSink` is a small actor pinned to the driver's node; a trial hands it the bytes
(through Ray's object store) and it writes them atomically under the study folder on the driver, before
the trial reports its result, so the driver always finds the file its result names.
"""

from __future__ import annotations

import os
from pathlib import Path, PurePosixPath

import ray

from lsv_core.atomic import atomic_path

__all__ = ["ArtifactSink", "start_sink", "store_artifact"]

NAMESPACE = "lsv"


class ArtifactSink:
    """Writes ``bytes`` under ``root`` on the node it runs on (the driver's)."""

    def __init__(self, root: str) -> None:
        self.root = Path(root)

    def put(self, relpath: str, data: bytes) -> str:
        """Write ``data`` to ``root/relpath`` atomically (replacing an older copy); returns the path."""
        rel = PurePosixPath(relpath)
        if rel.is_absolute() or ".." in rel.parts:
            raise ValueError(f"artifact path {relpath!r} should be relative, inside the study folder")
        target = self.root / rel
        with atomic_path(target, overwrite=True) as tmp:
            tmp.write_bytes(data)
        os.chmod(target, 0o644)
        return str(target)


def start_sink(root: Path, name: str) -> ray.actor.ActorHandle:
    """Start the sink on this (the driver's) node under ``name`` (workers find it with :func:`store_artifact`)."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    here = ray.get_runtime_context().get_node_id()
    actor = ray.remote(num_cpus=0)(ArtifactSink).options(
        name=name, namespace=NAMESPACE, lifetime=None, get_if_exists=True,
        scheduling_strategy=NodeAffinitySchedulingStrategy(node_id=here, soft=False))
    handle = actor.remote(str(root))
    ray.get(handle.put.remote(".sink-ready", b"ok"))  # fail here, not in the first trial
    return handle


def store_artifact(sink_name: str, relpath: str, data: bytes) -> str:
    """From a trial: send ``data`` to the study's sink; returns the driver-side path once it is written."""
    sink = ray.get_actor(sink_name, namespace=NAMESPACE)
    return ray.get(sink.put.remote(relpath, data))
