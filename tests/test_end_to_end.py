"""End to end through the real CLI: synthesize a small corpus, train briefly, evaluate.

Real espeak-ng audio, real fbank, real training: the trained network must beat the untrained one clearly.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from lsv_core.data.features import extract_features
from lsv_core.data.manifest import read_kaldi_dir
from lsv_core.data.trials import read_trials
from lsv_core.evaluate import evaluate
from lsv_core.models import build_model, load_checkpoint
from search.cli import main

pytestmark = pytest.mark.slow


def test_corpus_train_evaluate_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    corpus, cache = tmp_path / "corpus", tmp_path / "cache"
    assert main(["corpus", "synth", "--out", str(corpus), "--speakers", "36", "--utts", "8",
                 "--eval-speakers", "10", "--seed", "3", "--workers", "2"]) == 0
    # The corpus exists: a second run without --force refuses and leaves it alone.
    assert main(["corpus", "synth", "--out", str(corpus), "--speakers", "4", "--utts", "2", "--eval-speakers", "1"]) == 2
    assert "exists" in capsys.readouterr().err.replace("\n", " ")
    assert len(read_kaldi_dir(corpus / "train")) == 26 * 8

    ckpt = tmp_path / "baseline.safetensors"
    assert main(["train", "--corpus", str(corpus), "--out", str(ckpt), "--steps", "150", "--batch-size", "32",
                 "--optimizer", "adam", "--lr", "0.003", "--cache", str(cache), "--device", "cpu"]) == 0
    summary = json.loads(ckpt.with_suffix(".json").read_text())
    trained_eer = summary["eval"]["eer"]
    assert summary["steps"] == 150 and summary["params"] > 0

    # Same architecture, untrained (seeded init), same trials and features.
    model, meta = load_checkpoint(ckpt, with_extra=True)
    assert "weight" in meta["extra_tensors"]  # the AAM head is kept for fine-tuning
    data = read_kaldi_dir(corpus / "eval")
    trials = read_trials(corpus / "eval" / "trials", data)
    store = extract_features(data, utts=trials.utterances, cache_dir=cache, progress=False)
    torch.manual_seed(0)
    untrained = build_model(model.arch["name"], **model.arch["kwargs"])
    untrained_eval = evaluate(untrained, store, trials, n_boot=200)
    # Clearly better: the 95 % bootstrap intervals do not overlap (the corpus's speakers come in confusable
    # families, so a 150-step net on 26 speakers is far from good, but it must be measurably better).
    assert summary["eval"]["eer_ci_high"] < untrained_eval.eer_ci_low, (summary["eval"], untrained_eval)
    assert trained_eer < 0.75 * untrained_eval.eer, (trained_eer, untrained_eval.eer)

    out_json = tmp_path / "eval.json"
    assert main(["evaluate", "--model", str(ckpt), "--data", str(corpus / "eval"), "--trials",
                 str(corpus / "eval" / "trials"), "--cache", str(cache), "--json", str(out_json),
                 "--n-boot", "200"]) == 0
    result = json.loads(out_json.read_text())
    assert result["eer"] == pytest.approx(trained_eer, abs=1e-9)
    assert result["eer_ci_low"] <= result["eer"] <= result["eer_ci_high"]
    assert 0 < result["min_dcf_001"] <= 1.0 + 1e-9 and result["n_trials"] == len(trials)

    # Bad input: a trial naming an utterance that is not in the data -> exit 2, file and line named.
    bad = tmp_path / "bad_trials"
    bad.write_text((corpus / "eval" / "trials").read_text().splitlines()[0] + "\nnobody spk0001-0000 target\n")
    capsys.readouterr()
    assert main(["evaluate", "--model", str(ckpt), "--data", str(corpus / "eval"), "--trials", str(bad)]) == 2
    assert "bad_trials:2: utterance 'nobody'" in capsys.readouterr().err.replace("\n", "")


def test_quantize_cli_uniform_and_budget(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from lsv_core.export.packed import load_packed
    from lsv_core.quant import packed_size_bytes

    corpus, cache = tmp_path / "corpus", tmp_path / "cache"
    assert main(["corpus", "synth", "--out", str(corpus), "--speakers", "24", "--utts", "6",
                 "--eval-speakers", "6", "--seed", "5"]) == 0
    ckpt = tmp_path / "base.safetensors"
    assert main(["train", "--corpus", str(corpus), "--out", str(ckpt), "--steps", "60", "--batch-size", "32",
                 "--cache", str(cache), "--device", "cpu"]) == 0
    packed, report = tmp_path / "q4.safetensors", tmp_path / "q4.json"
    assert main(["quantize", "--model", str(ckpt), "--corpus", str(corpus), "--bits", "4", "--steps", "20",
                 "--cache", str(cache), "--out", str(packed), "--json", str(report), "--device", "cpu"]) == 0
    result = json.loads(report.read_text())
    model = load_packed(packed)
    assert result["size_bytes"] == packed_size_bytes(model)
    assert packed.stat().st_size > result["size_bytes"]  # plus the header
    assert 6.0 < result["compression_ratio"] < 8.0  # 4-bit weights, float BN/biases
    assert 0.0 <= result["eer"] <= 100.0 and len(result["stages"]) == 1
    # Refuses to overwrite the packed model.
    assert main(["quantize", "--model", str(ckpt), "--corpus", str(corpus), "--bits", "4",
                 "--out", str(packed)]) == 2
    # Mixed precision from the allocator meets the byte budget exactly as the size code counts it.
    budget_mb = result["size_bytes"] * 0.6 / 1e6
    report2 = tmp_path / "mixed.json"
    assert main(["quantize", "--model", str(ckpt), "--corpus", str(corpus), "--budget-mb", f"{budget_mb:.6f}",
                 "--steps", "10", "--cache", str(cache), "--json", str(report2), "--device", "cpu"]) == 0
    mixed = json.loads(report2.read_text())
    assert mixed["size_bytes"] <= budget_mb * 1e6
    assert len({v if isinstance(v, int) else 1 for v in mixed["recipe"].values()}) > 1
