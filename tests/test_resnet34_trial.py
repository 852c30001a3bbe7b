"""The real-size model path: a WeSpeaker ResNet34 ``avg_model.pt`` quantized, fine-tuned by MSFT and scored
through `lsv quantize --arch` on a small data dir, on the CPU (and on CUDA where one is present)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from lsv_core.model_files import load_model_file
from lsv_core.models import build_model
from search.cli import main
from tests.conftest import write_tone

pytestmark = pytest.mark.slow


def _kaldi_dir(root: Path, name: str, speakers: list[str], utts: int) -> Path:
    d = root / name
    d.mkdir(parents=True)
    scp, u2s = [], []
    for s, spk in enumerate(speakers):
        for i in range(utts):
            utt = f"{spk}-{i}"
            write_tone(root / "wav" / f"{utt}.wav", seconds=1.2 + 0.1 * i, freq=140.0 + 90 * s + 5 * i, seed=s * 10 + i)
            scp.append(f"{utt} ../wav/{utt}.wav\n")
            u2s.append(f"{utt} {spk}\n")
    (d / "wav.scp").write_text("".join(scp))
    (d / "utt2spk").write_text("".join(u2s))
    return d


@pytest.mark.parametrize("device", [
    "cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"))])
def test_resnet34_trial_end_to_end(tmp_path: Path, device: str) -> None:
    train = _kaldi_dir(tmp_path, "train", ["s1", "s2", "s3", "s4"], 3)
    ev = _kaldi_dir(tmp_path, "eval", ["e1", "e2", "e3"], 2)
    trials = tmp_path / "trials"
    utts = [line.split()[0] for line in (ev / "utt2spk").read_text().splitlines()]
    trials.write_text("".join(f"{a} {b} {'target' if a[:2] == b[:2] else 'nontarget'}\n"
                              for a in utts for b in utts if a < b))
    # A WeSpeaker avg_model.pt: the ResNet34 state dict plus its AAM head (projection.weight, 4 speakers).
    torch.manual_seed(0)
    model = build_model("ResNet34")
    state = dict(model.state_dict())
    state["projection.weight"] = torch.nn.functional.normalize(torch.randn(4, 256), dim=1)
    ckpt = tmp_path / "avg_model.pt"
    torch.save(state, ckpt)

    out_json, packed = tmp_path / "q.json", tmp_path / "q.packed.safetensors"
    assert main(["quantize", "--model", str(ckpt), "--arch", "ResNet34", "--train", str(train), "--eval", str(ev),
                 "--trials", str(trials), "--bits", "4", "--steps", "2", "--batch-size", "4", "--device", device,
                 "--cache", str(tmp_path / "cache"), "--features", "store", "--json", str(out_json),
                 "--out", str(packed)]) == 0
    result = json.loads(out_json.read_text())
    # ResNet34 at 4 bits for every weight layer is about 3.35 MB, 7.9x smaller than fp32 (docs/method.md).
    assert 3.0e6 < result["size_bytes"] < 3.7e6 and result["compression_ratio"] > 7.0
    assert 25e6 < result["fp32_bytes"] < 28e6
    assert 0.0 <= result["eer"] <= 100.0 and result["avg_bits"] == pytest.approx(4.0, abs=0.01)
    assert sum(s["steps"] for s in result["stages"]) == 2
    quantized = load_model_file(packed)
    assert quantized.arch["name"] == "ResNet34"
    with torch.no_grad():
        emb = quantized(torch.randn(1, 150, 80))
    assert emb.shape == (1, 256) and torch.isfinite(emb).all()
