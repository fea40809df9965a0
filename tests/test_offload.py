"""Offloaded experts: the resident model's logits exactly, within a measured budget."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import mlx.core as mx
import numpy as np
import pytest

import glm_mlx
from convert.convert import MANIFEST
from glm_mlx.loading import load_model
from glm_mlx.offload import ExpertReadError, OffloadedExperts, offloaded_stats, parse_size
from test_convert import ENV, ROOT, cli


def budget_for(folder, slots: int) -> int:
    m = json.loads((folder / MANIFEST).read_text())
    return slots * max(e["stride"] for e in m["experts"].values()) * len(m["experts"])


def run_all(model, toks):
    """A full forward, then a prefill of 9 and token-by-token decoding, and the MTP head."""
    full = np.array(model(toks))
    cache = model.make_cache()
    steps = [np.array(model(toks[:, :9], cache))] + [np.array(model(toks[:, t : t + 1], cache))
                                                      for t in range(9, toks.shape[1])]
    hidden = model.model(mx.array(toks))
    mtp = np.array(model.mtp[0](hidden[:, :-1], mx.array(toks[:, 1:]), model.model.embed_tokens))
    return full, np.concatenate(steps, axis=1), mtp


@pytest.mark.parametrize("recipe", ["mixed", "none"])
def test_offloaded_logits_equal_the_resident_models_exactly(recipe, converted, monkeypatch):
    folder = converted("glm45-tiny", recipe)
    resident, _ = load_model(folder, "float32")
    toks = np.random.default_rng(0).integers(0, resident.args.vocab_size, size=(1, 24))
    want = run_all(resident, toks)
    E, k = resident.args.n_routed_experts, resident.args.num_experts_per_tok
    import glm_mlx.offload as offload

    for slots, prefetch in ((1, False), (2, True), (k, False), (k + 1, True), (E - 1, False)):
        monkeypatch.setattr(offload, "PREFETCH", prefetch)  # exact with and without reading ahead
        model, _ = load_model(folder, "float32", expert_memory=budget_for(folder, slots))
        banks = [m for _, m in model.named_modules() if isinstance(m, OffloadedExperts)]
        assert len(banks) == 3 and {b.slots for b in banks} == {slots}  # two MoE layers and the MTP layer
        got = run_all(model, toks)
        for a, b in zip(got, want):
            np.testing.assert_array_equal(a, b)
        st = offloaded_stats(model)
        assert st.misses > 0 and st.bytes == st.misses * banks[0].file.stride
    # a budget that holds every expert keeps them resident
    model, _ = load_model(folder, "float32", expert_memory=budget_for(folder, E))
    assert offloaded_stats(model) is None


def test_each_expert_is_read_at_most_once_per_prefill_chunk(converted):
    folder = converted("glm45-tiny", "mixed")
    model, _ = load_model(folder, "float32", expert_memory=budget_for(folder, 2))
    toks = np.random.default_rng(1).integers(0, model.args.vocab_size, size=(1, 40))
    model(toks)  # one chunk: 40 rows x 4 experts each, over 16 experts, through 2 slots
    for _, bank in model.named_modules():
        if isinstance(bank, OffloadedExperts) and bank.stats.misses:
            assert bank.stats.misses <= bank.slot_of.size  # at most one read per expert


def test_a_short_or_corrupt_expert_read_stops_with_a_clear_error(converted, tmp_path):
    import shutil

    folder = shutil.copytree(converted("glm45-tiny", "mixed"), tmp_path / "m")
    toks = np.random.default_rng(2).integers(0, 400, size=(1, 8))
    model, _ = load_model(folder, "float32", expert_memory=budget_for(folder, 1))
    entry = json.loads((folder / MANIFEST).read_text())["experts"]["3"]
    path = folder / entry["file"]
    data = bytearray(path.read_bytes())  # damaged after loading, as a disk could
    for e in range(entry["num_experts"]):
        data[entry["data_start"] + e * entry["stride"] + 17] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(ExpertReadError, match="checksum"):
        model(toks)
    model, _ = load_model(converted("glm45-tiny", "mixed"), "float32", expert_memory=budget_for(folder, 1))
    for bank in (m for _, m in model.named_modules() if isinstance(m, OffloadedExperts)):
        object.__setattr__(bank.file, "stride", bank.file.stride + os.path.getsize(bank.file.path))
    with pytest.raises(ExpertReadError, match="read .* bytes"):
        model(toks)


def test_parse_size():
    assert parse_size("24GB", 10**12) == 24 * 10**9
    assert parse_size("512MiB", 10**12) == 512 * 2**20
    assert parse_size(None, 1) is None
    with pytest.raises(ValueError, match="expert-memory"):
        parse_size("lots", 1)


MEASURE = """
import json, sys
import mlx.core as mx, numpy as np
from glm_mlx.loading import load_model
def hwm():
    return int([l for l in open('/proc/self/status') if l.startswith('VmHWM')][0].split()[1]) * 1024
