"""The synthetic checkpoints: published layout, loadable by transformers,
numerically alive, deterministic, FP8 within e4m3 precision, torch-free."""

from __future__ import annotations

import json
import subprocess
import sys
from math import comb
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoTokenizer, Glm4MoeForCausalLM

from convert.safetensors_io import SafetensorsFile, to_float32
from convert.synthetic import (
    PRESETS, SPECIAL_TOKENS, TOKENIZER_SIZE, count_params, encode_fp8_e4m3,
    make_config, special_token_ids, write_checkpoint,
)
from reference import reference_logits, reference_model

ROOT = Path(__file__).resolve().parents[1]
STYLES = ("published", "rope_parameters")  # `checkpoint` is the session fixture in conftest.py


def read_tensors(folder: Path) -> dict[str, tuple[str, np.ndarray]]:
    """name -> (dtype code, stored values) over all shards."""
    out = {}
    for f in sorted(folder.glob("model-*.safetensors")):
        st = SafetensorsFile(f)
        out.update({n: (st.tensors[n].dtype, st.read(n)) for n in st.tensors})
    return out


def f32(entry) -> np.ndarray:
    dtype, x = entry
    return to_float32(x, dtype)


# ------------------------------------------------------------ presets

@pytest.mark.parametrize("preset", PRESETS)
def test_every_matrix_in_dim_is_a_multiple_of_64(preset):
    c = make_config(preset)
    dims = {"hidden": c["hidden_size"], "q": c["num_attention_heads"] * c["head_dim"],
            "dense": c["intermediate_size"], "expert": c["moe_intermediate_size"]}
    assert {k: v % 64 for k, v in dims.items()} == dict.fromkeys(dims, 0)
    assert c["vocab_size"] % 64 == 0 and c["vocab_size"] >= TOKENIZER_SIZE
    ids = special_token_ids()
    assert c["eos_token_id"] == [ids["<|endoftext|>"], ids["<|user|>"], ids["<|observation|>"]]
    assert c["pad_token_id"] == ids["<|endoftext|>"]


def test_quality_preset_is_mostly_routed_experts(checkpoint):
    total, experts = count_params(make_config("quality"))
    print(f"quality: {total:,} parameters, routed experts {experts / total:.1%}")
    assert experts / total > 0.9
    # The count is the checkpoint's, MTP layer aside.
    mtp = f"model.layers.{make_config('quality')['num_hidden_layers']}."
    tensors = read_tensors(checkpoint("quality"))
    assert total == sum(x.size for n, (_, x) in tensors.items() if not n.startswith(mtp))


def test_make_config_overrides_and_rejects_unknown_presets():
    assert make_config("air-tiny", hidden_size=128)["hidden_size"] == 128
    assert PRESETS["air-tiny"]["hidden_size"] == 64
    with pytest.raises(ValueError, match="unknown preset 'glm5'"):
        make_config("glm5")


# ------------------------------------------------------------ transformers

