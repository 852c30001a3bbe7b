"""The model card of an exported model: a Markdown page of what it is, how good, how small, how found.

:func:`render_model_card` is a pure function of a :class:`ModelCard`; the exporter fills the card from
the study (logged metrics), its own re-evaluation and the files it wrote. EERs are in percent, sizes in
bytes (MB = 10^6 bytes).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

__all__ = ["LayerRow", "ModelCard", "render_model_card"]


@dataclass(frozen=True)
class LayerRow:
    """One quantizable layer: its weight shape and how it is stored (``"4"``, ``"1a"``, ``"1s"``, ``"fp32"``)."""

    name: str
    shape: tuple[int, ...]
    bits: str

    @property
    def n_weights(self) -> int:
        n = 1
        for d in self.shape:
            n *= int(d)
        return n


@dataclass(frozen=True)
class ModelCard:
    """Everything the card states. ``eer*`` are the study's logged values; ``reeval_*`` the exporter's."""

    title: str
    arch: Mapping[str, Any]
    eer: float
    eer_ci_low: float | None
    eer_ci_high: float | None
    min_dcf_001: float | None
    reeval_eer: float
    reeval_min_dcf_001: float
    eer_tolerance: float
    n_eval_trials: int
    size_bytes: int  # packed tensors, the search objective
    file_bytes: int  # the packed file with its safetensors header
    fp32_bytes: int
    avg_bits: float
    layers: Sequence[LayerRow]
    provenance: Mapping[str, Any]  # study, trial, run ids, digests, version, git commit, rule, ...
    files: Mapping[str, str] = field(default_factory=dict)  # file name -> one-line description
    how_found: Sequence[str] = ()  # lines describing the search
    onnx_max_abs_diff: float | None = None


def _ci(low: float | None, high: float | None) -> str:
    return "" if low is None or high is None else f" (95 % bootstrap CI {low:.2f} to {high:.2f})"


def render_model_card(card: ModelCard) -> str:
    """The card as Markdown."""
    p = card.provenance
    ratio = card.fp32_bytes / card.size_bytes if card.size_bytes else float("nan")
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
        f"* EER **{card.eer:.2f} %**{_ci(card.eer_ci_low, card.eer_ci_high)} on {card.n_eval_trials} trials "
        "(the study's evaluation subset, `data.max_trials`).",
        f"* minDCF (p_target = 0.01): **{card.min_dcf_001:.4f}**" if card.min_dcf_001 is not None
        else "* minDCF (p_target = 0.01): not logged",
        f"* Re-evaluated at export from the packed file: EER {card.reeval_eer:.4f} %, minDCF(0.01) "
        f"{card.reeval_min_dcf_001:.4f}; accepted because |EER - logged| <= {card.eer_tolerance:g} points.",
        "",
        "## Size",
        "",
        f"* Packed weights: **{card.size_bytes:,} bytes** ({card.size_bytes / 1e6:.4f} MB), "
        f"the search's size objective; the file `model.packed.safetensors` is {card.file_bytes:,} bytes "
        f"with its header.",
        f"* fp32 baseline: {card.fp32_bytes:,} bytes; compression **{ratio:.2f}x**; "
        f"{card.avg_bits:.3f} bits per weight on average (float layers count 32).",
        "",
        "| layer | weight shape | weights | bits |",
        "|---|---|---:|---:|",
    ]
    lines += [f"| `{r.name}` | {' x '.join(map(str, r.shape))} | {r.n_weights:,} | {r.bits} |" for r in card.layers]
    lines += [
        "",
        "Bits: `b` = 2^b k-means centroids per layer; `1a` / `1s` = adaptive / static binary; `fp32` = not "
        "quantized. Biases and BatchNorm stay float.",
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
    ]
    lines += [
        "",
        "## Checks at export",
        "",
        f"* Re-evaluation of the packed file reproduced the logged EER (difference "
        f"{abs(card.reeval_eer - card.eer):.2g} points, tolerance {card.eer_tolerance:g}).",
        f"* The packed file holds exactly {card.size_bytes:,} bytes of tensors; its copy loads back to a model "
        "with identical outputs.",
        "* `wespeaker_avg_model.pt` loads with `strict=True` into a freshly built network and through "
        "`load_pretrained`, with the packed model's embeddings.",
    ]
    if card.onnx_max_abs_diff is not None:
        lines.append(f"* onnxruntime matches PyTorch within {card.onnx_max_abs_diff:.2g} (allowed 1e-4) at two "
                     "input lengths.")
    lines += [
        "",
        "## Use",
        "",
        "```python",
        "from lsv_core.export import load_packed           # the quantized model, ready to fine-tune further",
        'model = load_packed("model.packed.safetensors")',
        "",
        "from lsv_core.models import load_pretrained       # the dequantized float model (WeSpeaker layout)",
        f'model = load_pretrained("wespeaker_avg_model.pt", "{card.arch.get("name")}", '
        + ", ".join(f"{k}={v!r}" for k, v in kw.items()) + ")",
        "",
        "import onnxruntime as ort                          # no PyTorch needed",
        'emb = ort.InferenceSession("model.onnx").run(["embedding"], {"fbank": fbank})[0]',
        "```",
        "",
    ]
    return "\n".join(lines)
