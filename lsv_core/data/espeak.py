"""A thin ctypes driver for libespeak-ng as shipped by the PyPI package ``espeakng-loader``.

Audio comes back as int16 mono at :data:`SAMPLE_RATE` (22050 Hz), espeak-ng's native rate.

Two traps shape this module:

* libespeak-ng is process-global state, so the engine is initialised once per process, behind a lock.
* ``espeak_ng_SetRandSeed`` alone does *not* make an utterance reproducible: the waveform generator keeps
  function-local statics (the pitch-flutter phase, the glottal cycle counter, the gain control) that are
  never reset, not even by ``espeak_Initialize``. The same call therefore gives different samples
  depending on what the process synthesised before. On POSIX we synthesise every utterance in a forked
  child of the freshly initialised engine, so each utterance starts from the same state and the output
  depends only on the arguments (about 8 ms extra per utterance). Where ``os.fork`` is missing the
  synthesis runs in-process and is reproducible only for the same sequence of calls.
"""

from __future__ import annotations

import ctypes
import os
import struct
import threading
from functools import lru_cache
from pathlib import Path

import numpy as np

SAMPLE_RATE = 22050
"""Output sample rate of espeak-ng in Hz (fixed by the library)."""

RATE_WPM_RANGE = (80, 450)
"""Speaking rates espeak-ng accepts, in words per minute (faster needs libsonic)."""

# Enum values from espeak-ng's speak_lib.h.
_AUDIO_OUTPUT_SYNCHRONOUS = 2
_INITIALIZE_DONT_EXIT = 0x8000  # report a bad data path instead of calling exit()
_POS_CHARACTER = 1
_CHARS_UTF8 = 1
_PARAM_RATE, _PARAM_PITCH, _PARAM_RANGE = 1, 3, 4
_EE_OK = 0

# Variants that have no pitch (whispered or unvoiced), so pitch cannot tell their speakers apart.
UNPITCHED_VARIANTS = frozenset({"whisper", "whisperf", "caleb"})


class EspeakError(RuntimeError):
    """libespeak-ng cannot be loaded or initialised, or it rejected a request."""


class _Voice(ctypes.Structure):
    # espeak_VOICE from speak_lib.h; only name and identifier are read.
    _fields_ = [
        ("name", ctypes.c_char_p),
        ("languages", ctypes.c_char_p),
        ("identifier", ctypes.c_char_p),
        ("gender", ctypes.c_ubyte),
        ("age", ctypes.c_ubyte),
        ("variant", ctypes.c_ubyte),
        ("xx1", ctypes.c_ubyte),
        ("score", ctypes.c_int),
        ("spare", ctypes.c_void_p),
    ]


_SynthCallback = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int, ctypes.c_void_p)


@lru_cache(maxsize=1)
def _paths() -> tuple[Path, Path]:
    """(library file, data folder) of the installed espeakng-loader."""
    try:
        import espeakng_loader
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise EspeakError(
            "espeak-ng is needed to synthesise the corpus but the package 'espeakng-loader' is not installed; "
            "install it with `pip install espeakng-loader` (it bundles libespeak-ng and its data)"
        ) from exc
    lib = Path(espeakng_loader.get_library_path())
    try:
        data = Path(espeakng_loader.get_data_path())
    except RuntimeError as exc:
        raise EspeakError(f"espeakng-loader is installed but its data folder is missing: {exc}") from exc
    if not lib.is_file():
        raise EspeakError(f"espeakng-loader is installed but its library {lib} is missing; reinstall it")
    return lib, data


def data_path() -> Path:
    """The espeak-ng data folder (``espeak-ng-data``) shipped with espeakng-loader."""
    return _paths()[1]


def list_variants() -> list[str]:
    """Voice variants that exist as files in ``<data>/voices/!v``, sorted; names are case-sensitive.

    espeak-ng silently ignores an unknown variant (``en+M3`` speaks with the plain ``en`` voice), so a
    variant is only valid if it appears here.
    """
    folder = data_path() / "voices" / "!v"
    return sorted(p.name for p in folder.iterdir() if p.is_file())


