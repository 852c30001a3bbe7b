"""Data at scale: the content-keyed sharded store, feature sources, the crop loader, subsets, streaming
evaluation. Real audio written to disk and read back through the real readers and fbank."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from lsv_core.data.features import FbankConfig, extract_features
from lsv_core.data.fingerprint import manifest_of
from lsv_core.data.loader import AudioFeatures, CropBatches, DataLoading, open_features
from lsv_core.data.manifest import read_kaldi_dir
from lsv_core.data.store import StoreConfig, build_store, open_store, store_folder
from lsv_core.data.subset import TrainingSubset, select_training_utts
from lsv_core.data.trials import read_trials
from lsv_core.errors import ConfigError, DataError
from lsv_core.evaluate import evaluate
from lsv_core.models import build_model
from lsv_core.workbench import DataPaths, WorkbenchSpec
from tests.conftest import write_tone

F32 = StoreConfig(dtype="float32", shard_utts=2)


def _data_dir(root: Path, speakers: int = 3, utts: int = 4, seconds: float = 1.0) -> Path:
    d = root / "data"
    d.mkdir(parents=True)
    scp, u2s = [], []
    for s in range(speakers):
        for i in range(utts):
            utt = f"spk{s}-{i}"
            write_tone(root / "wav" / f"{utt}.wav", seconds=seconds + 0.25 * i, freq=180.0 * (1 + s) + 7 * i, seed=i)
            scp.append(f"{utt} ../wav/{utt}.wav")
            u2s.append(f"{utt} spk{s}")
    (d / "wav.scp").write_text("\n".join(scp) + "\n")
    (d / "utt2spk").write_text("\n".join(u2s) + "\n")
    return d


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    return _data_dir(tmp_path / "node1")


def test_store_matches_fbank_and_float16_is_close(data_dir: Path, tmp_path: Path) -> None:
    data = read_kaldi_dir(data_dir)
    exact = extract_features(data, workers=1, progress=False)
    manifest = manifest_of(data, cache_dir=tmp_path / "cache", progress=False)
    assert build_store(data, manifest, tmp_path / "cache", store=F32, workers=1, progress=False) == len(data)
    stored = open_store(manifest, tmp_path / "cache", store=F32)
    assert len(list(store_folder(tmp_path / "cache", FbankConfig(), F32).glob("*.idx.npz"))) == 6
    for u in data.utterances:
        assert np.array_equal(stored[u], exact[u])
        assert stored.num_frames(u) == exact.num_frames(u)
    half = StoreConfig(dtype="float16")
    build_store(data, manifest, tmp_path / "cache", store=half, workers=1, progress=False)
    h = open_store(manifest, tmp_path / "cache", store=half)
    for u in data.utterances:
        np.testing.assert_allclose(h[u], exact[u], atol=0.02, rtol=2e-3)
    # a partial read is exactly the rows asked for
    assert np.array_equal(stored.read(1, 5, 25), exact[stored.utts[1]][5:25])


def test_two_nodes_with_their_own_copies_share_the_store(data_dir: Path, tmp_path: Path) -> None:
    cache = tmp_path / "shared-cache"
    data1 = read_kaldi_dir(data_dir)
    m1 = manifest_of(data1, cache_dir=cache, progress=False)
    assert build_store(data1, m1, cache, store=F32, workers=1, progress=False) == len(data1)
    # Node 2 has the same audio under another mount point: same content keys, nothing recomputed.
    node2 = tmp_path / "elsewhere" / "mnt"
    shutil.copytree(data_dir.parent, node2)
    data2 = read_kaldi_dir(node2 / "data")
    m2 = manifest_of(data2, cache_dir=cache, progress=False)
    assert m2.key() == m1.key()
    assert build_store(data2, m2, cache, store=F32, workers=1, progress=False) == 0
    # Any subset of a stored data set is served from the same shards.
    sub = manifest_of(data2, ["spk2-3", "spk0-1"], cache_dir=cache, progress=False)
    assert build_store(data2, sub, cache, store=F32, workers=1, progress=False) == 0
    # A file that changes under the same path is recomputed, alone.
    write_tone(node2 / "wav" / "spk1-2.wav", seconds=0.5, freq=999.0)
    m3 = manifest_of(data2, cache_dir=cache, progress=False)
    assert build_store(data2, m3, cache, store=F32, workers=1, progress=False) == 1
    assert open_store(m3, cache, store=F32).num_frames("spk1-2") < open_store(m1, cache, store=F32).num_frames("spk1-2")


def test_interrupted_build_resumes_and_damaged_shards_are_never_read(data_dir: Path, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    data = read_kaldi_dir(data_dir)
    victim = data.utterances["spk1-1"].path  # position 5 of 12: shards of 2 -> two shards complete before it
    good = victim.read_bytes()
    victim.write_bytes(b"RIFF\x00\x00garbage")
    manifest = manifest_of(data, cache_dir=cache, progress=False)
    with pytest.raises(DataError, match=r"utterance spk1-1.*spk1-1\.wav is unreadable"):
        build_store(data, manifest, cache, store=F32, workers=1, progress=False)
    folder = store_folder(cache, FbankConfig(), F32)
    assert len(list(folder.glob("*.idx.npz"))) == 2  # finished shards survive the interrupt
    victim.write_bytes(good)
    manifest = manifest_of(data, cache_dir=cache, progress=False)
    assert build_store(data, manifest, cache, store=F32, workers=1, progress=False) == len(data) - 4
    # A shard truncated behind our back (disk trouble, a killed copy) is ignored, then rebuilt.
    shard = sorted(folder.glob("*.npy"))[0]
    shard.write_bytes(shard.read_bytes()[:-100])
    # An orphan row file with no index (a crash between the two renames) and a temp file are ignored too.
    (folder / "0123456789abcdef0123456789abcdef.npy").write_bytes(b"\x93NUMPY junk")
    (folder / ".x.npy.tmp").write_bytes(b"half")
    assert build_store(data, manifest, cache, store=F32, workers=1, progress=False) == 2
    exact = extract_features(data, workers=1, progress=False)
    stored = open_store(manifest, cache, store=F32)
    for u in data.utterances:
        assert np.array_equal(stored[u], exact[u])


def test_missing_and_short_audio_name_utterance_and_path(data_dir: Path, tmp_path: Path) -> None:
    data = read_kaldi_dir(data_dir)
    data.utterances["spk0-2"].path.unlink()
    with pytest.raises(DataError, match=r"utterance spk0-2: audio file .*spk0-2\.wav is unreadable"):
        manifest_of(data, cache_dir=tmp_path / "c", progress=False)
    write_tone(data.utterances["spk0-2"].path, seconds=0.01)
    m = manifest_of(data, cache_dir=tmp_path / "c", progress=False)
    with pytest.raises(DataError, match=r"utterance spk0-2: audio file .*spk0-2\.wav: waveform of 160 samples"):
        build_store(data, m, tmp_path / "c", store=F32, workers=1, progress=False)


def test_sources_give_the_same_crops_with_and_without_workers(data_dir: Path, tmp_path: Path) -> None:
    data = read_kaldi_dir(data_dir)
    memory = extract_features(data, workers=1, progress=False)
    manifest = manifest_of(data, cache_dir=tmp_path / "c", progress=False)
    build_store(data, manifest, tmp_path / "c", store=F32, workers=1, progress=False)
    stored = open_store(manifest, tmp_path / "c", store=F32)
    audio = AudioFeatures(data, list(data.utterances))
    labels = np.arange(len(data)) % 3
    # Crops longer than some utterances: tiling is exercised too.
    batches = {name: CropBatches(src, labels, crop=140, batch_size=6, seed=3, workers=w)
               for name, src, w in (("memory", memory, 0), ("store", stored, 0), ("store-w2", stored, 2),
                                    ("audio-w1", audio, 1))}
    try:
        for _ in range(3):
            got = {name: next(b) for name, b in batches.items()}
            x0, y0 = got["memory"]
            assert x0.shape == (6, 140, 80) and x0.dtype == torch.float32
            for name, (x, y) in got.items():
                assert torch.equal(y, y0), name
                assert torch.allclose(x, x0, atol=1e-5), name
    finally:
        for b in batches.values():
            b.close()


def test_auto_mode_is_chosen_by_size_and_logged(data_dir: Path, tmp_path: Path,
                                                caplog: pytest.LogCaptureFixture) -> None:
    data = read_kaldi_dir(data_dir)
    caplog.set_level(logging.INFO, logger="lsv")
    src, mode = open_features(data, cache_dir=tmp_path / "c", progress=False)
    assert mode == "memory" and "fit memory_budget_mb" in caplog.text
    tiny = DataLoading(memory_budget_mb=0.01)
    src, mode = open_features(data, loading=tiny, cache_dir=tmp_path / "c", progress=False)
    assert mode == "store" and type(src).__name__ == "ShardedFeatures" and "exceed" in caplog.text
    src, mode = open_features(data, loading=tiny, progress=False)
    assert mode == "audio" and isinstance(src, AudioFeatures) and "no cache folder" in caplog.text
    with pytest.raises(ConfigError, match="needs a cache folder"):
        open_features(data, loading=DataLoading(features="store"), progress=False)
    with pytest.raises(ConfigError, match="features='disk' is not allowed"):
        DataLoading(features="disk")


def test_evaluation_streams_from_every_source_with_the_same_result(data_dir: Path, tmp_path: Path) -> None:
    data = read_kaldi_dir(data_dir)
    trials_file = tmp_path / "trials"
    utts = list(data.utterances)
    trials_file.write_text("".join(f"{int(a[:4] == b[:4])} {a} {b}\n" for a in utts for b in utts if a < b))
    trials = read_trials(trials_file, data)
    torch.manual_seed(0)
    model = build_model("ThinResNet", m_channels=4, first_stride=2, embed_dim=32).eval()
    manifest = manifest_of(data, cache_dir=tmp_path / "c", progress=False)
    build_store(data, manifest, tmp_path / "c", store=F32, workers=1, progress=False)
    results = [evaluate(model, src, trials, n_boot=0) for src in (
        extract_features(data, workers=1, progress=False), open_store(manifest, tmp_path / "c", store=F32),
        AudioFeatures(data, utts))]
    assert results[0].n_trials == len(trials) == 66
    for r in results[1:]:
        assert r.eer == pytest.approx(results[0].eer, abs=1e-9)
        assert r.min_dcf_001 == pytest.approx(results[0].min_dcf_001, abs=1e-9)


def test_trial_list_with_unknown_utterance_is_refused_with_file_and_line(data_dir: Path, tmp_path: Path) -> None:
    data = read_kaldi_dir(data_dir)
    f = tmp_path / "trials"
    f.write_text("1 spk0-0 spk0-1\n\n0 spk0-0 id10001/nope/00001.wav\n")
    with pytest.raises(DataError, match=r"trials:3: utterance 'id10001/nope/00001\.wav' is not in the data"):
        read_trials(f, data)


def test_training_subset_is_seeded_and_keeps_labels(tmp_path: Path) -> None:
    data = read_kaldi_dir(_data_dir(tmp_path, speakers=6, utts=5, seconds=0.3))
    a = select_training_utts(data, TrainingSubset(speakers=3, utts_per_speaker=2, seed=7))
    b = select_training_utts(data, TrainingSubset(speakers=3, utts_per_speaker=2, seed=7))
    c = select_training_utts(data, TrainingSubset(speakers=3, utts_per_speaker=2, seed=8))
    assert a == b and a != c and len(a) == 6
    assert len({data.utterances[u].speaker for u in a}) == 3
    assert a == [u for u in data.utterances if u in set(a)]  # listing order
    assert select_training_utts(data, TrainingSubset()) == list(data.utterances)
    assert len(select_training_utts(data, TrainingSubset(utts_per_speaker=1))) == 6
    with pytest.raises(ConfigError, match="train_speakers=7 but .* has only 6 speakers"):
        select_training_utts(data, TrainingSubset(speakers=7))
    with pytest.raises(ConfigError, match="speakers=0 should be >= 1"):
        TrainingSubset(speakers=0)


def test_workbench_spec_round_trips_the_new_fields(tmp_path: Path) -> None:
    spec = WorkbenchSpec(checkpoint=tmp_path / "m.safetensors", data=DataPaths(tmp_path, tmp_path, tmp_path / "t"),
                         loading=DataLoading(features="store", loader_workers=2, dtype="float32"),
                         train_subset=TrainingSubset(speakers=10, utts_per_speaker=5, seed=3))
    assert WorkbenchSpec.from_dict(spec.to_dict()) == spec
    old = {k: v for k, v in spec.to_dict().items() if k not in ("loading", "train_subset")}
    assert WorkbenchSpec.from_dict(old).loading == DataLoading()  # specs written before still load


def test_workbench_fine_tunes_a_subset_from_the_store(tiny_study_inputs: dict[str, Path], tmp_path: Path) -> None:
    from lsv_core.quant import BitRecipe
    from lsv_core.quant.msft import MsftSchedule
    from lsv_core.workbench import Workbench

    corpus = tiny_study_inputs["corpus"]
    spec = WorkbenchSpec(checkpoint=tiny_study_inputs["checkpoint"], data=DataPaths.corpus(corpus),
                         cache_dir=tmp_path / "cache", device="cpu",
                         loading=DataLoading(features="store", loader_workers=1),
                         train_subset=TrainingSubset(speakers=4, utts_per_speaker=3, seed=1))
    bench = Workbench.load(spec, progress=False)
    assert len(bench.train) == 12 and type(bench.train).__name__ == "ShardedFeatures"
    assert bench.loader_workers == 1
    full = read_kaldi_dir(corpus / "train")
    all_speakers = full.speakers
    for u in bench.train.utts:  # labels index the head's classes (all training speakers), not the subset's
        assert bench.speakers[u] == all_speakers.index(full.utterances[u].speaker)
    out = bench.run(BitRecipe.uniform(bench.model, 4), MsftSchedule(total_steps=3, batch_size=8), n_boot=0)
    assert np.isfinite(out.eer) and out.stages[-1].steps == 3


def test_study_config_data_fields_reach_the_workbench_and_keep_old_digests(tmp_path: Path) -> None:
    from search.config import parse_study_config

    base = {"study": {"name": "s", "out_dir": str(tmp_path)}, "data": {"corpus": str(tmp_path / "c")}}
    plain = parse_study_config(base)
    explicit = parse_study_config({**base, "data": {**base["data"], "features": "auto", "feature_dtype": "float16",
                                                    "train_speakers": None, "train_subset_seed": 0}})
    assert explicit.digest() == plain.digest()  # studies made before these fields keep their digest
    sub = parse_study_config({**base, "data": {**base["data"], "features": "store", "train_speakers": 50,
                                               "train_utts_per_speaker": 20, "train_subset_seed": 4,
                                               "loader_workers": 2}})
    assert sub.digest() != plain.digest()
    spec = sub.workbench_spec()
    assert spec.loading == DataLoading(features="store", loader_workers=2)
    assert spec.train_subset == TrainingSubset(50, 20, 4)
    with pytest.raises(ConfigError, match=r"data\.train_utts_per_speaker \(got 0\)"):
        parse_study_config({**base, "data": {**base["data"], "train_utts_per_speaker": 0}})
    with pytest.raises(ConfigError, match=r"data\.features \(got 'disk'\)"):
        parse_study_config({**base, "data": {**base["data"], "features": "disk"}})
