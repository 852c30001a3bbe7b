"""A thin ctypes driver for libespeak-ng as shipped by the PyPI package ``espeakng-loader``.

Audio comes back as int16 mono at :data:`SAMPLE_RATE` (22050 Hz), espeak-ng's native rate.

libespeak-ng is process-global state, and ``espeak_ng_SetRandSeed`` alone does *not* make output
reproducible: the waveform generator keeps function-local statics (pitch-flutter phase, glottal cycle
counter, gain control) that nothing resets, not even ``espeak_Initialize``, so the same call gives
different samples depending on what the process spoke before. A :class:`Synthesizer` session therefore
loads a *fresh instance* of the library (dlopen), initialises it, and unloads it (dlclose) when it
closes: within a session the output depends on the arguments and the session's earlier calls only, and
:func:`synthesize` (a one-call session) depends on its arguments only. A fresh instance costs about 5 ms
(mostly loading the English dictionary). The first session of a process checks that unloading really
resets the library, which fails if other code in the process holds libespeak-ng open. Some voices also
draw from the C library's ``rand()``, which outlives the library, so every call reseeds it.
"""

from __future__ import annotations

import ctypes
import os
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
# Callback buffer in ms: the default (60 ms) costs ~80 Python callbacks per utterance; the samples
# are the same whatever the size.
_BUFFER_MS = 1000

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
    return list(_variants())


@lru_cache(maxsize=1)
def _variants() -> tuple[str, ...]:
    # Cached: every synthesize() call validates against it, and the data folder does not change.
    folder = data_path() / "voices" / "!v"
    return tuple(sorted(p.name for p in folder.iterdir() if p.is_file()))


def list_accents() -> list[str]:
    """English accents (language voices) available, as lower-case names for ``synthesize``, sorted.

    For example ``en`` (British), ``en-us``, ``en-029`` (Caribbean), ``en-gb-scotland``, ``en-gb-x-rp``.
    ``en-shaw`` is left out: it is for text in the Shavian alphabet.
    """
    return list(_accents())


@lru_cache(maxsize=1)
def _accents() -> tuple[str, ...]:
    folder = data_path() / "lang" / "gmw"
    names = {p.name.lower() for p in folder.iterdir() if p.is_file() and p.name.lower().split("-")[0] == "en"}
    names.discard("en-shaw")
    return tuple(sorted(names))


def _check_args(voice: str, rate_wpm: int, pitch: int, pitch_range: int) -> None:
    """Validate at the boundary so a typo fails loudly instead of speaking with a default voice."""
    accent, _, variant = voice.partition("+")
    accents = _accents()
    if accent not in accents:
        raise ValueError(f"voice={voice!r}: accent {accent!r} is not one of {list(accents)}")
    if variant and variant not in _variants():
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


class _Instance:
    """A freshly loaded and initialised libespeak-ng with a callback that collects the samples."""

    def __init__(self) -> None:
        lib_path, data = _paths()
        try:
            lib = ctypes.CDLL(str(lib_path))
        except OSError as exc:
            raise EspeakError(f"cannot load libespeak-ng from {lib_path}: {exc}") from exc
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
        self._lib: ctypes.CDLL | None = lib
        rate = lib.espeak_Initialize(
            _AUDIO_OUTPUT_SYNCHRONOUS, _BUFFER_MS, str(data).encode(), _INITIALIZE_DONT_EXIT
        )
        if rate != SAMPLE_RATE:
            self.unload()
            raise EspeakError(
                f"espeak_Initialize with data folder {data} returned {rate} (expected sample rate "
                f"{SAMPLE_RATE}); the espeakng-loader installation looks broken"
            )
        self._chunks: list[np.ndarray] = []
        # Keep a reference: ctypes does not, and a collected callback crashes the library.
        self._callback = _SynthCallback(self._collect)
        lib.espeak_SetSynthCallback(self._callback)

    def _collect(self, wav: ctypes._Pointer[ctypes.c_short], n_samples: int, _events: int) -> int:
        if n_samples > 0:
            self._chunks.append(np.ctypeslib.as_array(wav, (n_samples,)).copy())
        return 0  # 0 = keep synthesising

    def speak(
        self, text: str, voice: str, rate_wpm: int, pitch: int, pitch_range: int, seed: int
    ) -> np.ndarray:
        lib = self._lib
        if lib is None:
            raise EspeakError("this espeak-ng session is closed")
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
        # Two generators to seed: espeak-ng's own, and the C library's rand(), which the Klatt voices
        # with breath (e.g. "Reed") call; rand() lives in libc, so unloading espeak-ng does not reset it.
        lib.espeak_ng_SetRandSeed(int(seed))
        _libc_srand(int(seed))
        encoded = text.encode()
        self._chunks = []
        status = lib.espeak_Synth(encoded, len(encoded) + 1, 0, _POS_CHARACTER, 0, _CHARS_UTF8, None, None)
        if status != _EE_OK or lib.espeak_Synchronize() != _EE_OK:
            raise EspeakError(f"espeak_Synth failed (status {status}) for voice {voice!r}")
        chunks, self._chunks = self._chunks, []
        return np.concatenate(chunks) if chunks else np.zeros(0, dtype=np.int16)

    def unload(self) -> None:
        import _ctypes

        lib, self._lib = self._lib, None
        if lib is None:
            return
        lib.espeak_Terminate()  # frees the instance's heap; dlclose alone would leak it
        close = getattr(_ctypes, "dlclose", None) or _ctypes.FreeLibrary  # POSIX / Windows
        close(lib._handle)


@lru_cache(maxsize=1)
def _libc() -> ctypes.CDLL:
    if os.name == "nt":  # pragma: no cover - the DLL links the universal CRT
        return ctypes.CDLL("ucrtbase")
    return ctypes.CDLL(None)  # the process's C library


