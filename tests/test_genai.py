"""`compress export --format genai` (issue 18): the ONNX Runtime GenAI package carries the artifact's own codes
byte for byte, opens in onnxruntime_genai without any change by the user and generates what the artifact
generates; plans the runtime cannot execute exactly are refused."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from tiny_models import TEXT, hf_dir

from compress.errors import UserError

pytest.importorskip("onnxruntime_genai")



def _artifact(root: Path, text: Path, tied: bool, **kw) -> Path:
    from flows.quantize import QuantizeRequest, run_quantize

    model = hf_dir(root / "hf", TEXT, dtype=torch.float32, tied=tied)
    run_quantize(QuantizeRequest(model=str(model), target="ort", data=str(text), tokens=128, eval_tokens=128,
                                 seq_len=32, out=root / "art", **kw))
    return root / "art"


def _export(art: Path, out: Path, text: Path) -> dict:
    from flows.export import ExportRequest, run_export

    return run_export(ExportRequest(model=str(art), out=out, fmt="genai", data=str(text), tokens=128, seq_len=32))


@pytest.mark.parametrize("tied,kw", [
    (True, dict(layerwise=True, avg_bits=5.5, candidates="8,4,2", embeddings="quantize")),
    (False, dict(bits=4, group_size=32)),
    (False, dict(bits=4, group_size=32, symmetric=False)),
])
def test_the_package_carries_our_codes_and_generates_like_the_artifact(tmp_path, text_file, tied, kw):
    import onnx
    from onnx import numpy_helper

    from compress.artifact_formats import load_artifact
    from exporters.genai import QKV
    from exporters.ort_quant import ort_blocks, quantized_targets

    art = _artifact(tmp_path, text_file, tied, **kw)
    result = _export(art, tmp_path / "pkg", text_file)
    assert result["passed"], json.dumps(result["validation"], indent=1)
    gen = result["validation"]["vs artifact (kernel rounding)"]["checks"][1]
    assert gen["equal_tokens"] == 32
    files = set(p.name for p in (tmp_path / "pkg").iterdir())
    assert {"genai_config.json", "model.onnx", "tokenizer.json"} <= files
    ops = result["export"]["extra"]["genai"]["ops"]
    assert ops["GroupQueryAttention"] == 3 and ops["SkipSimplifiedLayerNormalization"] == 6
    # every MatMulNBits holds the artifact's bytes (q/k/v concatenated where the builder packed them)
    loaded = load_artifact(art)
    linears, _, tied_names = quantized_targets(loaded)
    graph = onnx.load(str(tmp_path / "pkg" / "model.onnx"))
    inits = {i.name: numpy_helper.to_array(i) for i in graph.graph.initializer}
    checked = 0
    for node in (n for n in graph.graph.node if n.op_type == "MatMulNBits"):
        parts = node.name.split("/")
        if parts[1] == "lm_head":
            names = [next(iter(tied_names)) if tied_names else "lm_head"]
        else:
            layer, block, proj = parts[2].split(".")[1], {"attn": "self_attn", "mlp": "mlp"}[parts[3]], parts[4]
            names = ([f"model.layers.{layer}.self_attn.{p}" for p in ("q_proj", "k_proj", "v_proj")]
                     if proj == "qkv_proj" else [f"model.layers.{layer}.{block}.{proj}"])
        blocks = [ort_blocks(linears[n]) for n in names]
        assert np.array_equal(inits[node.input[1]], np.concatenate([b["data"] for b in blocks]))
        assert np.array_equal(inits[node.input[2]].reshape(-1), np.concatenate([b["scales"].reshape(-1)
                                                                                 for b in blocks]))
        # zero points only where the codes need them, or for the packed Q/K/V (the builder concatenates them)
        has_zeros = len(node.input) > 3 and node.input[3] != ""
        qkv = names[0].rpartition(".")[2] in QKV
        assert has_zeros == (any(b["zeros"] is not None for b in blocks) or qkv), node.name
        checked += len(names)
    assert checked == len(linears)
    stored = sum(v.nbytes for v in inits.values())
    on_disk = sum(f.stat().st_size for f in (tmp_path / "pkg").glob("model.onnx*"))
    assert on_disk < stored * 1.05 + 200_000  # the weights once (no stale copy in model.onnx.data)


def test_plans_the_package_cannot_run_exactly_are_refused(tmp_path, text_file):
    art = _artifact(tmp_path / "a", text_file, tied=False, bits=4, group_size=32, embeddings="quantize")
    with pytest.raises(UserError, match="quantized untied embedding"):
        _export(art, tmp_path / "pkg", text_file)
    assert not (tmp_path / "pkg").exists()
    from flows.quantize import QuantizeRequest, run_quantize

    run_quantize(QuantizeRequest(model=str(tmp_path / "a" / "hf"), bits=3, group_size=32, data=str(text_file),
                                 tokens=128, evaluate=False, seq_len=32, out=tmp_path / "b"))
    with pytest.raises(UserError, match="--target ort"):
        _export(tmp_path / "b", tmp_path / "pkg3", text_file)