def list_accents() -> list[str]:
    """English accents (language voices) available, as lower-case names for ``synthesize``, sorted.

    For example ``en`` (British), ``en-us``, ``en-029`` (Caribbean), ``en-gb-scotland``, ``en-gb-x-rp``.
    ``en-shaw`` is left out: it is for text in the Shavian alphabet.
    """
    folder = data_path() / "lang" / "gmw"
    names = {p.name.lower() for p in folder.iterdir() if p.is_file() and p.name.lower().split("-")[0] == "en"}
    names.discard("en-shaw")
    return sorted(names)


def _check_args(voice: str, rate_wpm: int, pitch: int, pitch_range: int) -> None:
    """Validate at the boundary so a typo fails loudly instead of speaking with a default voice."""
    accent, _, variant = voice.partition("+")
    accents = list_accents()
    if accent not in accents:
        raise ValueError(f"voice={voice!r}: accent {accent!r} is not one of {accents}")
    if variant and variant not in list_variants():
        raise ValueError(
            f"voice={voice!r}: variant {variant!r} has no file in {data_path() / 'voices' / '!v'} "
            "(names are case-sensitive; see list_variants())"
        )
    lo, hi = RATE_WPM_RANGE
    if not lo <= rate_wpm <= hi:
        raise ValueError(f"rate_wpm={rate_wpm} should be in [{lo}, {hi}] words per minute")
    if not 0 <= pitch <= 99:
        raise ValueError(f"pitch={pitch} should be in [0, 99] (50 is the voice's own pitch)")
    if not 0 <= pitch_range <= 99:
        raise ValueError(f"pitch_range={pitch_range} should be in [0, 99] (0 is monotone, 50 the default)")


class _Engine:
    """The process's one initialised libespeak-ng; never used to synthesise in a forking process."""

    def __init__(self) -> None:
        lib_path, data = _paths()
        try:
            self.lib = ctypes.CDLL(str(lib_path))
        except OSError as exc:
            raise EspeakError(f"cannot load libespeak-ng from {lib_path}: {exc}") from exc
        lib = self.lib
        lib.espeak_Initialize.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_char_p, ctypes.c_int]
        lib.espeak_Initialize.restype = ctypes.c_int
        lib.espeak_SetVoiceByName.argtypes = [ctypes.c_char_p]
        lib.espeak_SetParameter.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int]
        lib.espeak_Synth.argtypes = [
            ctypes.c_void_p, ctypes.c_size_t, ctypes.c_uint, ctypes.c_int, ctypes.c_uint, ctypes.c_uint,
            ctypes.c_void_p, ctypes.c_void_p,
        ]  # fmt: skip
        lib.espeak_ng_SetRandSeed.argtypes = [ctypes.c_long]
        lib.espeak_ng_SetRandSeed.restype = None
        lib.espeak_GetCurrentVoice.restype = ctypes.POINTER(_Voice)
        rate = lib.espeak_Initialize(_AUDIO_OUTPUT_SYNCHRONOUS, 0, str(data).encode(), _INITIALIZE_DONT_EXIT)
        if rate != SAMPLE_RATE:
            raise EspeakError(
                f"espeak_Initialize with data folder {data} returned {rate} (expected sample rate {SAMPLE_RATE}); "
                "the espeakng-loader installation looks broken"
            )
        self._chunks: list[np.ndarray] = []
        # Keep a reference: ctypes does not, and a collected callback crashes the library.
        self._callback = _SynthCallback(self._collect)
        lib.espeak_SetSynthCallback(self._callback)

    def _collect(self, wav: ctypes.Array, n_samples: int, _events: int) -> int:
        if n_samples > 0:
            self._chunks.append(np.ctypeslib.as_array(wav, (n_samples,)).copy())
        return 0  # 0 = keep synthesising

    def synth_here(self, text: str, voice: str, rate_wpm: int, pitch: int, pitch_range: int, seed: int) -> np.ndarray:
        """Synthesise in this process (changes hidden engine state; see the module docstring)."""
        lib = self.lib
        if lib.espeak_SetVoiceByName(voice.encode()) != _EE_OK:
            raise EspeakError(f"espeak-ng rejected voice {voice!r}")
        # espeak-ng falls back silently; the identifier (e.g. "gmw/en-US+m3") says what was loaded.
        identifier = (lib.espeak_GetCurrentVoice().contents.identifier or b"").decode()
        accent, _, variant = voice.partition("+")
        loaded_accent, _, loaded_variant = identifier.rpartition("/")[2].partition("+")
        if loaded_accent.lower() != accent or loaded_variant != variant:
            raise EspeakError(f"espeak-ng loaded {identifier!r} when asked for voice {voice!r}")
        for param, value in ((_PARAM_RATE, rate_wpm), (_PARAM_PITCH, pitch), (_PARAM_RANGE, pitch_range)):
            if lib.espeak_SetParameter(param, int(value), 0) != _EE_OK:
                raise EspeakError(f"espeak-ng rejected parameter {param}={value}")
        lib.espeak_ng_SetRandSeed(int(seed))
        encoded = text.encode()
        self._chunks = []
        status = lib.espeak_Synth(encoded, len(encoded) + 1, 0, _POS_CHARACTER, 0, _CHARS_UTF8, None, None)
        if status != _EE_OK or lib.espeak_Synchronize() != _EE_OK:
            raise EspeakError(f"espeak_Synth failed (status {status}) for voice {voice!r}")
        chunks, self._chunks = self._chunks, []
        return np.concatenate(chunks) if chunks else np.zeros(0, dtype=np.int16)

    def synth_forked(
        self, text: str, voice: str, rate_wpm: int, pitch: int, pitch_range: int, seed: int
    ) -> np.ndarray:
        """Synthesise in a forked child so that this process's engine state never changes."""
        read_fd, write_fd = os.pipe()
        pid = os.fork()
        if pid == 0:  # child: report through the pipe, never return into the caller's code
            os.close(read_fd)
            try:
                try:
                    payload = b"\0" + self.synth_here(text, voice, rate_wpm, pitch, pitch_range, seed).tobytes()
                except BaseException as exc:  # everything must reach the parent
                    payload = b"\1" + f"{type(exc).__name__}: {exc}".encode()
                with os.fdopen(write_fd, "wb") as pipe:
                    pipe.write(struct.pack("<Q", len(payload)) + payload)
            finally:
                os._exit(0)  # skip atexit handlers and buffered I/O inherited from the parent
        os.close(write_fd)
        with os.fdopen(read_fd, "rb") as pipe:
            data = pipe.read()
        _, wait_status = os.waitpid(pid, 0)
        if len(data) < 9 or struct.unpack("<Q", data[:8])[0] != len(data) - 8:
            raise EspeakError(
                f"the espeak-ng child process died (wait status {wait_status}) synthesising voice {voice!r}"
            )
        if data[8] != 0:
            raise EspeakError(f"espeak-ng failed for voice {voice!r}: {data[9:].decode(errors='replace')}")
        return np.frombuffer(data[9:], dtype=np.int16).copy()


