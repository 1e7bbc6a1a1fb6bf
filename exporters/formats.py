"""The export formats, their options and the rules between them, in one place: the CLI's --help, `compress export`,
a recipe's export step and the float exporter all read this table instead of repeating it."""

from __future__ import annotations

from dataclasses import dataclass

from compress.errors import UserError


@dataclass(frozen=True)
class ExportFormat:
    """One `--format`: whether it carries a quantized artifact's own codes (and which `--target` makes them)."""

    name: str
    summary: str
    target: str | None = None  # quantize --target whose artifact it exports; None: a float format

    @property
    def quantized(self) -> bool:
        return self.target is not None


EXPORT_FORMATS = {f.name: f for f in (
    ExportFormat("fp32", "float32 graph"),
    ExportFormat("fp16", "float16 weights and activations"),
    ExportFormat("int4", "ONNX Runtime MatMulNBits / GatherBlockQuantized with the artifact's own codes", "ort"),
    ExportFormat("qdq", "TensorRT-style DequantizeLinear with the artifact's own codes", "trt"),
    ExportFormat("genai", "ONNX Runtime GenAI package (the model builder's fused graph, genai_config.json, "
                          "tokenizer) with the artifact's own codes", "ort"),
)}
FLOAT_FORMATS = tuple(n for n, f in EXPORT_FORMATS.items() if not f.quantized)
QUANTIZED_FORMATS = tuple(n for n, f in EXPORT_FORMATS.items() if f.quantized)
OPSETS = range(14, 24)  # what the exporters and ONNX Runtime 1.32 run; qdq raises the default to 21
ACCURACY_LEVELS = {0: "fp32 compute (exact)", 4: "int8 activations (faster)"}


def format_help() -> str:
    """`--format` help text from the table."""
    return " | ".join(f"{n} ({f.summary}{f'; make it with --target {f.target}' if f.target else ''})"
                      for n, f in EXPORT_FORMATS.items())


def check_export_options(fmt: str, opset: int | None = None, accuracy_level: int = 0,
                         fuse_attention: bool = False) -> ExportFormat:
    """The format's entry; UserError for an unknown format, an opset out of range or options it does not take."""
    if fmt not in EXPORT_FORMATS:
        raise UserError(f"--format {fmt}: use one of {', '.join(EXPORT_FORMATS)}")
    if opset is not None and opset not in OPSETS:
        raise UserError(f"--opset {opset}: use an opset from {OPSETS.start} to {OPSETS.stop - 1}")
    if accuracy_level not in ACCURACY_LEVELS:
        levels = ", ".join(f"{k} ({v})" for k, v in ACCURACY_LEVELS.items())
        raise UserError(f"--accuracy-level {accuracy_level}: use {levels}")
    if accuracy_level and fmt not in ("int4", "genai"):
        raise UserError(f"--accuracy-level {accuracy_level} applies to --format int4 or genai (MatMulNBits), not {fmt}")
    if fuse_attention and fmt == "genai":
        raise UserError("--fuse-attention: a genai package is always built with GroupQueryAttention; drop the flag")
    if fuse_attention and fmt == "qdq":
        raise UserError("--fuse-attention writes ONNX Runtime's GroupQueryAttention, which TensorRT does not run: "
                        "use it with --format fp32, fp16 or int4")
    return EXPORT_FORMATS[fmt]
