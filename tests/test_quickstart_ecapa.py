"""The ECAPA-TDNN quickstart: its shipped baseline (baselines/quickstart_ecapa) is what its files say, and its
study (studies/quickstart_ecapa.toml) runs end to end from a fresh clone, on the corpus the machine synthesizes."""

from __future__ import annotations

import json
import tomllib
from pathlib import Path

import pytest
import torch

from lsv_core.models import load_checkpoint
from lsv_core.quant import BitRecipe, packed_size_bytes
from search.config import load_study_config
from tests.conftest import to_toml

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = ROOT / "baselines" / "quickstart_ecapa"
STUDY = ROOT / "studies" / "quickstart_ecapa.toml"


def test_shipped_ecapa_baseline_is_what_its_files_say() -> None:
    train_config = json.loads((SHIPPED / "train_config.json").read_text())
    summary = json.loads((SHIPPED / "model.json").read_text())
    model, _ = load_checkpoint(SHIPPED / "model.safetensors")
    assert model.arch["name"] == train_config["model"] == summary["model"] == "ECAPA_TDNN"
    for key, value in train_config["model_kwargs"].items():
        assert model.arch["kwargs"][key] == value, key
    assert sum(p.numel() for p in model.parameters()) == summary["params"]
    assert {k: v for k, v in summary["config"].items() if k in train_config} == train_config
    # Trained on the same synthesized corpus as the ResNet quickstart (make demo-ecapa checks it by digest).
    assert (SHIPPED / "corpus.json").read_bytes() == (ROOT / "baselines" / "quickstart" / "corpus.json").read_bytes()
    # A working speaker model, not an untrained one: the EER it shipped with is far from chance.
    assert summary["eval"]["eer"] < 15 and summary["eval"]["n_trials"] == 91200
    out = model.eval()(torch.randn(2, 150, model.arch["kwargs"]["feat_dim"]))
    assert out.shape == (2, train_config["model_kwargs"]["embed_dim"]) and torch.isfinite(out).all()


def test_ecapa_study_config_sizes_and_units() -> None:
    config = load_study_config(STUDY)
    assert config.study.name == "quickstart_ecapa" and config.model.checkpoint.resolve() == (
        SHIPPED / "model.safetensors").resolve()
    model, _ = load_checkpoint(SHIPPED / "model.safetensors")
    budget = config.objectives.size_budget_mb * 1e6
    # The budget sits between uniform 4 and 8 bit, as the ResNet quickstart's does: the search has room.
    assert packed_size_bytes(model, BitRecipe.uniform(model, 4)) < budget < packed_size_bytes(
        model, BitRecipe.uniform(model, 8))
    from search.space import SearchSpace

    units = list(SearchSpace.build(model, config.space).units)
    assert units == ["layer1.conv", "layer2", "layer3", "layer4", "conv", "pool", "linear"]


@pytest.mark.slow
def test_ecapa_quickstart_study_runs_from_the_shipped_files(default_corpus: Path, tmp_path: Path,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    """studies/quickstart_ecapa.toml as shipped (its baseline, space, sampler, budget), on the corpus this
    machine synthesizes (checked against the baseline's corpus.json, as `make demo-ecapa` does), cut to 7
    trials, 4 fine-tuning steps and 4,000 trials per score."""
    from lsv_core.data.synth import check_corpus
    from search.cli import main

    check_corpus(default_corpus, SHIPPED / "corpus.json")
    raw = tomllib.loads(STUDY.read_text())
    raw["study"].update(out_dir=str(tmp_path / "runs"), n_trials=7)
    raw["model"]["checkpoint"] = str(SHIPPED / "model.safetensors")
    raw["data"].update(corpus=str(default_corpus), cache_dir=str(tmp_path / "cache"), max_trials=4000,
                       synthesize_if_missing=False)
    raw["msft"]["total_steps"] = 4
    toml = tmp_path / "quickstart_ecapa.toml"
    toml.write_text(to_toml(raw))
    assert main(["run", str(toml)]) == 0
    capsys.readouterr()
    assert main(["status", str(toml), "--json"]) == 0
    status = json.loads(capsys.readouterr().out)
    assert status["n_complete"] + status["n_pruned"] == 7 and status["n_failed"] == 0, status
    assert status["budget_bytes"] == 200_000 and status["pareto"]
    # The uniform 1 bit seed is the smallest model the space holds (BatchNorms after ReLU stay float).
    model, _ = load_checkpoint(SHIPPED / "model.safetensors")
    assert status["smallest_bytes"] == packed_size_bytes(model, BitRecipe.uniform(model, 1, mode="adaptive"))
    assert status["choices"]["fp32 control"]["eer"] is not None
    cost = status["cost"]
    assert cost["probes_fte"] > 0  # the probe sampler measured ECAPA's seven units first
    assert abs(cost["trials_fte"] + cost["probes_fte"] + cost["sensitivity_fte"] + cost["control_fte"]
               - cost["total_fte"]) < 1e-3
    assert main(["export", str(toml), "--knee", "--out", str(tmp_path / "bundle"), "--eer-tolerance", "1.0"]) == 0
    result = json.loads(capsys.readouterr().out)
    onnx = tmp_path / "bundle" / "model.onnx"
    assert onnx.stat().st_size == result["size_bytes"]
