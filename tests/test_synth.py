"""The espeak-ng driver and the synthetic corpus: determinism, format, Kaldi lists, trials, SNR."""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import soundfile

from lsv_core.atomic import RefuseOverwrite
from lsv_core.data import espeak, synth
from lsv_core.data.synth import (
    CORPUS_FORMAT,
    SpeakerParams,
    SynthConfig,
    _apply_channel,
    check_corpus,
    corpus_content_hash,
    make_trials,
    speaker_digest,
    speaker_table,
    speaker_utterances,
    synthesize_corpus,
)
from lsv_core.errors import ConfigError, DataError

# Voices picked for their hidden randomness: Reed and klatt4 are Klatt voices (Reed breathy, drawing from
# libc rand()), croak has strong pitch flutter, whisper is noise-excited.
TINY_VARIANTS = ("Reed", "croak", "whisper", "klatt4", "m3", "f2")
TINY = SynthConfig(speakers=6, utts=3, eval_speakers=2, seed=0, variants=TINY_VARIANTS)
DUR_TOLERANCE_S = 0.001  # resampler rounding (a sample or so)


@pytest.fixture(scope="module")
def corpora(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The tiny corpus made with 1 and 2 workers, and with another seed."""
    root = tmp_path_factory.mktemp("synth")
    paths = {"w1": root / "w1", "w2": root / "w2", "seed1": root / "seed1"}
    synthesize_corpus(paths["w1"], TINY, workers=1, progress=False)
    synthesize_corpus(paths["w2"], TINY, workers=2, progress=False)
    synthesize_corpus(
        paths["seed1"],
        SynthConfig(speakers=6, utts=3, eval_speakers=2, seed=1, variants=TINY_VARIANTS),
        progress=False,
    )
    return paths


def _read_map(path: Path) -> dict[str, str]:
    return dict(line.split(" ", 1) for line in path.read_text().splitlines())


def _all_files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_same_bytes_whatever_the_worker_count(corpora: dict[str, Path]) -> None:
    one, two = _all_files(corpora["w1"]), _all_files(corpora["w2"])
    assert one.keys() == two.keys()
    assert len([k for k in one if k.endswith(".wav")]) == TINY.speakers * TINY.utts
    for name in one:
        if name != "corpus.json":  # it names nothing machine-specific, but compare it parsed below
            assert one[name] == two[name], name
    info_one = json.loads(one["corpus.json"])
    info_two = json.loads(two["corpus.json"])
    assert info_one == info_two
    assert info_one["content_sha256"] == corpus_content_hash(corpora["w1"])


def test_another_seed_gives_another_corpus(corpora: dict[str, Path]) -> None:
    assert corpus_content_hash(corpora["w1"]) != corpus_content_hash(corpora["seed1"])


def test_wavs_are_16k_int16_mono_within_their_split_duration(corpora: dict[str, Path]) -> None:
    wavs = sorted((corpora["w1"] / "wav").glob("*/*.wav"))
    assert wavs
    split_of = {s.spk_id: s.split for s in speaker_table(TINY)}
    assert TINY.durations("eval") == (2.0, 3.0) and TINY.durations("train") == (3.0, 5.0)
    for wav in wavs:
        info = soundfile.info(wav)
        assert (info.samplerate, info.channels, info.subtype, info.format) == (16000, 1, "PCM_16", "WAV")
        low, high = TINY.durations(split_of[wav.parent.name])
        assert low - DUR_TOLERANCE_S <= info.duration <= high + DUR_TOLERANCE_S, wav
        samples, _ = soundfile.read(wav, dtype="int16")
        assert np.abs(samples).max() > 1000  # speech, not silence


def test_kaldi_lists_have_disjoint_speakers_and_resolvable_paths(corpora: dict[str, Path]) -> None:
    root = corpora["w1"]
    spk_of: dict[str, dict[str, str]] = {}
    for split in ("train", "eval"):
        folder = root / split
        utt2spk = _read_map(folder / "utt2spk")
        wav_scp = _read_map(folder / "wav.scp")
        assert utt2spk.keys() == wav_scp.keys() == _read_map(folder / "text").keys()
        for utt, rel in wav_scp.items():
            assert not Path(rel).is_absolute()
            assert (folder / rel).resolve() == (root / "wav" / utt2spk[utt] / f"{utt}.wav").resolve()
            assert utt.startswith(utt2spk[utt] + "-")
        spk2utt = {s: us.split() for s, us in _read_map(folder / "spk2utt").items()}
        assert sorted(u for us in spk2utt.values() for u in us) == sorted(utt2spk)
        assert all(utt2spk[u] == s for s, us in spk2utt.items() for u in us)
        spk_of[split] = utt2spk
    train_spk, eval_spk = set(spk_of["train"].values()), set(spk_of["eval"].values())
    assert not train_spk & eval_spk
    assert len(eval_spk) == TINY.eval_speakers
    assert len(train_spk) == TINY.speakers - TINY.eval_speakers


def test_trials_use_eval_utterances_with_correct_labels(corpora: dict[str, Path]) -> None:
    utt2spk = _read_map(corpora["w1"] / "eval" / "utt2spk")
    lines = (corpora["w1"] / "eval" / "trials").read_text().splitlines()
    pairs = set()
    for line in lines:
        enroll, test, label = line.split()
        assert enroll in utt2spk and test in utt2spk
        assert label == ("target" if utt2spk[enroll] == utt2spk[test] else "nontarget")
        pairs.add(frozenset((enroll, test)))
    assert len(pairs) == len(lines)  # no pair twice, in either order
    n_target = sum(line.endswith(" target") for line in lines)
    assert n_target == TINY.eval_speakers * math.comb(TINY.utts, 2)
    info = json.loads((corpora["w1"] / "corpus.json").read_text())
    assert info["counts"]["trials"] == len(lines)
    assert info["counts"]["target_trials"] == n_target


def test_make_trials_ratio_and_uniqueness() -> None:
    utts = [(f"s{s}-{u}", f"s{s}") for s in range(30) for u in range(10)]
    trials = make_trials(utts, nontarget_ratio=4.0, seed=3)
    n_target = sum(t for *_, t in trials)
    assert n_target == 30 * math.comb(10, 2)
    assert len(trials) - n_target == 4 * n_target
    assert len({(e, t) for e, t, _ in trials}) == len(trials)
    assert all(e < t and (e.split("-")[0] == t.split("-")[0]) == tgt for e, t, tgt in trials)
    assert trials == make_trials(list(reversed(utts)), nontarget_ratio=4.0, seed=3)


def test_corpus_json_records_config_speakers_and_totals(corpora: dict[str, Path]) -> None:
    info = json.loads((corpora["w1"] / "corpus.json").read_text())
    assert info["config"]["speakers"] == TINY.speakers and info["config"]["seed"] == TINY.seed
    assert len(info["speakers"]) == TINY.speakers
    for params in info["speakers"].values():
        assert params["accent"] in espeak.list_accents()
        assert params["variant"] in espeak.list_variants()
        assert {"pitch", "pitch_range", "rate_wpm", "split"} <= params.keys()
    durations = [soundfile.info(p).duration for p in (corpora["w1"] / "wav").glob("*/*.wav")]
    assert info["total_seconds"] == pytest.approx(sum(durations), abs=1e-2)


def test_written_audio_is_clean_plus_noise_at_the_drawn_snr(corpora: dict[str, Path]) -> None:
    speaker = speaker_table(TINY)[0]
    for utt in speaker_utterances(speaker, TINY):
        written, rate = soundfile.read(
            corpora["w1"] / "wav" / utt.spk_id / f"{utt.utt_id}.wav", dtype="int16"
        )
        assert rate == TINY.sample_rate
        np.testing.assert_array_equal(written, utt.noisy)
        noise = utt.noisy.astype(np.float64) / 32767.0 - utt.clean.astype(np.float64)
        measured_db = 10 * np.log10(np.mean(utt.clean.astype(np.float64) ** 2) / np.mean(noise**2))
        assert TINY.snr_db[0] <= utt.snr_db <= TINY.snr_db[1]
        assert measured_db == pytest.approx(utt.snr_db, abs=0.1)


def test_refuses_to_overwrite_unless_asked(tmp_path: Path) -> None:
    small = SynthConfig(speakers=2, utts=2, eval_speakers=1)
    out = tmp_path / "corpus"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(RefuseOverwrite, match="overwrite=True"):
        synthesize_corpus(out, small, progress=False)
    assert not (out / "corpus.json").exists()
    first = synthesize_corpus(out, small, overwrite=True, progress=False)
    (out / "wav" / "stray.wav").parent.mkdir(exist_ok=True)
    (out / "wav" / "stray.wav").write_bytes(b"junk")
    second = synthesize_corpus(out, small, overwrite=True, progress=False)
    assert not (out / "wav" / "stray.wav").exists()  # rewritten, not merged
    assert (out / "notes.txt").read_text() == "mine"  # files that are not the corpus's stay
    assert first.content_sha256 == second.content_sha256


def test_list_variants_lists_existing_case_sensitive_files() -> None:
    variants = espeak.list_variants()
    folder = espeak.data_path() / "voices" / "!v"
    assert len(variants) > 50
    assert all((folder / v).is_file() for v in variants)
    assert "m3" in variants and "M3" not in variants
    with pytest.raises(ValueError, match="case-sensitive"):
        espeak.synthesize("Hello.", "en-us+M3")
    with pytest.raises(ValueError, match="accent"):
        espeak.synthesize("Hello.", "xx+m3")
    accents = espeak.list_accents()
    assert {"en", "en-us", "en-029", "en-gb-scotland", "en-gb-x-rp"} <= set(accents)


@pytest.mark.parametrize("voice", ["en-gb-x-rp+f2", "en-us+Reed", "en+croak"])
def test_synthesize_depends_on_arguments_not_history(voice: str) -> None:
    # Reed (Klatt, breathy) also draws from libc rand(); croak has strong flutter.
    args = ("The river is wide today.", voice, 170, 45, 60, 7)
    first = espeak.synthesize(*args)
    espeak.synthesize("Something else entirely, spoken by another voice.", "en-us+Reed", 200, 70, 30, 2)
    again = espeak.synthesize(*args)
    assert first.dtype == np.int16 and len(first) > espeak.SAMPLE_RATE // 2
    np.testing.assert_array_equal(first, again)
    # A session's output is a function of its calls in order.
    runs = []
    for _ in range(2):
        with espeak.Synthesizer() as tts:
            runs.append(
                [tts.synthesize(*args), tts.synthesize("Another one.", "en+m3"), tts.synthesize(*args)]
            )
    for a, b in zip(runs[0], runs[1], strict=True):
        np.testing.assert_array_equal(a, b)


def test_families_are_spread_over_variants_pitch_bands_and_accents() -> None:
    config = SynthConfig()
    speakers = speaker_table(config)
    assert speakers == speaker_table(config)
    assert len(speakers) == 400 and config.family_size == 4
    families: dict[int, list] = {}
    for s in speakers:
        families.setdefault(s.family, []).append(s)
    assert all(len(members) == 4 for members in families.values())
    heads = [members[0] for members in families.values()]
    variants = {s.variant for s in heads}
    assert not variants & espeak.UNPITCHED_VARIANTS
    max_uses = math.ceil(len(families) / len(variants))
    assert max(sum(s.variant == v for s in heads) for v in variants) <= max_uses
    accent_counts = [sum(s.accent == a for s in heads) for a in espeak.list_accents()]
    assert max(accent_counts) - min(accent_counts) <= 2
    for members in families.values():
        # Siblings share the voice and sit close together: the confusable voices.
        assert len({(s.accent, s.variant) for s in members}) == 1
        assert max(s.pitch for s in members) - min(s.pitch for s in members) <= 2 * synth._FAMILY_PITCH_SPREAD + 1
        spread = synth._FAMILY_FORMANT_SPREAD
        assert max(s.formant_scale for s in members) / min(s.formant_scale for s in members) <= (1 + spread + 1e-3) / (1 - spread - 1e-3)
        low, high = config.formant_scale
        assert all(low * (1 - spread) - 1e-3 <= s.formant_scale <= high * (1 + spread) + 1e-3 for s in members)
        # A family is wholly train or wholly eval (80 eval speakers = 20 whole families).
        assert len({s.split for s in members}) == 1
    assert sum(s.split == "eval" for s in speakers) == config.n_eval_speakers == 80
    # Families sharing a variant sit in different pitch bands (families' own pitch before the offsets).
    bands: dict[str, list[float]] = {}
    for members in families.values():
        bands.setdefault(members[0].variant, []).append(np.mean([s.pitch for s in members]))
    assert all(min(np.diff(sorted(b)), default=99) > 2 for b in bands.values())


def test_family_size_one_gives_every_speaker_its_own_voice() -> None:
    speakers = speaker_table(SynthConfig(speakers=60, family_size=1))
    assert len({s.family for s in speakers}) == 60
    assert len({(s.variant, (s.pitch - 10) // 20) for s in speakers}) == 60


def _spectral_centroid(x: np.ndarray, sample_rate: int) -> float:
    power = np.abs(np.fft.rfft(x.astype(np.float64))) ** 2
    freqs = np.fft.rfftfreq(len(x), 1.0 / sample_rate)
    return float((power * freqs).sum() / power.sum())


def test_formant_scale_moves_the_spectrum_up() -> None:
    quiet = SynthConfig(speakers=2, utts=3, eval_speakers=1, eval_dur=None, snr_db=(60.0, 60.0), eq_db=0.0,
                        bandlimit_prob=0.0, reverb_prob=0.0)
    base = SpeakerParams("spk0001", 0, "train", "en-us", "m3", pitch=40, pitch_range=50, rate_wpm=170)
    centroids = {}
    for scale in (0.9, 1.1):
        speaker = SpeakerParams(**{**base.__dict__, "formant_scale": scale})
        centroids[scale] = np.mean([_spectral_centroid(u.clean, 16000) for u in speaker_utterances(speaker, quiet)])
    assert centroids[1.1] > 1.08 * centroids[0.9]


def test_channel_band_limits_and_reverberates() -> None:
    rng_a, rng_b = np.random.default_rng(0), np.random.default_rng(0)
    impulse = np.zeros(16000, dtype=np.float32)
    impulse[100] = 1.0
    off = SynthConfig(eq_db=0.0, bandlimit_prob=0.0, reverb_prob=0.0)
    np.testing.assert_array_equal(_apply_channel(rng_a, impulse, off), impulse)
    room = _apply_channel(rng_b, impulse, SynthConfig(eq_db=0.0, bandlimit_prob=1.0, reverb_prob=1.0))
    assert len(room) == len(impulse)
    # The room leaves energy well after the direct sound (at least 150 ms of RT60).
    tail = room[100 + 800 :]
    assert np.sum(tail**2) > 1e-3 * np.sum(room**2)
    # The band limit: 1 kHz passes, 60 Hz and 7.5 kHz are cut (corners 150-400 Hz and 3-5 kHz).
    gain = np.abs(np.fft.rfft(_apply_channel(np.random.default_rng(1), impulse, SynthConfig(
        eq_db=0.0, bandlimit_prob=1.0, reverb_prob=0.0))))
    freqs = np.fft.rfftfreq(len(impulse), 1 / 16000)
    at = {f: gain[np.argmin(np.abs(freqs - f))] for f in (60, 1000, 7500)}
    assert at[1000] > 0.9 and at[60] < 0.1 and at[7500] < 0.1


# -- the corpus the shipped baseline was trained on --------------------------------------------------------
SHIPPED = Path(__file__).resolve().parents[1] / "baselines" / "quickstart" / "corpus.json"


def test_shipped_baseline_was_trained_on_the_default_corpus() -> None:
    shipped = json.loads(SHIPPED.read_text())
    # `lsv corpus synth` writes the default eval-speaker count out; SynthConfig() leaves it None.
    config = SynthConfig(**shipped["config"])
    assert replace(config, eval_speakers=None) == SynthConfig()
    assert config.n_eval_speakers == SynthConfig().n_eval_speakers
    assert shipped["format"] == CORPUS_FORMAT


def test_this_machine_speaks_the_shipped_corpus_speakers_bit_identically() -> None:
    """A fresh machine reproduces the corpus the shipped baseline was trained on: two speakers (one
    training, one evaluation) synthesised here hash to what the manifest recorded."""
    shipped = json.loads(SHIPPED.read_text())
    config = SynthConfig()
    speakers = speaker_table(config)
    for speaker in (speakers[0], next(s for s in speakers if s.split == "eval")):
        assert speaker_digest(speaker, config) == shipped["speaker_sha256"][speaker.spk_id], speaker.spk_id


@pytest.mark.slow
def test_this_machine_reproduces_the_whole_shipped_corpus(default_corpus: Path) -> None:
    summary = json.loads((default_corpus / "corpus.json").read_text())
    shipped = json.loads(SHIPPED.read_text())
    assert summary["content_sha256"] == shipped["content_sha256"]
    check_corpus(default_corpus, SHIPPED)  # what `make demo` checks before using the shipped baseline


def test_check_corpus_names_what_differs(corpora: dict[str, Path], tmp_path: Path) -> None:
    check_corpus(corpora["w1"], corpora["w2"] / "corpus.json")
    with pytest.raises(DataError, match="content_sha256 differs|config differs"):
        check_corpus(corpora["w1"], corpora["seed1"] / "corpus.json")
    with pytest.raises(DataError, match="no corpus"):
        check_corpus(tmp_path, corpora["w1"] / "corpus.json")


@pytest.mark.parametrize(
    "kwargs",
    [
        {"speakers": 1},
        {"utts": 1},
        {"speakers": 4, "eval_speakers": 4},
        {"min_dur": 5.0, "max_dur": 3.0},
        {"snr_db": (30.0, 15.0)},
        {"eval_dur": (2.0, 1.0)},
        {"family_size": 0},
        {"formant_scale": (0.5, 1.0)},
        {"reverb_prob": 1.5},
        {"eq_db": -1.0},
        {"variants": ("M3",)},
        {"accents": ("fr",)},
    ],
)
def test_config_rejects_bad_values(kwargs: dict[str, object]) -> None:
    with pytest.raises(ConfigError):
        SynthConfig(**kwargs)  # type: ignore[arg-type]
