"""The model card of an exported model: a Markdown page of what it is, how good, how small, how found, how to run.

:func:`render_model_card` is a pure function of a :class:`ModelCard`; the exporter fills the card from
the study (logged metrics), its own re-evaluation and the files it wrote. EERs are in percent, sizes in
bytes (MB = 10^6 bytes).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

__all__ = ["Accuracy", "LayerRow", "ModelCard", "OnnxCheck", "render_model_card"]


@dataclass(frozen=True)
class LayerRow:
    """One quantizable layer: its weight shape, how it is stored (``"4"``, ``"1a"``, ``"1s"``, ``"fp32"``) and
    the name of its weight in ``model.onnx`` (``w<j>``; ``w<j>p``/``w<j>c``/``w<j>a`` are its packed
    indices, codebook and static scale)."""

    name: str
    shape: tuple[int, ...]
    bits: str
    onnx_name: str = ""

    @property
    def n_weights(self) -> int:
        n = 1
        for d in self.shape:
            n *= int(d)
        return n


@dataclass(frozen=True)
class OnnxCheck:
    """``model.onnx`` in onnxruntime against the quantized torch model: the largest absolute embedding
    difference and lowest cosine (random and, when ``n_utterances``, real evaluation utterances), and the
    EER (percent) of its embeddings on the trials (None when not measured)."""

    max_abs_diff: float
    min_cosine: float
    eer: float | None = None
    n_utterances: int = 0


@dataclass(frozen=True)
class Accuracy:
    """The model's scores as the card states them: ``eer*`` as recorded, ``reeval_*`` as re-measured by the
    caller before exporting (EER in percent), accepted within ``eer_tolerance`` points."""

    eer: float
    eer_ci_low: float | None
    eer_ci_high: float | None
    min_dcf_001: float | None
    reeval_eer: float
    reeval_min_dcf_001: float
    eer_tolerance: float
    n_eval_trials: int
    # The study's minDCF objective at another p_target than 0.01 ([objectives] p_target), when it has one.
    p_target: float | None = None
    min_dcf: float | None = None
    reeval_min_dcf: float | None = None


@dataclass(frozen=True)
class ModelCard:
    """Everything the card states (its accuracy: the study's logged values and the exporter's re-evaluation)."""

    title: str
    arch: Mapping[str, Any]
    accuracy: Accuracy
    size_bytes: int  # model.onnx: the deployable file, the search objective
    tensor_bytes: int  # the packed tensors (model.packed.safetensors without its header)
    packed_file_bytes: int  # model.packed.safetensors with its header
    fp32_bytes: int  # the float model.onnx of the same architecture
    avg_bits: float
    layers: Sequence[LayerRow]
    provenance: Mapping[str, Any]  # study, trial, run ids, digests, version, git commit, rule, ...
    files: Mapping[str, str] = field(default_factory=dict)  # file name -> one-line description
    how_found: Sequence[str] = ()  # lines describing the search
    onnx: OnnxCheck | None = None
    float_onnx_max_abs_diff: float | None = None  # model.float.onnx vs torch, when written
    infer: Mapping[str, Any] = field(default_factory=dict)  # infer.json
    no_wespeaker: str | None = None  # why the bundle has no wespeaker_avg_model.pt (None: it has one)


def _ci(low: float | None, high: float | None) -> str:
    return "" if low is None or high is None else f" (95 % bootstrap CI {low:.2f} to {high:.2f})"


def _thresholds(infer: Mapping[str, Any]) -> list[str]:
    points = infer.get("thresholds") or {}
    if not points:
        return ["No decision thresholds were measured at export: `infer.py score` reports the score only "
                "after you add one to `infer.json`."]
    lines = ["| operating point | threshold (cosine) | miss rate | false-alarm rate | on |",
             "|---|---:|---:|---:|---|"]
    for name, p in points.items():
        label = name if p.get("p_target") is None else f"{name} (p_target = {p['p_target']:g})"
        lines.append(f"| `{label}` | {p['threshold']:.6f} | {100 * p['p_miss']:.2f} % | {100 * p['p_fa']:.2f} % | "
                     f"{p['n_target']:,} target / {p['n_nontarget']:,} nontarget trials |")
    return lines


def _size_lines(card: ModelCard) -> list[str]:
    ratio = card.fp32_bytes / card.size_bytes if card.size_bytes else float("nan")
    return [
        f"* **`model.onnx`: {card.size_bytes:,} bytes** ({card.size_bytes / 1e6:.4f} MB): the file you ship and "
        "the size the search minimised (graph, header and metadata included).",
        f"* The packed tensors (bit-packed indices, codebooks, float BatchNorm statistics and biases) are "
        f"{card.tensor_bytes:,} bytes; `model.packed.safetensors` holds them for lsv-quant in "
        f"{card.packed_file_bytes:,} bytes.",
        f"* fp32 baseline as the same kind of file: {card.fp32_bytes:,} bytes; compression **{ratio:.2f}x**; "
        f"{card.avg_bits:.3f} bits per weight on average (float layers count 32).",
        "",
        "| layer | weight shape | weights | bits | in `model.onnx` |",
        "|---|---|---:|---:|---|",
        *[f"| `{r.name}` | {' x '.join(map(str, r.shape))} | {r.n_weights:,} | {r.bits} | `{r.onnx_name}` |"
          for r in card.layers],
        "",
        "Bits: `b` = 2^b k-means centroids per layer; `1a` / `1s` = adaptive (two levels) / static (one scale "
        "a, levels -a and +a) binary; `fp32` = not quantized. In `model.onnx` a quantized weight `w<j>` is "
        "rebuilt from `w<j>p` (its indices, bit-packed into uint8, least significant bit first) and `w<j>c` "
        "(its codebook) or `w<j>a` (its static scale) by standard ONNX ops (BitShift, BitwiseAnd, Cast, "
        "Gather, Reshape). BatchNorm is folded into the convolution before it: the conv gets the bias "
        "`w<j>b`, and a quantized weight is multiplied by the per-channel scale `w<j>s` after the lookup, so "
        "the codebooks are the quantized model's own. onnxruntime turns the dequantization into constant "
        "weights once, when it creates a session, so inference runs the plain float graph.",
    ]


def _check_lines(card: ModelCard) -> list[str]:
    lines = [
        f"* Re-evaluation of the packed model reproduced the logged EER (difference "
        f"{abs(card.accuracy.reeval_eer - card.accuracy.eer):.2g} points, tolerance {card.accuracy.eer_tolerance:g}).",
        f"* `model.onnx` has exactly the {card.size_bytes:,} bytes the size objective predicted from the recipe.",
    ]
    if card.onnx is not None:
        real = (f" and on {card.onnx.n_utterances:,} evaluation utterances" if card.onnx.n_utterances else "")
        lines.append(f"* onnxruntime runs `model.onnx` with the quantized torch model's embeddings: lowest cosine "
                     f"{card.onnx.min_cosine:.7f} (required >= 0.9999), largest difference "
                     f"{card.onnx.max_abs_diff:.2g}, on random input at two lengths{real}.")
        if card.onnx.eer is not None:
            lines.append(f"* Scored on the {card.accuracy.n_eval_trials:,} trials, the onnxruntime embeddings give EER "
                         f"{card.onnx.eer:.4f} % (torch: {card.accuracy.reeval_eer:.4f} %).")
    lines.append("* `model.packed.safetensors` loads back to a model with identical outputs.")
    if card.no_wespeaker is None:
        lines.append("* `wespeaker_avg_model.pt` loads with `strict=True` into a freshly built network and through "
                     "`load_pretrained`, with the packed model's embeddings.")
    if card.float_onnx_max_abs_diff is not None:
        lines.append(f"* `model.float.onnx` matches PyTorch within {card.float_onnx_max_abs_diff:.2g} (allowed "
                     "1e-4) at two input lengths.")
    return lines


def _use_lines(card: ModelCard) -> list[str]:
    kw = card.arch.get("kwargs", {})
    feats = (card.infer or {}).get("features", {})
    return [
        "### Without PyTorch: `infer.py`",
        "",
        "```bash",
        "pip install -r requirements.txt      # onnxruntime, numpy, kaldi-native-fbank, soundfile",
        "python infer.py embed a.wav b.wav --out emb.npy        # (2, "
        f"{kw.get('embed_dim', '?')}) float32 embeddings",
        "python infer.py score enroll.wav test.wav               # JSON: score, threshold, same_speaker",
        "python infer.py score enroll.wav test.wav --operating-point min_dcf",
        "```",
        "",
        f"Audio must be {feats.get('sample_rate', 16000)} Hz (any channel count; averaged to mono). A wav at "
        "another rate, an empty or an unreadable file is reported on stderr with exit status 2. Features: "
        f"{feats.get('num_mel_bins', kw.get('feat_dim', 80))}-bin Kaldi fbank "
        f"({feats.get('frame_length_ms', 25.0):g} ms windows every {feats.get('frame_shift_ms', 10.0):g} ms, no "
        "dither, int16-scaled samples) with per-utterance mean normalisation, as in training. Scores are the "
        "cosine of the two embeddings; a pair is the same speaker when the score reaches the threshold of "
        "the chosen operating point (`eer` by default), measured at export on the study's evaluation trials:",
        "",
        *_thresholds(card.infer or {}),
        "",
        "From Python: `from infer import Verifier; Verifier('.').score('a.wav', 'b.wav')`.",
        "",
        "### With lsv-quant",
        "",
        "```python",
        "from lsv_core.export import load_packed           # the quantized model, ready to fine-tune further",
        'model = load_packed("model.packed.safetensors")',
        *([] if card.no_wespeaker is not None else [
            "",
            "from lsv_core.models import load_pretrained       # the dequantized float model (WeSpeaker layout)",
            f'model = load_pretrained("wespeaker_avg_model.pt", "{card.arch.get("name")}", '
            + ", ".join(f"{k}={v!r}" for k, v in kw.items()) + ")"]),
        "```",
        "",
    ]


def render_model_card(card: ModelCard) -> str:
    """The card as Markdown."""
    p = card.provenance
    kw = card.arch.get("kwargs", {})
    lines = [
        f"# {card.title}",
        "",
        f"Speaker-embedding network `{card.arch.get('name')}` ({', '.join(f'{k}={v}' for k, v in kw.items())}) "
        f"with per-layer k-means weight quantization, found by a bit-width search (lsv-quant "
        f"{p.get('lsv_version', '?')}). Input: {kw.get('feat_dim', 80)}-bin Kaldi fbank "
        f"`(batch, frames, {kw.get('feat_dim', 80)})`; "
        f"output: the `(batch, {kw.get('embed_dim', '?')})` embedding, scored by cosine similarity.",
        "",
        "## Accuracy",
        "",
        f"* EER **{card.accuracy.eer:.2f} %**{_ci(card.accuracy.eer_ci_low, card.accuracy.eer_ci_high)} on {card.accuracy.n_eval_trials:,} trials "
        "(the study's evaluation subset, `data.max_trials`).",
        *([f"* minDCF (p_target = 0.01): **{card.accuracy.min_dcf_001:.4f}**" if card.accuracy.min_dcf_001 is not None
           else "* minDCF (p_target = 0.01): not logged"] if card.accuracy.p_target is None else []),
        *([f"* minDCF (p_target = {card.accuracy.p_target:g}, the study's `[objectives] p_target`): "
           f"**{card.accuracy.min_dcf:.4f}**"
           + (f" (re-evaluated {card.accuracy.reeval_min_dcf:.4f})" if card.accuracy.reeval_min_dcf is not None else "")]
          if card.accuracy.p_target is not None and card.accuracy.min_dcf is not None else []),
        f"* Re-evaluated at export from the packed file: EER {card.accuracy.reeval_eer:.4f} %, minDCF(0.01) "
        f"{card.accuracy.reeval_min_dcf_001:.4f}; accepted because |EER - logged| <= {card.accuracy.eer_tolerance:g} points.",
        "",
        "## Size",
        "",
        *_size_lines(card),
        "",
        "## How it was found",
        "",
        *[f"* {line}" for line in card.how_found],
        "",
        "## Provenance",
        "",
        "| | |",
        "|---|---|",
        *[f"| {k} | `{v}` |" for k, v in p.items()],
        "",
        "## Files",
        "",
        *[f"* `{name}`: {text}" for name, text in card.files.items()],
        *([] if card.no_wespeaker is None else [f"* no `wespeaker_avg_model.pt`: {card.no_wespeaker}."]),
        "",
        "## Checks at export",
        "",
        *_check_lines(card),
        "",
        "## Use",
        "",
        *_use_lines(card),
    ]
    return "\n".join(lines)