_engine: _Engine | None = None
_lock = threading.Lock()


def _get_engine() -> _Engine:
    global _engine
    with _lock:
        # A forked child inherits an initialised library; a spawned one starts without, and initialises here.
        if _engine is None:
            _engine = _Engine()
        return _engine


def initialize() -> None:
    """Load and initialise libespeak-ng in this process (done lazily otherwise); raises EspeakError."""
    _get_engine()


def synthesize(
    text: str,
    voice: str,
    rate_wpm: int = 175,
    pitch: int = 50,
    pitch_range: int = 50,
    seed: int = 0,
) -> np.ndarray:
    """Speak ``text`` and return int16 mono samples at :data:`SAMPLE_RATE` (22050 Hz).

    Args:
        text: UTF-8 text to speak.
        voice: ``"<accent>+<variant>"`` (e.g. ``"en-us+m3"``) or a bare accent; the accent must be in
            :func:`list_accents` and the variant in :func:`list_variants` (case-sensitive).
        rate_wpm: speaking rate in words per minute, within :data:`RATE_WPM_RANGE`.
        pitch: base pitch 0-99 relative to the variant's own pitch (50 keeps it; 0 halves, 99 doubles it).
        pitch_range: intonation range 0-99 (0 monotone, 50 the voice's default).
        seed: seed of espeak-ng's random generator (used by breathy and rough voices).

    The output depends only on the arguments (on POSIX; see the module docstring).
    """
    _check_args(voice, rate_wpm, pitch, pitch_range)
    engine = _get_engine()
    with _lock:
        if hasattr(os, "fork"):
            return engine.synth_forked(text, voice, rate_wpm, pitch, pitch_range, seed)
        return engine.synth_here(text, voice, rate_wpm, pitch, pitch_range, seed)  # pragma: no cover
