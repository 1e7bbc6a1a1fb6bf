"""compressed-tensors (pack-quantized) checkpoints of a mixed-precision tiny Llama: transformers' from_pretrained
loads them with every weight accounted for, and their logits are the artifact's (bit-exact in fp32)."""

from __future__ import annotations

import json
import logging

import pytest
import torch
from tiny_models import quantized_artifact, tied

from compress.errors import UserError
from compress.quantize.modules import PackedWeight
from compress.quantize.rtn import QuantizedWeight
from compress.quantize.spec import QuantSpec

ct = pytest.importorskip("compressed_tensors")

from compress.quantize.compressed_tensors import write_compressed_tensors  # noqa: E402

MIXED = [QuantSpec(8, 0), QuantSpec(4, 16), QuantSpec(4, 16, False), QuantSpec(3, 32), QuantSpec(2, 16),
         QuantSpec(5, 0, False), QuantSpec(6, 32), QuantSpec(16), QuantSpec(4, 32, positive_scale=True),
         QuantSpec(2, 32, False, "gptq")]
IDS = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(0))
CT_NEW = tuple(int(x) for x in ct.__version__.split(".")[:2]) >= (0, 18)


def _artifact(tmp, menu: list[QuantSpec], embedding: QuantSpec | None):
    """A tiny tied Llama quantized with `menu` cycled over its Linears, saved and loaded back (as test_export_quant)."""
    return quantized_artifact(tied("llama"), tmp / "art", menu, embedding)


def _logits(model) -> torch.Tensor:
    with torch.inference_mode():
        return model(IDS).logits.float()


def _load(path, **kw):
    """from_pretrained, failing on missing / unexpected / mismatched weights or an 'initialized' warning."""
    from transformers import AutoModelForCausalLM

    records: list[logging.LogRecord] = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = records.append
    logger = logging.getLogger("transformers")
    logger.addHandler(handler)
    try:
        model, info = AutoModelForCausalLM.from_pretrained(path, output_loading_info=True, **kw)
    finally:
        logger.removeHandler(handler)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys", "error_msgs")), info
    bad = [r.getMessage() for r in records if "initializ" in r.getMessage() or "not used" in r.getMessage()]
    assert not bad, bad
    return model.eval()


