"""A deterministic synthetic multi-speaker corpus spoken by espeak-ng, in Kaldi layout.

A *speaker* is a fixed combination of English accent, espeak-ng voice variant, base pitch, pitch range,
speaking rate and vocal-tract length (a formant scale); each utterance jitters pitch, range and rate a
little, speaks random sentences of common words, passes through a random channel (equaliser, sometimes
a band limit and a room) and gets coloured background noise at a random SNR. Training utterances last
``min_dur``-``max_dur`` seconds, evaluation utterances ``eval_dur`` (short test segments).

What makes the task hard enough that quantization costs accuracy (issue 14): speakers come in *families*
of ``family_size`` that share accent and voice variant and differ only by small offsets of pitch, rate,
range and formant scale, so every speaker has confusable siblings (a family is wholly train or wholly
eval); the channel and the noise (8-20 dB) are nuisances the network must ignore; test segments are 2-3 s.

Every random choice derives from ``(seed, speaker, utterance index)`` only. espeak-ng also carries hidden
state from one utterance to the next (see :mod:`lsv_core.data.espeak`), so each speaker's utterances are
spoken in order in one fresh :class:`~lsv_core.data.espeak.Synthesizer` session: a speaker's audio is a
function of the config and the speaker alone, and the corpus is bit-identical whatever the number of
worker processes or the order they finish in (``corpus.json`` records a content hash to check that).
Raising ``utts`` keeps the earlier utterances unchanged.

Layout written by :func:`synthesize_corpus`::

    out_dir/wav/<spk>/<utt>.wav            16-bit PCM mono at config.sample_rate (16 kHz)
    out_dir/{train,eval}/wav.scp           "<utt> ../wav/<spk>/<utt>.wav" (relative to the wav.scp folder)
    out_dir/{train,eval}/utt2spk, spk2utt, text
    out_dir/eval/trials                    "<enroll_utt> <test_utt> target|nontarget"
    out_dir/corpus.json                    written last: a corpus without it is incomplete

Train and eval speakers are disjoint. Example::

    from lsv_core.data.synth import SynthConfig, synthesize_corpus
    summary = synthesize_corpus("data/synth", SynthConfig(), workers=2)
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import io
import json
import math
import multiprocessing
import os
import shutil
import sys
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field, replace
from functools import lru_cache
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from lsv_core.atomic import RefuseOverwrite, write_text_atomic
from lsv_core.data import espeak
from lsv_core.errors import ConfigError, DataError

# Default size: 320 train + 80 eval speakers x 20 utterances (8,000 wavs); the 1,600 short eval
# utterances give 15,200 target + 76,000 non-target trials. Timings are in BENCHMARKS.md (issue 14).
DEFAULT_SPEAKERS = 400
DEFAULT_UTTS = 20
DEFAULT_SEED = 0
DEFAULT_FAMILY_SIZE = 4
EVAL_FRACTION = 0.2
"""Share of speakers held out for evaluation when ``SynthConfig.eval_speakers`` is None."""
DEFAULT_EVAL_SPEAKERS = round(EVAL_FRACTION * DEFAULT_SPEAKERS)  # 40

CORPUS_FORMAT = "lsv-synth-corpus/2"

_T = TypeVar("_T")

# Speaker parameter ranges, in espeak-ng units (pitch and range 0-99, 50 = the variant's own value).
_PITCH_SPAN = (10, 90)  # outside this, pitch_adjust_tab saturates and voices turn squeaky or growly
_PITCH_RANGE_SPAN = (20, 80)
_RATE_WPM_SPAN = (140, 210)
_MIN_PITCH_BANDS = 4
# A family member's offsets from its family's values: siblings are close enough to be confused on a
# short segment, yet each keeps a stable identity (offsets are per speaker, jitter per utterance).
_FAMILY_PITCH_SPREAD = 8  # pitch units, +-
_FAMILY_RANGE_SPREAD = 10  # pitch-range units, +-
_FAMILY_RATE_SPREAD = 0.10  # relative, +-
_FAMILY_FORMANT_SPREAD = 0.04  # relative, +-
# Per-utterance jitter around the speaker's values: small enough that the speaker stays recognisable.
_PITCH_JITTER = 3
_PITCH_RANGE_JITTER = 5
_RATE_JITTER = 0.06  # relative
# Speech level before noise, dBFS of the utterance RMS; the spread stops level being a speaker cue.
_SPEECH_LEVEL_DBFS = (-28.0, -18.0)
_TRIM_THRESHOLD_DB = -40.0  # frames this far below the loudest 10 ms frame count as silence
_TRIM_MARGIN_S = 0.02
_FADE_S = 0.01
_SENTENCE_PAUSE_S = (0.1, 0.3)  # silence between the sentences of one utterance
_MAX_SENTENCES = 8
# Channel: equaliser anchors (log-spaced, Hz), band-limit corners (Hz), room reverberation time (s) and
# direct-to-reverberant ratio (dB). The room is a direct path plus exponentially decaying noise.
_EQ_ANCHORS_HZ = (100.0, 300.0, 900.0, 2700.0, 8000.0)
_BAND_LOW_HZ = (150.0, 400.0)
_BAND_HIGH_HZ = (3000.0, 5000.0)
_BAND_ORDER = 4  # Butterworth-like magnitude roll-off of the band limit
_RT60_S = (0.1, 0.4)
_DRR_DB = (3.0, 12.0)

# Streams of SeedSequence([seed, stream, ...]): independent draws for each purpose.
_STREAM_SPEAKERS, _STREAM_UTTERANCE, _STREAM_TRIALS = 0, 1, 2

WORDS: tuple[str, ...] = tuple(
    """
    about above across after again against air all almost along also always among and animal another
    answer any appear are area around ask away back ball base be bear beauty because bed been before began
    begin behind being below best better between big bird black blue boat body book both bottom box boy
    bring brother brought build built busy but buy call came can car care carry case cat cause center
    certain change check child children city class clear close cold color come common complete cook
    country course cover cross cut dark day deep develop did different dinner direct do does dog done door
    down draw dream drive dry during each early earth east easy eat edge either else end enough even
    evening ever every example eye face fact fall family far farm fast father feel feet field figure fill
    final find fine fire first fish five floor follow food foot for force forest form found four free
    friend from front full game garden gave general get girl give glass go gold good got great green
    ground group grow half hand happen happy hard have he head hear heard heart heavy help her here high
    hill him his hold home horse hot hour house how hundred idea if important in inside island it just
    keep kind king knew know lady land language large last late laugh lay lead learn leave left less let
    letter life light like line list listen little live long look love low made main make man many map
    mark may mean measure meet men might mile mind minute miss money month moon more morning most mother
    mountain move much music must my name near need never new next night north nothing notice now number
    ocean of off often old on once one only open or order other our out over own page paper part pass
    people perhaps person picture piece place plain plan plant play point poor possible power press pull
    put question quick quiet rain ran reach read ready real red remember rest right river road rock room
    round run said same saw say school sea second see seem sentence set several shape she ship short
    should show side simple since sing sister sit six size sleep slow small snow so some something song
    soon sound south space speak special spring stand star start state stay step still stone stood stop
    story street strong study such summer sun sure surface table tail take talk teacher tell ten than that
    the their them then there these they thing think this those though thought three through time today
    together told too took top toward town travel tree true try turn two under until up upon us use usual
    very voice wait walk wall want warm was watch water way we weather week well went were west what
    wheel when where which while white who whole why wide wild will wind window winter with without wood
    word work world would write year yellow yes yet you young
    """.split()
)
"""Common English words that sentences are drawn from (espeak-ng reads all of them without spelling)."""


@dataclass(frozen=True)
class SynthConfig:
    """What corpus to synthesise; every field is recorded in ``corpus.json``.

    Attributes:
        speakers: total number of speakers (train + eval), >= 2.
        utts: utterances per speaker, >= 2 (target trials need two).
        seed: master seed; the whole corpus is a function of the config.
        eval_speakers: speakers held out for evaluation; None means ``round(EVAL_FRACTION * speakers)``
            (at least 1). Must leave at least one training speaker.
        sample_rate: output sample rate in Hz.
        min_dur, max_dur: training utterance duration bounds in seconds (after silence trimming).
        eval_dur: (low, high) duration bounds of evaluation utterances in seconds; None means the
            training bounds. Short test segments make verification harder.
        snr_db: (low, high) bounds of the uniform per-utterance signal-to-noise ratio in dB.
        nontarget_ratio: non-target eval trials per target trial (capped by the pairs that exist).
        accents: espeak-ng English accents to draw from; None means all of ``espeak.list_accents()``.
        variants: voice variants to draw from; None means every variant file except the unpitched ones.
        family_size: speakers per family; siblings share accent and variant and differ by small
            offsets of pitch, range, rate and formant scale (1: every speaker is a family of its own).
        formant_scale: (low, high) bounds of a family's vocal-tract scale: espeak-ng's samples are
            resampled as if spoken at this multiple of its rate, which scales formants, pitch and tempo.
        eq_db: per-utterance equaliser gains are drawn in +-eq_db dB at a few log-spaced frequencies.
        bandlimit_prob: share of utterances band-limited (telephone-like corners).
        reverb_prob: share of utterances spoken in a synthetic room.
    """

    speakers: int = DEFAULT_SPEAKERS
    utts: int = DEFAULT_UTTS
    seed: int = DEFAULT_SEED
    eval_speakers: int | None = None
    sample_rate: int = 16000
    min_dur: float = 3.0
    max_dur: float = 5.0
    eval_dur: tuple[float, float] | None = (2.0, 3.0)
    snr_db: tuple[float, float] = (8.0, 20.0)
    nontarget_ratio: float = 5.0
    accents: tuple[str, ...] | None = None
    variants: tuple[str, ...] | None = None
    family_size: int = DEFAULT_FAMILY_SIZE
    formant_scale: tuple[float, float] = (0.9, 1.1)
    eq_db: float = 4.0
    bandlimit_prob: float = 0.2
    reverb_prob: float = 0.3

    def __post_init__(self) -> None:
        # Accept lists (from TOML/JSON) but store tuples, so the config stays hashable and comparable.
        for name in ("snr_db", "formant_scale", "eval_dur"):
            if getattr(self, name) is not None:
                object.__setattr__(self, name, tuple(float(x) for x in getattr(self, name)))
        for name in ("accents", "variants"):
            if getattr(self, name) is not None:
                object.__setattr__(self, name, tuple(getattr(self, name)))
        if self.speakers < 2:
            raise ConfigError(f"speakers={self.speakers} should be >= 2 (one train and one eval speaker)")
        if self.utts < 2:
            raise ConfigError(f"utts={self.utts} should be >= 2 (a target trial needs two utterances)")
        if self.eval_speakers is not None and not 1 <= self.eval_speakers < self.speakers:
            raise ConfigError(
                f"eval_speakers={self.eval_speakers} should be in [1, speakers-1={self.speakers - 1}]"
            )
        if not 8000 <= self.sample_rate <= espeak.SAMPLE_RATE:
            raise ConfigError(f"sample_rate={self.sample_rate} should be in [8000, {espeak.SAMPLE_RATE}] Hz")
        if not 0.5 <= self.min_dur <= self.max_dur:
            raise ConfigError(
                f"min_dur={self.min_dur}, max_dur={self.max_dur}: need 0.5 <= min_dur <= max_dur (seconds)"
            )
        if self.eval_dur is not None and (len(self.eval_dur) != 2 or not 0.5 <= self.eval_dur[0] <= self.eval_dur[1]):
            raise ConfigError(f"eval_dur={self.eval_dur} should be (low, high) seconds with 0.5 <= low <= high")
        if len(self.snr_db) != 2 or self.snr_db[0] > self.snr_db[1]:
            raise ConfigError(f"snr_db={self.snr_db} should be (low, high) with low <= high, in dB")
        if self.nontarget_ratio < 0:
            raise ConfigError(f"nontarget_ratio={self.nontarget_ratio} should be >= 0")
        if self.family_size < 1:
            raise ConfigError(f"family_size={self.family_size} should be >= 1")
        if len(self.formant_scale) != 2 or not 0.8 <= self.formant_scale[0] <= self.formant_scale[1] <= 1.25:
            raise ConfigError(f"formant_scale={self.formant_scale} should be (low, high) with 0.8 <= low <= high <= 1.25")
        if not 0.0 <= self.eq_db <= 20.0:
            raise ConfigError(f"eq_db={self.eq_db} should be in [0, 20] dB")
        for name in ("bandlimit_prob", "reverb_prob"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ConfigError(f"{name}={getattr(self, name)} should be a probability in [0, 1]")
        if self.accents is not None:
            known = espeak.list_accents()
            unknown = sorted(set(self.accents) - set(known))
            if unknown or not self.accents:
                raise ConfigError(f"accents={self.accents}: {unknown or 'empty'}; allowed: {known}")
        if self.variants is not None:
            known_variants = set(espeak.list_variants())
            unknown = sorted(set(self.variants) - known_variants)
            if unknown or not self.variants:
                raise ConfigError(
                    f"variants={self.variants}: {unknown or 'empty'} not in espeak.list_variants() (case-sensitive)"
                )

    @property
    def n_eval_speakers(self) -> int:
        """Eval speakers after applying the default fraction."""
        if self.eval_speakers is not None:
            return self.eval_speakers
        return min(self.speakers - 1, max(1, round(EVAL_FRACTION * self.speakers)))

    def durations(self, split: str) -> tuple[float, float]:
        """(low, high) utterance duration in seconds for ``split`` ("train" or "eval")."""
        if split == "eval" and self.eval_dur is not None:
            return self.eval_dur
        return self.min_dur, self.max_dur

    @property
    def longest_s(self) -> float:
        return max(self.max_dur, self.eval_dur[1] if self.eval_dur is not None else 0.0)


@dataclass(frozen=True)
class SpeakerParams:
    """One synthetic speaker: espeak-ng voice ``accent+variant`` with pitch/range (0-99), rate (wpm) and
    formant scale (vocal-tract length, 1 = the variant's own); ``family`` groups confusable siblings."""

    spk_id: str
    index: int
    split: str  # "train" or "eval"
    accent: str
    variant: str
    pitch: int
    pitch_range: int
    rate_wpm: int
    formant_scale: float = 1.0
    family: int = 0

    @property
    def voice(self) -> str:
        return f"{self.accent}+{self.variant}"


@dataclass(frozen=True)
class Utterance:
    """One synthesised utterance; ``clean`` and ``noisy`` are aligned and at the config's sample rate.

    Attributes:
        clean: the speech alone, float32 in [-1, 1] full scale, exactly as mixed into ``noisy``.
        noisy: the written samples, int16 = round(32767-scaled clean + noise).
        snr_db: the SNR drawn for this utterance, in dB (speech power over noise power, whole utterance).
    """

    utt_id: str
    spk_id: str
    text: str
    clean: np.ndarray
    noisy: np.ndarray
    snr_db: float
    sample_rate: int

    @property
    def duration_s(self) -> float:
        return len(self.noisy) / self.sample_rate


@dataclass(frozen=True)
class CorpusSummary:
    """What :func:`synthesize_corpus` wrote (the same numbers are in ``corpus.json``)."""

    out_dir: Path
    n_train_speakers: int
    n_eval_speakers: int
    n_train_utterances: int
    n_eval_utterances: int
    n_trials: int
    n_target: int
    n_nontarget: int
    total_seconds: float
    content_sha256: str
    elapsed_seconds: float = field(compare=False)


def utterance_id(spk_id: str, utt_index: int) -> str:
    """Kaldi utterance id: speaker id first, so sorting by utterance also groups by speaker."""
    return f"{spk_id}-{utt_index:04d}"


def _usable_variants(config: SynthConfig) -> list[str]:
    if config.variants is not None:
        return sorted(set(config.variants))
    return [v for v in espeak.list_variants() if v not in espeak.UNPITCHED_VARIANTS]


def speaker_table(config: SynthConfig) -> list[SpeakerParams]:
    """Draw the speakers of ``config``: deterministic in ``config.seed``.

    Speaker ``i`` belongs to family ``i // family_size``. Families are kept apart: family ``f`` takes
    variant ``f mod V`` of a shuffled variant list and, on its ``f // V``-th use of that variant, the next
    band of a per-variant shuffle of ``B = max(4, ceil(families / V))`` equal pitch bands; accents rotate
    so that each is used about equally and a variant's repeats get different accents. Siblings share
    accent and variant and are drawn close together (``_FAMILY_*_SPREAD`` around the family's values):
    they are the confusable voices. Evaluation speakers are whole families, drawn at random (the last
    one cut short when ``eval_speakers`` is not a multiple of ``family_size``).
    """
    rng = np.random.default_rng([config.seed, _STREAM_SPEAKERS])
    variants = [str(v) for v in rng.permutation(_usable_variants(config))]
    accents = [str(a) for a in rng.permutation(sorted(config.accents or espeak.list_accents()))]
    n_var, n_acc = len(variants), len(accents)
    n_families = math.ceil(config.speakers / config.family_size)
    n_bands = max(_MIN_PITCH_BANDS, math.ceil(n_families / n_var))
    band_orders = [rng.permutation(n_bands) for _ in range(n_var)]
    eval_set: set[int] = set()
    for f in rng.permutation(n_families).tolist():
        members = range(f * config.family_size, min((f + 1) * config.family_size, config.speakers))
        for i in members:
            if len(eval_set) < config.n_eval_speakers:
                eval_set.add(i)
    lo, hi = _PITCH_SPAN
    band_width = (hi - lo) / n_bands
    speakers = []
    for f in range(n_families):
        v, use = f % n_var, f // n_var
        band_lo = lo + int(band_orders[v][use]) * band_width
        pitch = band_lo + rng.uniform(0.0, band_width)
        pitch_range = rng.uniform(*_PITCH_RANGE_SPAN)
        rate = rng.uniform(*_RATE_WPM_SPAN)
        formant = rng.uniform(*config.formant_scale)
        for i in range(f * config.family_size, min((f + 1) * config.family_size, config.speakers)):
            # A lone speaker (family_size 1) sits at its family's values: no sibling to keep apart from.
            alone = config.family_size == 1
            d_pitch, d_range, d_rate, d_formant = (0.0, 0.0, 0.0, 0.0) if alone else rng.uniform(-1.0, 1.0, 4)
            speakers.append(
                SpeakerParams(
                    spk_id=f"spk{i + 1:04d}",
                    index=i,
                    split="eval" if i in eval_set else "train",
                    accent=accents[(v + use) % n_acc],
                    variant=variants[v],
                    pitch=int(np.clip(round(pitch + d_pitch * _FAMILY_PITCH_SPREAD), lo, hi - 1)),
                    pitch_range=int(np.clip(round(pitch_range + d_range * _FAMILY_RANGE_SPREAD), 0, 99)),
                    rate_wpm=int(round(rate * (1 + d_rate * _FAMILY_RATE_SPREAD))),
                    formant_scale=round(float(formant * (1 + d_formant * _FAMILY_FORMANT_SPREAD)), 4),
                    family=f,
                )
            )
    return speakers


def _random_sentence(rng: np.random.Generator, n_words: int) -> str:
    words = [WORDS[i] for i in rng.integers(0, len(WORDS), size=n_words)]
    if n_words >= 6 and rng.random() < 0.3:
        # A comma gives a phrase break, as people pause mid-sentence.
        cut = int(rng.integers(2, n_words - 2))
        words[cut] += ","
    words[0] = words[0].capitalize()
    # Questions end on a rising pitch: more intonation variety per speaker.
    return " ".join(words) + ("?" if rng.random() < 0.2 else ".")


def _frame_rms(x: np.ndarray, frame: int) -> np.ndarray:
    n = len(x) // frame
    return np.sqrt(np.mean(x[: n * frame].reshape(n, frame) ** 2, axis=1) + 1e-12)


def _trim_silence(x: np.ndarray, sample_rate: int) -> np.ndarray:
    """Cut leading/trailing frames more than 40 dB below the loudest 10 ms frame, keeping 20 ms margins."""
    frame = sample_rate // 100
    rms = _frame_rms(x, frame)
    if len(rms) == 0:
        return x
    loud = np.nonzero(rms > rms.max() * 10 ** (_TRIM_THRESHOLD_DB / 20))[0]
    margin = int(_TRIM_MARGIN_S * sample_rate)
    start = max(0, loud[0] * frame - margin)
    stop = min(len(x), (loud[-1] + 1) * frame + margin)
    return x[start:stop]


def _cut_to_duration(x: np.ndarray, sample_rate: int, target_s: float, min_s: float) -> np.ndarray:
    """Shorten ``x`` to at most ``target_s`` seconds, cutting at the quietest 10 ms frame of the last
    0.5 s before the target (a word gap, usually) but never below ``min_s``; fade out the cut."""
    if len(x) <= target_s * sample_rate:
        return x
    frame = sample_rate // 100
    # Candidate cuts are frame ends (lo + k + 1) * frame, all within [min_s, target_s].
    lo = math.ceil(max(min_s, target_s - 0.5) * sample_rate / frame)
    hi = int(target_s * sample_rate) // frame
    rms = _frame_rms(x[: hi * frame], frame)[lo:hi]
    stop = (lo + int(np.argmin(rms)) + 1) * frame if len(rms) else int(target_s * sample_rate)
    y = x[:stop].copy()
    fade = min(len(y), int(_FADE_S * sample_rate))
    y[len(y) - fade :] *= 0.5 * (1 + np.cos(np.linspace(0, np.pi, fade, dtype=np.float32)))
    return y


def _fft_length(n: int) -> int:
    """Smallest 2^a 3^b 5^c >= n: pocketfft is slow on lengths with a large prime factor."""
    best = 1 << max(0, (n - 1).bit_length())
    p5 = 1
    while p5 < best:
        p35 = p5
        while p35 < best:
            p235 = p35
            while p235 < n:
                p235 *= 2
            best = min(best, p235)
            p35 *= 3
        p5 *= 5
    return best


@lru_cache(maxsize=8)
def _noise_power_shapes(n_fft: int, sample_rate: int) -> np.ndarray:
    """(3, n_fft // 2 + 1) power spectra of white, pink (1/f) and brown (1/f^2) noise, each of mean 1."""
    freqs = np.fft.rfftfreq(n_fft, d=1.0 / sample_rate)
    # Reference 1 kHz; clamp below 20 Hz so brown noise does not turn into a DC drift.
    f = np.maximum(freqs, 20.0) / 1000.0
    shapes = np.stack([np.ones_like(f), 1.0 / f, 1.0 / f**2])
    return shapes / shapes.mean(axis=1, keepdims=True)


def _coloured_noise(rng: np.random.Generator, n: int, n_fft: int, sample_rate: int) -> np.ndarray:
    """``n`` samples of unit-RMS noise whose power spectrum mixes white, pink and brown noise in random
    shares; made as one ``n_fft``-point spectrum (``n_fft >= n``, fixed per config so shapes are cached)."""
    weights = rng.dirichlet(np.ones(3))
    amplitude = np.sqrt(weights @ _noise_power_shapes(n_fft, sample_rate)).astype(np.float32)
    re_im = rng.standard_normal((2, len(amplitude)), dtype=np.float32)
    spectrum = (re_im[0] + 1j * re_im[1]) * amplitude
    spectrum[0] = 0.0
    noise = np.fft.irfft(spectrum, n=n_fft)[:n].astype(np.float32)
    return noise / np.float32(np.sqrt(np.mean(noise.astype(np.float64) ** 2)) + 1e-20)


def speaker_utterances(speaker: SpeakerParams, config: SynthConfig) -> Iterator[Utterance]:
    """Synthesise the ``config.utts`` utterances of ``speaker`` in order, in one fresh espeak-ng session.

    This is exactly what :func:`synthesize_corpus` writes (``Utterance.noisy`` is the wav's content).
    """
    with espeak.Synthesizer() as tts:
        for utt_index in range(config.utts):
            yield _make_utterance(tts, speaker, utt_index, config)


def _make_utterance(
    tts: espeak.Synthesizer, speaker: SpeakerParams, utt_index: int, config: SynthConfig
) -> Utterance:
    """Steps: jitter pitch/range/rate; draw a target duration within the split's bounds; speak random
    sentences (silence trimmed) until it is reached; cut at a quiet frame near the target; resample to
    ``config.sample_rate`` with soxr, reading espeak-ng's samples as if taken at ``formant_scale`` times
    its rate (the vocal-tract scale); pass through a random channel; set a random speech level; add
    coloured noise at a random SNR.
    """
    import soxr  # imported here so that reading manifests does not need it

    rng = np.random.default_rng([config.seed, _STREAM_UTTERANCE, speaker.index, utt_index])
    pitch = int(np.clip(speaker.pitch + rng.integers(-_PITCH_JITTER, _PITCH_JITTER + 1), 0, 99))
    pitch_range = int(
        np.clip(speaker.pitch_range + rng.integers(-_PITCH_RANGE_JITTER, _PITCH_RANGE_JITTER + 1), 0, 99)
    )
    rate = int(round(speaker.rate_wpm * rng.uniform(1 - _RATE_JITTER, 1 + _RATE_JITTER)))
    rate = int(np.clip(rate, *espeak.RATE_WPM_RANGE))
    min_s, max_s = config.durations(speaker.split)
    target_s = float(rng.uniform(min_s, max_s))
    # Durations below are in output time: the samples play back formant_scale times faster.
    sr_in = round(espeak.SAMPLE_RATE * speaker.formant_scale)
    target_n = int(target_s * sr_in)
    # Speak sentences until the target is reached, each sized for what is missing: espeak-ng speaks these
    # short words in 0.6-1.1x their nominal time (0.86x on average), so 1.2x words mostly reach it in one
    # sentence, and a top-up sentence costs only the deficit (cheaper than re-speaking a longer one).
    pieces: list[np.ndarray] = []
    texts: list[str] = []
    total = 0
    while total < target_n:
        if len(texts) == _MAX_SENTENCES:
            raise RuntimeError(
                f"{speaker.voice} at {rate} wpm stayed below {target_s:.2f} s in {len(texts)} sentences"
            )
        missing_s = (target_n - total) / sr_in
        words_per_s = rate * speaker.formant_scale / 60
        text = _random_sentence(rng, math.ceil(missing_s * 1.2 * words_per_s) + 1)
        espeak_seed = int(rng.integers(1, 2**31 - 1))
        raw = tts.synthesize(text, speaker.voice, rate, pitch, pitch_range, espeak_seed)
        if pieces:
            pieces.append(np.zeros(int(rng.uniform(*_SENTENCE_PAUSE_S) * sr_in), dtype=np.float32))
        pieces.append(_trim_silence(raw.astype(np.float32) / 32768.0, sr_in))
        texts.append(text)
        total = sum(len(p) for p in pieces)
    text = " ".join(texts)
    speech = np.concatenate(pieces)
    speech = _cut_to_duration(speech, sr_in, target_s, min_s)
    if config.sample_rate != sr_in:
        speech = soxr.resample(speech, sr_in, config.sample_rate, quality="HQ").astype(np.float32)
    speech = _apply_channel(rng, speech, config)

    level_dbfs = rng.uniform(*_SPEECH_LEVEL_DBFS)
    speech_rms = float(np.sqrt(np.mean(speech.astype(np.float64) ** 2)))
    clean = speech * np.float32(10 ** (level_dbfs / 20) / max(speech_rms, 1e-9))
    snr_db = float(rng.uniform(*config.snr_db))
    clean_power = float(np.mean(clean.astype(np.float64) ** 2))
    # One FFT length per config (the clip is at most the longest duration; max() covers resampler rounding).
    n_fft = _fft_length(max(len(clean), math.ceil(config.longest_s * config.sample_rate)))
    noise = _coloured_noise(rng, len(clean), n_fft, config.sample_rate) * np.float32(
        math.sqrt(clean_power / 10 ** (snr_db / 10))
    )
    mixed = clean + noise
    peak = float(np.max(np.abs(mixed)))
    if peak > 0.97:
        # Scale speech and noise together: avoids clipping and keeps the SNR.
        gain = np.float32(0.97 / peak)
        clean, mixed = clean * gain, mixed * gain
    noisy = np.round(mixed * 32767.0).astype(np.int16)
    return Utterance(
        utt_id=utterance_id(speaker.spk_id, utt_index),
        spk_id=speaker.spk_id,
        text=text,
        clean=clean.astype(np.float32),
        noisy=noisy,
        snr_db=snr_db,
        sample_rate=config.sample_rate,
    )


def _room_response(rng: np.random.Generator, sample_rate: int) -> np.ndarray:
    """A synthetic room impulse response: a unit direct path, then Gaussian noise decaying by 60 dB over
    a random RT60, scaled to a random direct-to-reverberant ratio."""
    rt60 = float(rng.uniform(*_RT60_S))
    drr_db = float(rng.uniform(*_DRR_DB))
    n = int(rt60 * sample_rate)
    t = np.arange(1, n, dtype=np.float64) / sample_rate
    tail = rng.standard_normal(n - 1) * np.exp(-6.9078 * t / rt60)  # ln(1000): 60 dB of amplitude
    tail *= math.sqrt(10 ** (-drr_db / 10) / max(float(np.sum(tail**2)), 1e-20))
    return np.r_[1.0, tail]


def _apply_channel(rng: np.random.Generator, x: np.ndarray, config: SynthConfig) -> np.ndarray:
    """``x`` through a random channel, keeping its length: an equaliser (gains in +-eq_db dB at
    log-spaced anchors, interpolated over log frequency), with ``bandlimit_prob`` a band limit, and with
    ``reverb_prob`` a synthetic room. The draws are made whatever is enabled, so one setting does not
    shift the random stream of the next."""
    sr = config.sample_rate
    eq_gains_db = rng.uniform(-1.0, 1.0, len(_EQ_ANCHORS_HZ)) * config.eq_db
    band = rng.random() < config.bandlimit_prob
    low, high = rng.uniform(*_BAND_LOW_HZ), rng.uniform(*_BAND_HIGH_HZ)
    room = _room_response(rng, sr) if rng.random() < config.reverb_prob else None
    if config.eq_db == 0 and not band and room is None:
        return x
    # One FFT length per config and room: the room's tail must not wrap around onto the start.
    n_fft = _fft_length(math.ceil(config.longest_s * sr) + 1 + int(_RT60_S[1] * sr))
    n_fft = max(n_fft, _fft_length(len(x) + (0 if room is None else len(room))))
    freqs = np.fft.rfftfreq(n_fft, d=1.0 / sr)
    log_f = np.log(np.maximum(freqs, 1.0))
    gain = 10 ** (np.interp(log_f, np.log(_EQ_ANCHORS_HZ), eq_gains_db) / 20)
    if band:
        f = np.maximum(freqs, 1.0)
        gain = gain / np.sqrt((1 + (low / f) ** (2 * _BAND_ORDER)) * (1 + (f / high) ** (2 * _BAND_ORDER)))
    spectrum = np.fft.rfft(x.astype(np.float64), n_fft) * gain
    if room is not None:
        spectrum *= np.fft.rfft(room, n_fft)
    return np.fft.irfft(spectrum, n_fft)[: len(x)].astype(np.float32)


def _wav_relpath(spk_id: str, utt_id: str) -> str:
    return f"wav/{spk_id}/{utt_id}.wav"


def wav_bytes(utt: Utterance) -> bytes:
    """The bytes :func:`synthesize_corpus` writes for ``utt`` (16-bit PCM WAV)."""
    import soundfile

    # Encoded in memory and written once: libsndfile writing to a file makes many small syscalls
    # (about 4 ms per file here against 0.5 ms); the bytes are the same.
    encoded = io.BytesIO()
    soundfile.write(encoded, utt.noisy, utt.sample_rate, subtype="PCM_16", format="WAV")
    return encoded.getvalue()


def speaker_digest(speaker: SpeakerParams, config: SynthConfig) -> str:
    """sha256 (hex) over the wav bytes of ``speaker``'s utterances in order, as ``corpus.json`` records
    it under ``speaker_sha256``: one speaker is enough to check that this machine reproduces a corpus."""
    digest = hashlib.sha256()
    for utt in speaker_utterances(speaker, config):
        digest.update(wav_bytes(utt))
    return digest.hexdigest()


def _synthesize_speaker_files(
    job: tuple[str, SpeakerParams, SynthConfig],
) -> tuple[str, str, list[tuple[str, str, int]]]:
    """Worker body: write one speaker's wavs; returns (speaker id, digest as in :func:`speaker_digest`,
    [(utt_id, text, n_samples)] in utterance order)."""
    out_dir, speaker, config = job
    folder = Path(out_dir) / "wav" / speaker.spk_id
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    digest = hashlib.sha256()
    for utt in speaker_utterances(speaker, config):
        data = wav_bytes(utt)
        (folder / f"{utt.utt_id}.wav").write_bytes(data)
        digest.update(data)
        written.append((utt.utt_id, utt.text, len(utt.noisy)))
    return speaker.spk_id, digest.hexdigest(), written


def make_trials(
    eval_utts: Sequence[tuple[str, str]], nontarget_ratio: float, seed: int
) -> list[tuple[str, str, bool]]:
    """Eval trials from ``(utt_id, spk_id)`` pairs: every same-speaker pair plus a seeded sample of
    ``round(nontarget_ratio * n_target)`` different-speaker pairs (capped at all that exist).

    Returns sorted ``(enroll_utt, test_utt, is_target)`` with ``enroll_utt < test_utt``; no pair repeats.
    """
    utts = sorted(eval_utts)
    spk = np.array([s for _, s in utts])
    n = len(utts)
    target = [(utts[i][0], utts[j][0], True) for i in range(n) for j in range(i + 1, n) if spk[i] == spk[j]]
    n_pairs = n * (n - 1) // 2
    n_nontarget = min(round(nontarget_ratio * len(target)), n_pairs - len(target))
    rng = np.random.default_rng([seed, _STREAM_TRIALS])
    chosen: set[int] = set()
    # Rejection sampling of pair codes i*n+j: memory grows with the sample, not with n^2.
    while len(chosen) < n_nontarget:
        need = n_nontarget - len(chosen)
        i = rng.integers(0, n, size=2 * need + 16)
        j = rng.integers(0, n, size=2 * need + 16)
        keep = (i < j) & (spk[i] != spk[j])
        for code in (i[keep] * n + j[keep]).tolist():
            if len(chosen) == n_nontarget:
                break
            chosen.add(code)
    nontarget = [(utts[c // n][0], utts[c % n][0], False) for c in chosen]
    return sorted(target + nontarget)


def corpus_content_hash(out_dir: str | os.PathLike[str]) -> str:
    """sha256 (hex) over the bytes of every ``wav/*/*.wav`` in sorted relative-path order."""
    root = Path(out_dir)
    digest = hashlib.sha256()
    for path in sorted(root.glob("wav/*/*.wav"), key=lambda p: p.relative_to(root).as_posix()):
        digest.update(path.read_bytes())
    return digest.hexdigest()


def check_corpus(out_dir: str | os.PathLike[str], manifest: str | os.PathLike[str]) -> None:
    """Raise :class:`DataError` unless the corpus in ``out_dir`` is the one ``manifest`` describes.

    ``manifest`` is a ``corpus.json`` kept elsewhere (e.g. beside a baseline trained on that corpus): the
    format, the config and the content hash must match, so a model shipped with the repository is only
    ever fine-tuned and scored on the audio it was trained on.
    """
    want = json.loads(Path(manifest).read_text())
    here = Path(out_dir) / "corpus.json"
    if not here.is_file():
        raise DataError(f"{out_dir} holds no corpus (no corpus.json); synthesize it with `lsv corpus synth`")
    have = json.loads(here.read_text())
    for key in ("format", "config", "content_sha256"):
        if key == "config":
            same = _effective_config(have.get(key)) == _effective_config(want.get(key))
        else:
            same = have.get(key) == want.get(key)
        if not same:
            hint = ("this machine synthesised different audio (espeakng-loader "
                    f"{have.get('espeakng_loader_version')} here, {want.get('espeakng_loader_version')} there)"
                    if key == "content_sha256" else "another corpus config")
            raise DataError(f"{here}: {key} differs from {manifest} ({hint}); a baseline trained on the "
                            "corpus that manifest describes does not fit this one: retrain it (`make baseline`)")


def _effective_config(recorded: object) -> SynthConfig | None:
    """The config a ``corpus.json`` records, with the default eval-speaker count resolved (the CLI writes
    it out, the library leaves it None: the same corpus)."""
    if not isinstance(recorded, dict):
        return None
    try:
        config = SynthConfig(**recorded)
    except (TypeError, ConfigError):
        return None
    return replace(config, eval_speakers=config.n_eval_speakers)


_OWNED_ENTRIES = ("corpus.json", "wav", "train", "eval")


def _prepare_out_dir(out_dir: Path, overwrite: bool) -> None:
    if out_dir.exists() and not out_dir.is_dir():
        raise RefuseOverwrite(f"out_dir={out_dir} exists and is not a folder")
    if out_dir.is_dir() and any(out_dir.iterdir()):
        if not overwrite:
            raise RefuseOverwrite(
                f"out_dir={out_dir} exists and is not empty; pass overwrite=True (CLI: --force) to rewrite it"
            )
        # Remove only what a corpus consists of, never unrelated files; corpus.json first, so that a
        # crash during the rewrite leaves a folder that reads as incomplete.
        for name in _OWNED_ENTRIES:
            entry = out_dir / name
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            elif entry.exists() or entry.is_symlink():
                entry.unlink()
    out_dir.mkdir(parents=True, exist_ok=True)


def _write_lines(path: Path, lines: Iterable[str]) -> None:
    write_text_atomic(path, "".join(f"{line}\n" for line in lines), overwrite=True)


def _write_split(out_dir: Path, split: str, utts: list[tuple[str, str]], texts: dict[str, str]) -> None:
    """Kaldi files for one split from sorted ``(utt_id, spk_id)``; paths relative to the split folder."""
    folder = out_dir / split
    _write_lines(folder / "wav.scp", (f"{u} ../{_wav_relpath(s, u)}" for u, s in utts))
    _write_lines(folder / "utt2spk", (f"{u} {s}" for u, s in utts))
    _write_lines(folder / "text", (f"{u} {texts[u]}" for u, _ in utts))
    spk2utt: dict[str, list[str]] = {}
    for u, s in utts:
        spk2utt.setdefault(s, []).append(u)
    _write_lines(folder / "spk2utt", (f"{s} {' '.join(us)}" for s, us in sorted(spk2utt.items())))


def _progress(results: Iterator[_T], total: int, step: int, enabled: bool) -> Iterator[_T]:
    """Yield ``results`` while a rich bar counts ``step`` utterances per item (``total`` items)."""
    if not enabled:
        yield from results
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    columns = (
        TextColumn("synthesising utterances"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
    )
    with Progress(*columns, transient=True) as bar:
        task = bar.add_task("utterances", total=total * step)
        for item in results:
            bar.advance(task, step)
            yield item


def synthesize_corpus(
    out_dir: str | os.PathLike[str],
    config: SynthConfig | None = None,
    *,
    workers: int = 2,
    overwrite: bool = False,
    progress: bool = True,
) -> CorpusSummary:
    """Synthesise the corpus described by ``config`` (default: :class:`SynthConfig()`) into ``out_dir``.

    Args:
        out_dir: target folder; must be absent or empty unless ``overwrite``.
        config: what to synthesise.
        workers: worker processes (each initialises espeak-ng once); the output does not depend on it.
        overwrite: rewrite the corpus entries (wav/, train/, eval/, corpus.json) of a non-empty out_dir;
            other files in it are left alone.
        progress: show a rich progress bar.

    Raises:
        RefuseOverwrite: ``out_dir`` is not empty and ``overwrite`` is False.
        ConfigError: invalid ``config`` or ``workers``.
        espeak.EspeakError: libespeak-ng cannot be loaded.
    """
    config = config or SynthConfig()
    if workers < 1:
        raise ConfigError(f"workers={workers} should be >= 1")
    started = time.perf_counter()
    espeak.initialize()  # fail here, before any folder is touched, if the library is missing or broken
    out = Path(out_dir).resolve()
    _prepare_out_dir(out, overwrite)

    speakers = speaker_table(config)
    texts, speaker_sha256, n_samples = _synthesize_speakers(out, speakers, config, workers, progress)
    split_utts, trials = _write_lists(out, speakers, config, texts)

    n_target = sum(1 for *_, tgt in trials if tgt)
    summary = CorpusSummary(
        out_dir=out,
        n_train_speakers=sum(1 for s in speakers if s.split == "train"),
        n_eval_speakers=sum(1 for s in speakers if s.split == "eval"),
        n_train_utterances=len(split_utts["train"]),
        n_eval_utterances=len(split_utts["eval"]),
        n_trials=len(trials),
        n_target=n_target,
        n_nontarget=len(trials) - n_target,
        total_seconds=n_samples / config.sample_rate,
        content_sha256=corpus_content_hash(out),
        elapsed_seconds=time.perf_counter() - started,
    )
    info = _corpus_info(config, speakers, summary, speaker_sha256)
    # Last, so a folder without corpus.json is known to be incomplete.
    write_text_atomic(out / "corpus.json", json.dumps(info, indent=2) + "\n", overwrite=True)
    return summary


def _synthesize_speakers(out: Path, speakers: list[SpeakerParams], config: SynthConfig, workers: int,
                         progress: bool) -> tuple[dict[str, str], dict[str, str], int]:
    """Every speaker's audio files, in ``workers`` processes: texts by utterance, content digest by speaker,
    total samples."""
    jobs = [(str(out), spk, config) for spk in speakers]
    texts: dict[str, str] = {}
    speaker_sha256: dict[str, str] = {}
    n_samples = 0
    # fork on Linux: works from scripts without an `if __name__ == "__main__"` guard and starts fast
    # (each speaker loads its own fresh espeak-ng instance, so nothing engine-related is inherited).
    # Elsewhere fork is unsafe (macOS) or missing (Windows), so spawn.
    context = multiprocessing.get_context("fork" if sys.platform.startswith("linux") else "spawn")
    with context.Pool(min(workers, len(jobs))) as pool:
        results = pool.imap_unordered(_synthesize_speaker_files, jobs)
        for spk_id, digest, speaker_result in _progress(results, len(jobs), config.utts, progress):
            speaker_sha256[spk_id] = digest
            for utt_id, text, n in speaker_result:
                texts[utt_id] = text
                n_samples += n
    return texts, speaker_sha256, n_samples


def _write_lists(out: Path, speakers: list[SpeakerParams], config: SynthConfig,
                 texts: dict[str, str]) -> tuple[dict[str, list[tuple[str, str]]], list[tuple[str, str, bool]]]:
    """The Kaldi lists of train/ and eval/ and the trial list; returns the utterances by split and the trials."""
    split_utts: dict[str, list[tuple[str, str]]] = {"train": [], "eval": []}
    for spk in speakers:
        split_utts[spk.split].extend((utterance_id(spk.spk_id, u), spk.spk_id) for u in range(config.utts))
    for split, utts in split_utts.items():
        _write_split(out, split, sorted(utts), texts)
    trials = make_trials(split_utts["eval"], config.nontarget_ratio, config.seed)
    _write_lines(
        out / "eval" / "trials", (f"{e} {t} {'target' if tgt else 'nontarget'}" for e, t, tgt in trials)
    )
    return split_utts, trials


def _corpus_info(config: SynthConfig, speakers: list[SpeakerParams], summary: CorpusSummary,
                 speaker_sha256: dict[str, str]) -> dict[str, Any]:
    """What ``corpus.json`` says: format, config, speakers, counts and digests."""
    return {
        "format": CORPUS_FORMAT,
        "config": asdict(config),
        "espeakng_loader_version": importlib.metadata.version("espeakng-loader"),
        "speakers": {
            s.spk_id: {
                "split": s.split,
                "accent": s.accent,
                "variant": s.variant,
                "pitch": s.pitch,
                "pitch_range": s.pitch_range,
                "rate_wpm": s.rate_wpm,
                "formant_scale": s.formant_scale,
                "family": s.family,
            }
            for s in speakers
        },
        "counts": {
            "train_speakers": summary.n_train_speakers,
            "eval_speakers": summary.n_eval_speakers,
            "train_utterances": summary.n_train_utterances,
            "eval_utterances": summary.n_eval_utterances,
            "trials": summary.n_trials,
            "target_trials": summary.n_target,
            "nontarget_trials": summary.n_nontarget,
        },
        "total_seconds": round(summary.total_seconds, 3),
        "content_sha256": summary.content_sha256,
        "speaker_sha256": dict(sorted(speaker_sha256.items())),
    }
