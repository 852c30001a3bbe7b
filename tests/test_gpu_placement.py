"""A trial's device comes from the GPU ids Ray assigned it; ``gpu = 0`` keeps every step of a study on the CPU.

The Ray tests run a real one-node cluster started with ``ray start --num-gpus 2`` on this CPU-only machine
(fake GPUs: Ray hands out their ids and sets ``CUDA_VISIBLE_DEVICES`` exactly as on a GPU node). There is no
CUDA here, so the trials run :func:`search.study.trial.run_trial` with its ``placement`` test hook: the trial picks
its device through the same code as a real one, reports it with Ray's GPU ids and ``CUDA_VISIBLE_DEVICES``,
and stops before moving anything to the device.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch

from lsv_core.device import pick_device
from lsv_core.errors import ConfigError
from search.config import parse_study_config
from search.study.trial import placement, ray_trial_device, trial_device


def test_trial_device_follows_rays_ids_not_the_config() -> None:
    assert trial_device("auto", [], "0,1") == "cpu"  # gpu = 0: CPU, even where the node's GPUs are visible
    assert trial_device("auto", ["1"], "1") == "cuda:0"  # Ray narrowed CUDA_VISIBLE_DEVICES to its GPU
    assert trial_device("cuda", ["5", "3"], "3,5") == "cuda:1"  # the first assigned id, as this process numbers it
    assert trial_device("auto", ["1"], None) == "cuda:1"  # Ray left the variable alone: the id is the index
    assert trial_device("cpu", ["1"], "1") == "cpu"
    with pytest.raises(RuntimeError, match="does not list it"):
        trial_device("auto", ["2"], "0,1")
    with pytest.raises(RuntimeError, match="assigned this trial no GPU"):
        trial_device("cuda", [], None)


def test_gpu_0_keeps_the_drivers_steps_on_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    # A fake CUDA (named as such): torch says a GPU is there, as on a GPU machine.
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    cpu_only = parse_study_config({"study": {"name": "g"}, "resources": {"gpu": 0}})
    assert cpu_only.device == "cpu" and cpu_only.workbench_spec().device == "cpu"
    assert pick_device(cpu_only.workbench_spec().device) == torch.device("cpu")  # probes, Hessian, control, verify
    shared = parse_study_config({"study": {"name": "g"}, "resources": {"gpu": 0.5}})
    assert shared.workbench_spec().device == "auto" and pick_device("auto") == torch.device("cuda")
    with pytest.raises(ConfigError, match=r"resources\.device.*'cuda:1' cannot be honoured"):
        parse_study_config({"study": {"name": "g"}, "resources": {"gpu": 1, "device": "cuda:1"}})


# -- on a Ray cluster with two fake GPUs -----------------------------------------------------------------------
@pytest.fixture(scope="module")
def gpu_cluster():  # the tests that use it are marked slow (a Ray cluster and Tune runs: about 2.5 min)
    from tests.services import RayHead

    head = RayHead(cpus=4, gpus=2).start()
    yield head
    head.stop()


@pytest.fixture
def placements(gpu_cluster, tmp_path: Path):
    """Runs the Ray side in a driver process of its own (``python tests/test_gpu_placement.py``), with
    ``RAY_AUTH_MODE=disabled`` like the cluster: Ray keeps its authentication mode per process once it has
    connected, so setting it in the test process would break every later local Ray of the session."""
    root = Path(__file__).resolve().parents[1]

    def run(what: str, gpu: float = 0, n: int = 0, hold_s: float = 0.0, **env: str) -> list[dict]:
        out = tmp_path / f"{what}-{gpu}-{n}.json"
        args = [sys.executable, __file__, gpu_cluster.address, what, str(gpu), str(n), str(hold_s), json.dumps(env),
                str(tmp_path / "ray"), str(out)]
        done = subprocess.run(args, env={**os.environ, "RAY_AUTH_MODE": "disabled", "PYTHONPATH": str(root)},
                              capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
        return json.loads(out.read_text())

    return run


def _placements(storage: Path, gpu: float, n: int, hold_s: float) -> list[dict]:
    """``n`` concurrent Tune trials of :func:`run_trial` at ``gpu`` GPUs each, stopped by the placement hook."""
    from ray import tune

    from search.study.trial import run_trial

    trainable = tune.with_resources(run_trial, {"cpu": 0.5, "gpu": gpu})
    space = {"recipe": {}, "workbench": {"device": "auto"}, "optuna_trial": tune.grid_search(list(range(n))),
             "fault": {"kind": "placement", "hold_s": hold_s}}
    tuner = tune.Tuner(trainable, param_space=space,
                       tune_config=tune.TuneConfig(max_concurrent_trials=n, reuse_actors=False),
                       run_config=tune.RunConfig(storage_path=str(storage), verbose=0))
    results = tuner.fit()
    assert not results.errors, results.errors
    return [r.metrics for r in results]


def _overlap(rows: list[dict]) -> bool:
    return max(r["t_start"] for r in rows) < min(r["t_end"] for r in rows)


@pytest.mark.slow
def test_each_trial_takes_the_gpu_ray_assigned(placements) -> None:
    rows = placements("tune", gpu=1, n=2, hold_s=4.0)
    assert _overlap(rows)  # both held a GPU at once
    assert sorted(r["gpu_ids"][0] for r in rows) == ["0", "1"]
    for r in rows:
        assert len(r["gpu_ids"]) == 1
        assert r["cuda_visible_devices"] == r["gpu_ids"][0]  # Ray isolates the trial's GPU ...
        assert r["device"] == "cuda:0"  # ... which the trial therefore sees as cuda:0


@pytest.mark.slow
def test_two_trials_share_each_gpu_at_half_a_gpu(placements) -> None:
    rows = placements("tune", gpu=0.5, n=4, hold_s=6.0)
    assert _overlap(rows)  # all four ran at once on the two GPUs
    assert Counter(r["gpu_ids"][0] for r in rows) == {"0": 2, "1": 2}
    assert all(r["device"] == "cuda:0" and r["cuda_visible_devices"] == r["gpu_ids"][0] for r in rows)


@pytest.mark.slow
def test_gpu_0_runs_on_cpu_on_a_gpu_node(placements) -> None:
    rows = placements("tune", gpu=0, n=2, hold_s=0.0)
    assert all(r["device"] == "cpu" and r["gpu_ids"] == [] for r in rows)


@pytest.mark.slow
def test_the_device_is_the_assigned_id_when_ray_leaves_cuda_visible_devices_alone(placements) -> None:
    """Where Ray does not narrow CUDA_VISIBLE_DEVICES the GPU index is the id itself: a device fixed in the
    config (or always ``cuda:0``) would put the trial on GPU 1 on GPU 0."""
    rows = placements("tune", gpu=1, n=2, hold_s=4.0, RAY_EXPERIMENTAL_NOSET_CUDA_VISIBLE_DEVICES="1")
    assert _overlap(rows)
    assert sorted((r["gpu_ids"][0], r["device"]) for r in rows) == [("0", "cuda:0"), ("1", "cuda:1")]
    assert all(r["cuda_visible_devices"] is None for r in rows)


def _task_placement() -> tuple[str, dict]:
    return ray_trial_device("auto"), placement()


@pytest.mark.slow
def test_ray_tasks_control_verify_hessian_probe_take_the_same_path(placements) -> None:
    """The control, ``lsv verify``, worker-side Hessian and probes are Ray tasks that choose their device with
    :func:`ray_trial_device` (search.study.trial.recipe_task, hessian_task, probe_task)."""
    (device, on_gpu), (cpu_device, on_cpu) = placements("tasks")
    assert device == "cuda:0" and on_gpu["cuda_visible_devices"] == on_gpu["gpu_ids"][0]
    assert cpu_device == "cpu" and on_cpu["gpu_ids"] == []


def _tasks() -> list[tuple[str, dict]]:
    import ray

    task = ray.remote(_task_placement)
    return [ray.get(task.options(num_cpus=0.5, num_gpus=gpus).remote()) for gpus in (1, 0)]


if __name__ == "__main__":  # the driver process of the `placements` fixture
    import ray

    address, what, gpu, n, hold_s, env, storage, out = sys.argv[1:]
    extra = json.loads(env)
    ray.init(address=address, log_to_driver=False, runtime_env={"env_vars": extra} if extra else None)
    try:
        rows = _tasks() if what == "tasks" else _placements(Path(storage), float(gpu), int(n), float(hold_s))
    finally:
        ray.shutdown()
    Path(out).write_text(json.dumps(rows))
