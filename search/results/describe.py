"""Trials in words, for people browsing a study: a recipe as a sentence, a trial's one-line description and a
run name that sorts.

``"4 bit; layer3 2 bit; layer4 and embedding 1 bit adaptive — 7.24 % EER, 34.5 kB, 18.5x"`` says what a
trial is without opening its recipe: the precision most layers have, then the parts that differ, grouped
by top-level block (``layer3`` when all of its layers share one width, else the single layers). MLflow shows
it as the run's description (tag ``mlflow.note.content``); ``lsv status`` prints the same words.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from lsv_core.quant.recipe import LayerSpec

__all__ = ["recipe_in_words", "run_name", "trial_description"]

# WeSpeaker's segment-level Linear layers (seg_1, seg_2) make the embedding: one word for users.
_EMBEDDING_PREFIX = "seg_"
FLOAT_WORDS = "fp32"
_NAME_WORDS = 72


def _token(spec: Any) -> str:
    parsed = LayerSpec.parse(spec)
    return FLOAT_WORDS if parsed is None else parsed.token


def _words(token: str) -> str:
    if token == FLOAT_WORDS:
        return "fp32"
    spec = LayerSpec.from_token(token)
    return f"{spec.bits} bit" + (f" {spec.mode}" if spec.bits == 1 else "")


def _bits_order(token: str) -> tuple[int, str]:
    return (99, "") if token == FLOAT_WORDS else (LayerSpec.from_token(token).bits, token)


def _block(layer: str) -> str:
    top = layer.split(".", 1)[0]
    return "embedding" if top.startswith(_EMBEDDING_PREFIX) else top


def _join(names: Sequence[str]) -> str:
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]


def recipe_in_words(recipe: Mapping[str, Any]) -> str:
    """``"4 bit; layer3 2 bit; layer4 and embedding 1 bit adaptive"``: the width most layers have, then each
    other width (widest first) with the blocks, or single layers, that have it. Layers missing from the
    recipe stay float and are not named; an empty recipe is ``"fp32 (nothing quantized)"``."""
    tokens = {layer: _token(spec) for layer, spec in recipe.items()}
    if not tokens:
        return "fp32 (nothing quantized)"
    counts: dict[str, int] = {}
    for tok in tokens.values():
        counts[tok] = counts.get(tok, 0) + 1
    # The most common width is the sentence's subject; a tie goes to the wider one (it reads as the base).
    common = max(counts, key=lambda t: (counts[t], _bits_order(t)))
    if len(counts) == 1:
        return f"{_words(common)} everywhere"
    blocks: dict[str, list[str]] = {}
    for layer in tokens:
        blocks.setdefault(_block(layer), []).append(layer)
    named: dict[str, list[str]] = {}  # token -> blocks or layers named with it, in model order
    for block, layers in blocks.items():
        widths = {tokens[layer] for layer in layers}
        if len(widths) == 1:
            (tok,) = widths
            if tok != common:
                named.setdefault(tok, []).append(block)
            continue
        for layer in layers:
            if tokens[layer] != common:
                named.setdefault(tokens[layer], []).append(layer)
    parts = [_words(common)] + [f"{_join(named[tok])} {_words(tok)}"
                                for tok in sorted(named, key=_bits_order, reverse=True)]
    return "; ".join(parts)


def trial_description(recipe: Mapping[str, Any], *, state: str = "complete", eer: float | None = None,
                      size_bytes: float | None = None, compression_ratio: float | None = None,
                      reason: str | None = None, memoized_from: int | None = None) -> str:
    """One line: the recipe in words, then the result (EER in percent, size in kB = 10^3 bytes, compression)
    or why there is none."""
    words = recipe_in_words(recipe) if recipe else "no recipe"
    if state != "complete":
        return f"{words} — {state}" + (f": {reason}" if reason else "")
    result = []
    if eer is not None:
        result.append(f"{eer:.2f} % EER")
    if size_bytes is not None:
        result.append(f"{size_bytes / 1e3:.1f} kB")
    if compression_ratio is not None:
        result.append(f"{compression_ratio:.1f}x")
    line = f"{words} — {', '.join(result)}" if result else words
    return line + (f" (repeats trial {memoized_from})" if memoized_from is not None else "")


def run_name(number: int, recipe: Mapping[str, Any], *, state: str = "complete", eer: float | None = None,
             size_bytes: float | None = None) -> str:
    """``"0007 7.24% 34.5kB 4 bit; layer3 2 bit; ..."``: the zero-padded trial number first, so names sort in
    trial order, then what the runs table shows without picking columns: EER (percent) and size (kB) of a
    complete trial, or its state, and the start of its recipe in words."""
    words = recipe_in_words(recipe) if recipe else "no recipe"
    if state != "complete":
        head = state
    else:
        head = " ".join(x for x in (None if eer is None else f"{eer:.2f}%",
                                    None if size_bytes is None else f"{size_bytes / 1e3:.1f}kB") if x)
    text = f"{head} {words}" if head else words
    if len(text) > _NAME_WORDS:
        text = text[: _NAME_WORDS - 3] + "..."
    return f"{number:04d} {text}"