@pytest.fixture(scope="module")
def mixed(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ct")
    art = _artifact(tmp, MIXED, QuantSpec(4, 16))
    return art, _logits(art.module)


def test_mixed_plan_loads_in_transformers_with_the_artifacts_logits(mixed, tmp_path):
    art, ref = mixed
    out = tmp_path / "ct"
    rec = write_compressed_tensors(art, out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ct"]  # atomic: no temp dir left
    specs = art.extra["manifest"]["modules"]
    n_quant = sum(1 for s in specs.values() if s["bits"] < 16)  # the Linears and the embedding
    assert sum(rec["containers"].values()) == n_quant + 1  # + the untied head
    assert {"3→4", "6→8", "2", "4", "8"} <= set(rec["containers"]) and rec["asymmetric"] in ("fold", "packed")
    assert not rec["dequantized_float"] and rec["file_bytes"] == (out / "model.safetensors").stat().st_size
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "compressed-tensors" and qc["format"] == "pack-quantized"
    assert qc["quantization_status"] == "compressed"
    targets = [t for g in qc["config_groups"].values() for t in g["targets"]]
    assert len(targets) == len(set(targets)) == n_quant + 1
    assert "lm_head" in targets and "model.embed_tokens" in targets
    fp16 = [n for n, s in specs.items() if s["bits"] == 16]
    assert fp16 and set(fp16) <= set(qc["ignore"]) and not set(fp16) & set(targets)
    ch = [g for g in qc["config_groups"].values() if g["weights"]["strategy"] == "channel"]
    assert ch and all(g["weights"]["group_size"] is None for g in ch)

    # 4-bit symmetric codes are stored verbatim: CT's int32 words are our nibble stream
    from safetensors.torch import load_file

    state = load_file(str(out / "model.safetensors"))
    q = art.module.get_submodule("model.layers.0.self_attn.k_proj").packed
    assert q.spec == QuantSpec(4, 16)
    packed = state["model.layers.0.self_attn.k_proj.weight_packed"]
    assert packed.dtype == torch.int32 and packed.shape == (16, 4)
    assert torch.equal(packed.contiguous().view(torch.uint8).reshape(-1), q.qweight)
    assert state["model.layers.0.self_attn.k_proj.weight_scale"].dtype == torch.float16

    exact = _logits(_load(out, dtype=torch.float32))
    torch.testing.assert_close(exact, ref, rtol=0, atol=1e-6 * float(ref.abs().max()))
    default = _load(out)  # the compressed-tensors quantizer defaults to fp16
    assert default.dtype == torch.float16
    assert float((_logits(default) - ref).abs().max()) < 1e-3 * float(ref.abs().max())


def test_asymmetric_modes(mixed, tmp_path):
    art, ref = mixed
    rec = write_compressed_tensors(art, tmp_path / "fold", asymmetric="fold", containers="native")
    assert rec["asymmetric"] == "fold" and rec["containers"]["3"] == 2  # native: 3-bit codes as 3-bit
    assert {k for k in rec["containers"] if k.startswith("4a")} in ({"4a→4s"}, {"4a→5s"}, {"4a→4s", "4a→5s"})
    assert all(g["symmetric"] for g in rec["groups"].values())
    torch.testing.assert_close(_logits(_load(tmp_path / "fold", dtype=torch.float32)), ref, rtol=0, atol=1e-6)

    rec = write_compressed_tensors(art, tmp_path / "packed", asymmetric="packed")
    assert rec["containers"]["4a"] == 2 and rec["containers"]["5a→8"] == 2
    from safetensors.torch import load_file

    state = load_file(str(tmp_path / "packed" / "model.safetensors"))
    name = "model.layers.0.self_attn.v_proj"
    pw = art.module.get_submodule(name).packed
    assert pw.spec == QuantSpec(4, 16, False)
    zp = state[f"{name}.weight_zero_point"]
    assert zp.dtype == torch.int32 and zp.shape == (16 * 4 // 32, 2)  # 16 rows of 4-bit zero points per group
    if CT_NEW:  # transformers 4.57 cannot load packed zero points with compressed-tensors >= 0.18: decompress alone
        from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor
        from compressed_tensors.quantization import QuantizationScheme

        cfg = json.loads((tmp_path / "packed" / "config.json").read_text())["quantization_config"]
        group = next(g for g in cfg["config_groups"].values() if name in g["targets"])
        scheme = QuantizationScheme(**{**group, "targets": [name]})
        local = {k.rpartition(".")[2]: v for k, v in state.items() if k.startswith(name + ".")}
        w = PackedQuantizationCompressor.decompress({**local, "weight_scale": local["weight_scale"].float()}, scheme)
        assert torch.equal(w["weight"], pw.dequantize())
    else:
        torch.testing.assert_close(_logits(_load(tmp_path / "packed", dtype=torch.float32)), ref, rtol=0, atol=1e-6)


def test_float_embedding_stays_tied_and_dequantized(mixed, tmp_path):
    art, ref = mixed
    rec = write_compressed_tensors(art, tmp_path / "ct", embedding="float", containers="vllm")
    assert rec["dequantized_float"] == ["model.embed_tokens"] and rec["dequantized_float_bytes"] == 64 * 32 * 4
    assert {g["num_bits"] for g in rec["groups"].values()} == {4, 8} and rec["containers"]["2→4"] == 2
    assert any("written dequantized as float32" in n for n in rec["notes"])
    cfg = json.loads((tmp_path / "ct" / "config.json").read_text())
    assert cfg["tie_word_embeddings"] is True and "lm_head" in cfg["quantization_config"]["ignore"]
    model = _load(tmp_path / "ct", dtype=torch.float32)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    torch.testing.assert_close(_logits(model), ref, rtol=0, atol=1e-6)


def test_unsupported_specs_are_refused_and_leave_nothing(tmp_path):
    art = _artifact(tmp_path, [QuantSpec(4, 16), QuantSpec(4, 32, False, "hqq")], None)
    with pytest.raises(UserError, match=r"model\.layers\.0\.self_attn\.k_proj: q4g32a-hqq .*fp16 \(hqq\)"):
        write_compressed_tensors(art, tmp_path / "ct")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["art"]
    rec = write_compressed_tensors(art, tmp_path / "ct", unsupported="float")
    hqq = [n for n, s in art.extra["manifest"]["modules"].items() if s["method"] == "hqq"]
    assert rec["dequantized_float"] == sorted(hqq)
    torch.testing.assert_close(_logits(_load(tmp_path / "ct", dtype=torch.float32)), _logits(art.module),
                               rtol=0, atol=1e-6)

    # 8-bit asymmetric codes whose c − z spans more than 8 bits cannot be folded to symmetric ones
    name = "model.layers.0.self_attn.q_proj"
    lin = art.module.get_submodule(name)
    codes = torch.zeros(lin.out_features, lin.in_features, dtype=torch.uint8)
    codes[0, 0], codes[1, 0] = 255, 0
    zeros = torch.zeros(lin.out_features, 1, dtype=torch.uint8)
    zeros[1] = 255
    scales = torch.full((lin.out_features, 1), 0.01, dtype=torch.float16)
    lin.packed = PackedWeight.from_quantized(QuantizedWeight(codes, scales, zeros, QuantSpec(8, 0, False)))
    with pytest.raises(UserError, match=rf"{name}: q8gcha folded .*\[-255, 255\]"):
        write_compressed_tensors(art, tmp_path / "x", asymmetric="fold")
    assert not (tmp_path / "x").exists()
    with pytest.raises(UserError, match="containers='big'"):
        write_compressed_tensors(art, tmp_path / "x", containers="big")


def test_convert_verb_writes_a_checkpoint_transformers_loads(mixed, tmp_path):
    from typer.testing import CliRunner

    from cli import app

    art, expected = mixed
    src = art.path
    r = CliRunner().invoke(app, ["convert", str(src), "--compressed-tensors", str(tmp_path / "ct"), "--json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["containers"]
    torch.testing.assert_close(_logits(_load(tmp_path / "ct", dtype=torch.float32)), expected, rtol=0, atol=0)
    bad = CliRunner().invoke(app, ["convert", str(tmp_path), "--compressed-tensors", str(tmp_path / "x")])
    assert bad.exit_code == 2 and "not a compress artifact" in bad.stderr and not (tmp_path / "x").exists()