@pytest.mark.parametrize("style", STYLES)
@pytest.mark.parametrize("preset", PRESETS)
def test_transformers_loads_every_weight(checkpoint, preset, style):
    folder = checkpoint(preset, style)
    c = make_config(preset)
    model, info = Glm4MoeForCausalLM.from_pretrained(
        folder, dtype=torch.float32, output_loading_info=True)
    assert not info["missing_keys"] and not info["mismatched_keys"]
    mtp = f"model.layers.{c['num_hidden_layers']}."
    assert info["unexpected_keys"] and all(k.startswith(mtp) for k in info["unexpected_keys"])
    # RoPE on half of head_dim, whichever way the config says it.
    assert model.model.rotary_emb.inv_freq.shape == (c["head_dim"] // 4,)
    # Per-expert tensors land in transformers' fused experts in expert order.
    tensors = read_tensors(folder)
    k, e = c["first_k_dense_replace"], c["n_routed_experts"] - 1
    p = f"model.layers.{k}.mlp.experts.{e}"
    experts = model.model.layers[k].mlp.experts
    gate_up = np.concatenate([f32(tensors[f"{p}.gate_proj.weight"]), f32(tensors[f"{p}.up_proj.weight"])])
    np.testing.assert_array_equal(experts.gate_up_proj[e].detach().numpy(), gate_up)
    np.testing.assert_array_equal(experts.down_proj[e].detach().numpy(), f32(tensors[f"{p}.down_proj.weight"]))


@pytest.mark.parametrize("preset", PRESETS)
def test_logits_are_finite_and_peaked(checkpoint, preset):
    tokens = np.random.default_rng(1).integers(0, TOKENIZER_SIZE, size=(2, 24))
    logits = reference_logits(checkpoint(preset), tokens)
    assert logits.shape == (2, 24, make_config(preset)["vocab_size"])
    assert np.isfinite(logits).all()
    assert logits.std(-1).mean() > 1.0
    p = np.exp(logits - logits.max(-1, keepdims=True))
    top1 = (p / p.sum(-1, keepdims=True)).max(-1)
    assert top1.std() > 0.05 and top1.max() > 0.3
    assert len(np.unique(logits.argmax(-1))) >= 8
    # The newer config style describes the same model.
    np.testing.assert_array_equal(reference_logits(checkpoint(preset, "rope_parameters"), tokens), logits)


@pytest.mark.parametrize("preset", PRESETS)
def test_routing_varies_and_exercises_bias_and_groups(checkpoint, preset):
    c = make_config(preset)
    model = reference_model(checkpoint(preset))
    seen = {}

    def hook(i):
        def record(module, args, out):
            seen[i] = (out[0].numpy(), out[2].numpy(), module.e_score_correction_bias.numpy())
        return record

    gates = [(i, layer.mlp.gate) for i, layer in enumerate(model.model.layers) if hasattr(layer.mlp, "gate")]
    handles = [g.register_forward_hook(hook(i)) for i, g in gates]
    try:
        with torch.no_grad():
            model(torch.as_tensor(np.random.default_rng(2).integers(0, TOKENIZER_SIZE, (1, 64))))
    finally:
        for h in handles:
            h.remove()
    assert sorted(seen) == list(range(c["first_k_dense_replace"], c["num_hidden_layers"]))
    k, groups = c["num_experts_per_tok"], c["n_group"]
    assert groups > 1 or preset != "glm45-tiny", "glm45-tiny is the grouped-routing fixture"
    bias_matters = groups_matter = 0
    for logits, chosen, bias in seen.values():
        chosen = np.sort(chosen, -1)
        # Not balanced (no aux-free bias tuning here), but spread: 64 tokens use most experts.
        assert len(np.unique(chosen)) >= 0.6 * c["n_routed_experts"]
        assert len({tuple(r) for r in chosen}) >= min(32, comb(c["n_routed_experts"], k) // 2)  # of 64 tokens
        scores = 1 / (1 + np.exp(-logits.astype(np.float64)))
        no_bias = np.sort(np.argsort(-scores, -1)[:, :k], -1)
        ungrouped = np.sort(np.argsort(-(scores + bias), -1)[:, :k], -1)
        bias_matters += (no_bias != ungrouped).any(-1).sum()
        groups_matter += (ungrouped != chosen).any(-1).sum()
    assert bias_matters > 0, "e_score_correction_bias never changes a choice"
    if groups > 1:
        assert groups_matter > 0, "group-limited routing never changes a choice"
    else:
        assert groups_matter == 0


# ------------------------------------------------------------ files

def test_shards_index_and_mtp_layout(tmp_path):
    c = make_config("glm45-tiny")
    folder = write_checkpoint(tmp_path / "ck", c, num_shards=3)
    files = sorted(p.name for p in folder.glob("*.safetensors"))
    assert files == [f"model-0000{k}-of-00003.safetensors" for k in (1, 2, 3)]
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    where, total = {}, 0
    for name in files:
        st = SafetensorsFile(folder / name)
        assert st.metadata == {"format": "pt"}
        where.update(dict.fromkeys(st.tensors, name))
        total += sum(t.nbytes for t in st.tensors.values())
    assert index["weight_map"] == where and index["metadata"]["total_size"] == total
    layers = {}
    for name, f in where.items():
        if name.startswith("model.layers."):
            layers.setdefault(name.split(".")[2], set()).add(f)
    assert any(len(fs) > 1 for fs in layers.values()), "no layer straddles two shards"

    tensors = read_tensors(folder)
    assert tensors["model.layers.3.mlp.gate.e_score_correction_bias"][0] == "F32"
    assert {d for n, (d, _) in tensors.items() if "correction" not in n} == {"BF16"}
    h, v, n = c["hidden_size"], c["vocab_size"], c["num_hidden_layers"]
    mtp = {k.removeprefix(f"model.layers.{n}."): x.shape for k, (_, x) in tensors.items()
           if k.startswith(f"model.layers.{n}.")}
    moe = {k.removeprefix("model.layers.4."): x.shape for k, (_, x) in tensors.items()
           if k.startswith("model.layers.4.")}
    assert mtp == {**moe, "embed_tokens.weight": (v, h), "enorm.weight": (h,), "hnorm.weight": (h,),
                   "eh_proj.weight": (h, 2 * h), "shared_head.norm.weight": (h,),
                   "shared_head.head.weight": (v, h)}
    assert moe["self_attn.q_norm.weight"] == (c["head_dim"],)
    assert "mlp.experts.15.down_proj.weight" in moe and "mlp.gate.weight" in moe


def test_config_styles(checkpoint):
    pub = json.loads((checkpoint("air-tiny") / "config.json").read_text())
    new = json.loads((checkpoint("air-tiny", "rope_parameters") / "config.json").read_text())
    assert pub["rope_theta"] == 1000000 and pub["partial_rotary_factor"] == 0.5
    assert pub["rope_scaling"] is None and pub["torch_dtype"] == "bfloat16"
    assert new["rope_parameters"] == {"rope_type": "default", "rope_theta": 1000000, "partial_rotary_factor": 0.5}
    assert not {"rope_theta", "partial_rotary_factor", "rope_scaling", "torch_dtype"} & set(new)
    assert new["dtype"] == "bfloat16"
    assert {k: v for k, v in pub.items() if k in new} == {k: v for k, v in new.items() if k in pub}
    gen = json.loads((checkpoint("air-tiny") / "generation_config.json").read_text())
    assert gen["eos_token_id"] == pub["eos_token_id"] and gen["pad_token_id"] == pub["pad_token_id"]


def test_same_seed_same_bytes_and_mtp_is_separable(tmp_path):
    c = make_config("air-tiny")
    a = write_checkpoint(tmp_path / "a", c, seed=3)
    b = write_checkpoint(tmp_path / "b", c, seed=3)
    names = sorted(p.name for p in a.iterdir())
    assert names == sorted(p.name for p in b.iterdir())
    assert all((a / n).read_bytes() == (b / n).read_bytes() for n in names)
    other = write_checkpoint(tmp_path / "c", c, seed=4)
    shard = "model-00001-of-00002.safetensors"
    assert (other / shard).read_bytes() != (a / shard).read_bytes()
    without = read_tensors(write_checkpoint(tmp_path / "d", c, seed=3, with_mtp=False))
    full = read_tensors(a)
    assert set(full) - set(without) == {n for n in full if n.startswith("model.layers.3.")}
    assert all(np.array_equal(x, full[n][1]) for n, (_, x) in without.items())


def test_refuses_a_non_empty_folder_and_bad_options(tmp_path):
    (tmp_path / "old.txt").write_text("x")
    with pytest.raises(ValueError, match="not empty"):
        write_checkpoint(tmp_path, make_config("air-tiny"))
    with pytest.raises(ValueError, match="config_style"):
        write_checkpoint(tmp_path / "n", make_config("air-tiny"), config_style="yaml")
    with pytest.raises(ValueError, match="num_shards 0"):
        write_checkpoint(tmp_path / "n", make_config("air-tiny"), num_shards=0)
    assert not (tmp_path / "n").exists()


def test_generation_imports_neither_torch_nor_transformers(tmp_path):
    code = (
        "import sys\n"
        "sys.modules['torch'] = None; sys.modules['transformers'] = None\n"
        "from convert.synthetic import make_config, write_checkpoint\n"
        f"write_checkpoint({str(tmp_path / 'ck')!r}, make_config('air-tiny'), weight_format='fp8')\n"
        "bad = [m for m, v in sys.modules.items() if v is not None and m.split('.')[0] in ('torch', 'transformers')]\n"
        "assert not bad, bad\n"
    )
    run = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert (tmp_path / "ck" / "config.json").exists()


# ------------------------------------------------------------ tokenizer

def test_tokenizer_round_trips_and_has_glm_special_tokens(checkpoint):
    tok = AutoTokenizer.from_pretrained(checkpoint("air-tiny"))
    for text in ["Héllo, 世界! 🚀 naïve café", "tabs\tand\r\nnewlines\n\n  two  spaces ",
                 "e\u0301 ﬁ \u200d👩‍💻 ∑x² 🇫🇷", "The user asks the assistant.", ""]:
        ids = tok.encode(text, add_special_tokens=False)
        assert tok.decode(ids) == text
    assert len(tok.encode(" the assistant", add_special_tokens=False)) < len(" the assistant")
    ids = special_token_ids()
    assert list(ids) == SPECIAL_TOKENS and len(ids) == 36
    assert list(ids.values()) == list(range(TOKENIZER_SIZE - 36, TOKENIZER_SIZE))
    for t, i in ids.items():
        assert tok.encode(t, add_special_tokens=False) == [i], t
    assert tok.encode("x<|user|>y", add_special_tokens=False)[1] == ids["<|user|>"]
    end = ids["<|endoftext|>"]
    assert (tok.eos_token, tok.eos_token_id, tok.pad_token_id) == ("<|endoftext|>", end, end)
    # As in GLM: role tokens are special, reasoning and tool markup are not.
    text = "<|assistant|><think>a</think><tool_call>f<arg_key>k</arg_key></tool_call><|user|>"
    assert tok.decode(tok.encode(text), skip_special_tokens=True) == \
        "<think>a</think><tool_call>f<arg_key>k</arg_key></tool_call>"


def test_chat_template_renders_glm_prompts(checkpoint):
    folder = checkpoint("air-tiny")
    tok = AutoTokenizer.from_pretrained(folder)
    template = (folder / "chat_template.jinja").read_text()
    assert json.loads((folder / "tokenizer_config.json").read_text())["chat_template"] == template
    assert template == (ROOT / "convert" / "glm45_chat_template.jinja").read_text()
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {
        "type": "object", "properties": {"city": {"type": "string"}}}}}]
    messages = [
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": "", "tool_calls": [
            {"function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]},
        {"role": "tool", "content": '{"c": 20}'},
    ]
    text = tok.apply_chat_template(messages, tools=tools, add_generation_prompt=True,
                                   tokenize=False, enable_thinking=False)
    assert text.startswith("[gMASK]<sop><|system|>\n# Tools")
    assert "<|user|>\nWeather in Paris?/nothink<|assistant|>\n<think></think>\n<tool_call>get_weather\n" in text
    assert text.endswith("<|observation|>\n<tool_response>\n{\"c\": 20}\n</tool_response>"
                         "<|assistant|>\n<think></think>")
    ids = special_token_ids()
    out = tok.apply_chat_template(messages, tools=tools, add_generation_prompt=True, enable_thinking=False)
    out = out["input_ids"] if hasattr(out, "keys") else out
    assert out[:3] == [ids["[gMASK]"], ids["<sop>"], ids["<|system|>"]]
    assert tok.decode(out) == text


# ------------------------------------------------------------ FP8

def test_fp8_encoder_matches_torch_and_rounds_to_nearest_even():
    rng = np.random.default_rng(0)
    x = (rng.standard_normal(100_000) * 10.0 ** rng.uniform(-5, 2.6, 100_000)).astype(np.float32)
    x = x[np.abs(x) <= 448]
    want = torch.from_numpy(x).to(torch.float8_e4m3fn).view(torch.uint8).numpy()
    np.testing.assert_array_equal(encode_fp8_e4m3(x), want)
    codes = np.arange(256, dtype=np.uint8)
    values = to_float32(codes, "F8_E4M3")
    finite = ~np.isnan(values)
    np.testing.assert_array_equal(encode_fp8_e4m3(values[finite]), codes[finite])
    edge = np.array([1.0625, 1.1875, 2.0 ** -10, 3 * 2.0 ** -10, 1e6, -np.inf, np.nan, -0.0], np.float32)
    assert encode_fp8_e4m3(edge).tolist() == [0x38, 0x3A, 0x00, 0x02, 0x7E, 0xFE, 0x7F, 0x80]


def test_fp8_checkpoint_is_the_bf16_one_within_e4m3_precision(checkpoint):
    bf16 = read_tensors(checkpoint("glm45-tiny"))
    fp8 = read_tensors(checkpoint("glm45-tiny", fmt="fp8"))
    quantized = {n for n, (d, _) in fp8.items() if d == "F8_E4M3"}
    keep = ("embed_tokens.weight", "lm_head.weight", "mlp.gate.weight", "eh_proj.weight")
    assert quantized == {n for n, (_, x) in bf16.items()
                         if x.ndim == 2 and n.endswith(".weight") and not n.endswith(keep)}
    assert "model.layers.5.shared_head.head.weight" in quantized
    assert set(fp8) == set(bf16) | {n.replace(".weight", ".weight_scale") for n in quantized}
    errors = []
    for name, entry in bf16.items():
        if name not in quantized:
            assert fp8[name][0] == entry[0] and np.array_equal(fp8[name][1], entry[1]), name
            continue
        w = f32(entry)
        dtype, scale = fp8[name.replace(".weight", ".weight_scale")]
        assert dtype == "F32" and scale.shape == (w.shape[0], 1)
        deq = f32(fp8[name]) * scale
        # Half a unit in the last place: 2**-4 relative for normals, 2**-10 * scale for subnormals.
        assert (np.abs(deq - w) <= (2.0 ** -4 * np.abs(w) + 2.0 ** -10 * scale) * (1 + 1e-6)).all(), name
        np.testing.assert_allclose(np.abs(deq).max(1), np.abs(w).max(1), rtol=1e-6)  # row max -> 448
        errors.append(np.abs(deq - w).mean() / np.abs(w).mean())
    assert 0.005 < np.mean(errors) < 0.04
    config = json.loads((checkpoint("glm45-tiny", fmt="fp8") / "config.json").read_text())
    q = config["quantization_config"]
    assert (q["quant_method"], q["format"]) == ("compressed-tensors", "float-quantized")
    assert q["config_groups"]["group_0"]["weights"]["strategy"] == "channel"
    assert q["ignore"] == sorted(n.removesuffix(".weight") for n in bf16 if n not in quantized)