folder, budget = sys.argv[1], int(sys.argv[2])
base = hwm()
model, _ = load_model(folder, 'float32', expert_memory=budget)
toks = np.random.default_rng(0).integers(0, model.args.vocab_size, size=(1, 64))
cache = model.make_cache()
mx.eval(model(toks, cache))
for t in range(16):
    mx.eval(model(toks[:, t:t + 1], cache))
print(json.dumps({"mlx_peak": mx.get_peak_memory(), "rss_peak": hwm() - base,
                  "kv": sum(c.keys.nbytes + c.values.nbytes for c in cache)}))
"""
MARGIN = 24 * 2**20  # activations and read buffers at these sizes, stated


def test_memory_stays_within_the_budget(tmp_path):
    """Experts five times the budget: MLX's peak and the process's RSS growth stay
    within budget + non-expert weights + KV cache + MARGIN."""
    from convert.convert import convert
    from convert.synthetic import make_config, write_checkpoint

    cfg = make_config("air-tiny", hidden_size=256, moe_intermediate_size=256, n_routed_experts=64,
                      num_hidden_layers=4, intermediate_size=512)
    folder = convert(write_checkpoint(tmp_path / "src", cfg, num_shards=3), tmp_path / "m", "mixed")
    manifest = json.loads((folder / MANIFEST).read_text())
    experts = sum(e["stride"] * e["num_experts"] for e in manifest["experts"].values())
    non_expert = sum(r["size"] for f, r in manifest["files"].items() if f.startswith("weights/")
                     and "experts." not in f) * 4  # float32 compute: 8-bit weights widen to at most 4x
    budget = experts // 5
    p = subprocess.run([sys.executable, "-c", MEASURE, str(folder), str(budget)], capture_output=True, text=True,
                       env=ENV, cwd=ROOT, timeout=600)
    assert p.returncode == 0, p.stderr
    m = json.loads(p.stdout)
    limit = budget + non_expert + m["kv"] + MARGIN
    print(f"experts {experts / 2**20:.1f} MiB, budget {budget / 2**20:.1f} MiB, MLX peak {m['mlx_peak'] / 2**20:.1f} "
          f"MiB, RSS growth {m['rss_peak'] / 2**20:.1f} MiB, limit {limit / 2**20:.1f} MiB")
    assert m["mlx_peak"] < limit and m["rss_peak"] < limit


def test_generate_with_expert_memory_and_adapters(converted, tmp_path):
    folder = converted("glm45-tiny", "mixed")
    p = cli("generate", "--model", folder, "--prompt", "hi", "-n", "6", "--temp", "0",
            "--expert-memory", str(budget_for(folder, 2)), check_ok=True)
    assert "experts:" in p.stderr and "hits" in p.stderr
    resident = cli("generate", "--model", folder, "--prompt", "hi", "-n", "6", "--temp", "0", check_ok=True)
    assert p.stdout == resident.stdout
    from glm_mlx.lora import apply_lora, save_adapter

    model, manifest = load_model(folder, "float32")
    apply_lora(model, targets={"experts"}, rank=2, alpha=4.0)
    from glm_mlx.lora import base_info

    save_adapter(tmp_path / "a", model, {"base": base_info(manifest, folder), "targets": ["experts"], "rank": 2,
                                         "alpha": 4.0, "dropout": 0.0})
    with pytest.raises(ValueError, match="cannot be offloaded yet"):
        glm_mlx.load(folder, adapter=tmp_path / "a", expert_memory=budget_for(folder, 2))