def _libc_srand(seed: int) -> None:
    _libc().srand(ctypes.c_uint(seed & 0xFFFFFFFF))


# dlopen of a loaded library returns the loaded instance, so sessions in one process must not overlap.
_lock = threading.Lock()
_reset_checked = False
_open_sessions = 0
_session_thread: int | None = None  # thread that holds the open session, to refuse nesting
_forked_while_open = False


def _after_fork_in_child() -> None:
    # The child gets a copy of the parent's lock (maybe held by another thread, forever) and of any
    # loaded, already used instance, which it could not unload to a clean state.
    global _lock, _forked_while_open, _session_thread
    _lock = threading.Lock()
    _forked_while_open = _forked_while_open or _open_sessions > 0
    _session_thread = None


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


def _check_reset_once() -> None:
    """Speak a probe in two successive fresh instances: equal output proves that unloading resets.

    Runs once per process, with the lock held and no other instance loaded.
    """
    global _reset_checked
    if _reset_checked:
        return
    # "Reed" is a Klatt voice with breath noise: it also checks that rand() is seeded.
    probes = [
        ("A short probe sentence.", "en+m3", 175, 50, 50, 1),
        ("Another probe.", "en+Reed", 175, 50, 50, 1),
    ]
    outputs = []
    for _ in range(2):
        instance = _Instance()
        try:
            outputs.append([instance.speak(*probe) for probe in probes])
        finally:
            instance.unload()
    if not all(np.array_equal(a, b) for a, b in zip(outputs[0], outputs[1], strict=True)):
        raise EspeakError(
            "unloading libespeak-ng does not reset it in this process (does another module hold "
            "libespeak-ng open?), so synthesis would depend on earlier calls and not be reproducible"
        )
    _reset_checked = True


class Synthesizer:
    """A session on a freshly loaded libespeak-ng; a context manager, one open session per process.

    The n-th call's output depends on its arguments and the session's earlier calls only, never on
    what the process spoke before the session. Another thread opening a session waits until this one
    closes; opening a second session in the same thread raises EspeakError.
    Example::

        with Synthesizer() as tts:
            wav = tts.synthesize("Hello there.", "en-us+m3", rate_wpm=160, pitch=40, seed=1)
    """

    def __init__(self) -> None:
        self._instance: _Instance | None = None
        self._lock = _lock  # the lock this session holds (the module's may be replaced after a fork)

    def __enter__(self) -> Synthesizer:
        self.open()
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    def open(self) -> None:
        """Load and initialise a fresh library instance; raises EspeakError if it cannot."""
        global _open_sessions, _session_thread
        if self._instance is not None:
            return
        if _session_thread == threading.get_ident():
            raise EspeakError("a Synthesizer session is already open in this thread; close it first")
        if _forked_while_open:
            raise EspeakError(
                "this process was forked while an espeak-ng session was open, so it cannot get a clean "
                "library instance; fork before opening sessions, or use the spawn start method"
            )
        self._lock = _lock
        self._lock.acquire()
        try:
            _check_reset_once()
            self._instance = _Instance()
            _open_sessions += 1
            _session_thread = threading.get_ident()
        except BaseException:
            self._lock.release()
            raise

    def close(self) -> None:
        """Terminate and unload the instance, so that the next session starts from scratch."""
        global _open_sessions, _session_thread
        instance, self._instance = self._instance, None
        if instance is None:
            return
        try:
            instance.unload()
        finally:
            _open_sessions -= 1
            _session_thread = None
            self._lock.release()

    def synthesize(
        self,
        text: str,
        voice: str,
        rate_wpm: int = 175,
        pitch: int = 50,
        pitch_range: int = 50,
        seed: int = 0,
    ) -> np.ndarray:
        """Speak ``text``; returns int16 mono samples at 22050 Hz. Arguments as in :func:`synthesize`."""
        _check_args(voice, rate_wpm, pitch, pitch_range)
        if self._instance is None:
            raise EspeakError("Synthesizer is not open; use it as `with Synthesizer() as tts: ...`")
        return self._instance.speak(text, voice, rate_wpm, pitch, pitch_range, seed)


def initialize() -> None:
    """Check that libespeak-ng loads, initialises and resets in this process; raises EspeakError."""
    with Synthesizer():
        pass


def synthesize(
    text: str,
    voice: str,
    rate_wpm: int = 175,
    pitch: int = 50,
    pitch_range: int = 50,
    seed: int = 0,
) -> np.ndarray:
    """Speak ``text`` in a fresh one-call session; returns int16 mono samples at :data:`SAMPLE_RATE`.

    Args:
        text: UTF-8 text to speak.
        voice: ``"<accent>+<variant>"`` (e.g. ``"en-us+m3"``) or a bare accent; the accent must be in
            :func:`list_accents` and the variant in :func:`list_variants` (case-sensitive).
        rate_wpm: speaking rate in words per minute, within :data:`RATE_WPM_RANGE`.
        pitch: base pitch 0-99 relative to the variant's own (50 keeps it; 0 halves, 99 doubles it).
        pitch_range: intonation range 0-99 (0 monotone, 50 the voice's default).
        seed: seed of the random generators espeak-ng uses (breathy and Klatt voices); note that
            this reseeds the C library's ``rand()`` for the whole process.

    The output depends on the arguments only. To speak many utterances, a :class:`Synthesizer`
    session avoids reloading the library (about 5 ms) per call.
    """
    _check_args(voice, rate_wpm, pitch, pitch_range)  # before loading anything
    with Synthesizer() as tts:
        return tts.synthesize(text, voice, rate_wpm, pitch, pitch_range, seed)
