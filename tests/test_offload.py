"""Offloaded experts: the resident model's logits exactly, within a measured budget."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from concurrent.futures import Future

import mlx.core as mx
import numpy as np
import pytest

import glm_mlx
from convert.convert import MANIFEST
from glm_mlx.loading import VERIFIED, expert_bytes, load_model
from glm_mlx.offload import ExpertReadError, OffloadedExperts, offloaded_banks, offloaded_stats, parse_size
from test_convert import ENV, ROOT, cli


def rel_err(a, b) -> float:
    return float(np.linalg.norm(np.asarray(a) - np.asarray(b)) / np.linalg.norm(np.asarray(b)))


class Now:
    """offload's hints thread, made synchronous (each call made at once, its future done)."""

    def submit(self, fn, *args):
        f = Future()
        f.set_result(fn(*args))
        return f


def budget_for(folder, slots: int) -> int:
    m = json.loads((folder / MANIFEST).read_text())
    return slots * max(e["stride"] for e in m["experts"].values()) * len(m["experts"])


def run_all(model, toks):
    """A full forward, then a prefill of 9 and token-by-token decoding, and the MTP head."""
    f32 = lambda a: np.array(a.astype(mx.float32))  # noqa: E731 - numpy has no bf16
    full = f32(model(toks))
    cache = model.make_cache()
    steps = [f32(model(toks[:, :9], cache))] + [f32(model(toks[:, t : t + 1], cache))
                                                for t in range(9, toks.shape[1])]
    hidden = model.model(mx.array(toks))
    mtp = f32(model.mtp[0](hidden[:, :-1], mx.array(toks[:, 1:]), model.model.embed_tokens))
    return full, np.concatenate(steps, axis=1), mtp


@pytest.mark.parametrize("recipe,dtype", [("mixed", "float32"), ("none", "float32"), ("mixed", None),
                                          ("none", None)])
def test_offloaded_logits_equal_the_resident_models_exactly(recipe, dtype, converted, monkeypatch):
    """float32: reads converted into the bank; None (the folder's bf16): reads straight into it."""
    folder = converted("glm45-tiny", recipe)
    resident, _ = load_model(folder, dtype)
    toks = np.random.default_rng(0).integers(0, resident.args.vocab_size, size=(1, 24))
    want = run_all(resident, toks)
    E, k = resident.args.n_routed_experts, resident.args.num_experts_per_tok
    import glm_mlx.offload as offload

    whole = offload.PIECE
    for slots, prefetch, policy, pin in ((1, False, "lfu", True), (2, True, "lru", False), (k, False, "lfu", False),
                                         (k + 1, True, "lfu", True), (E - 1, False, "lru", True)):
        piece = 1000 if slots % 2 else whole  # an expert read whole, or in parallel pieces
        for name, value in (("PREFETCH", prefetch), ("POLICY", policy), ("PIN", pin), ("PIECE", piece)):
            monkeypatch.setattr(offload, name, value)  # exact whatever is read ahead or evicted
        model, _ = load_model(folder, dtype, expert_memory=budget_for(folder, slots))
        banks = offload.offloaded_banks(model)
        assert len(banks) == 3 and {b.slots for b in banks} == {slots}  # two MoE layers and the MTP layer
        assert all((b.views is not None) == (dtype is None) for b in banks)
        got = run_all(model, toks)
        for a, b in zip(got, want):
            np.testing.assert_array_equal(a, b)
        st = offloaded_stats(model)
        assert st.misses > 0 and st.bytes + st.dropped == (st.misses + st.prefetched) * banks[0].file.stride
        assert (st.prefetched > 0) == (prefetch and slots > k)  # room to read ahead only beside a full step
        if (recipe, dtype, piece) == ("none", "float32", whole) and banks[0].file.direct is not None:
            # bf16 experts of 24 KB, whole in one aligned piece, into a page-aligned buffer: past the page cache
            assert all(b.file.pieces["direct"] > 0 for b in banks)
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


@pytest.mark.parametrize("piece", [1000, 2 << 20])  # read in pieces, or whole
def test_a_short_or_corrupt_expert_read_stops_with_a_clear_error(piece, converted, tmp_path, monkeypatch):
    import shutil

    import glm_mlx.offload as offload

    monkeypatch.setattr(offload, "PIECE", piece)
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


def test_an_expert_rotted_on_disk_is_a_one_line_error(converted, tmp_path):
    """Bytes changed where the folder check trusts its stamp (rot on a disk changes no size, mtime, inode or
    ctime: here the stamp is rewritten to match): generate and finetune stop at the first read of that expert
    with the file, layer and expert named."""
    import shutil

    folder = shutil.copytree(converted("glm45-tiny", "mixed"), tmp_path / "m")
    budget = str(budget_for(folder, 1))
    cli("generate", "--model", folder, "--prompt", "hi", "-n", "2", "--expert-memory", budget, check_ok=True)
    entry = json.loads((folder / MANIFEST).read_text())["experts"]["3"]
    path = folder / entry["file"]
    st, data = path.stat(), bytearray(path.read_bytes())
    for e in range(entry["num_experts"]):
        data[entry["data_start"] + e * entry["stride"] + 5] ^= 0x10
    path.write_bytes(bytes(data))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    stamp = json.loads((folder / VERIFIED).read_text())
    st = path.stat()
    stamp[entry["file"]][:5] = [st.st_size, st.st_mtime_ns, st.st_ino, st.st_dev, st.st_ctime_ns]
    (folder / VERIFIED).write_text(json.dumps(stamp))
    p = cli("generate", "--model", folder, "--prompt", "hi", "-n", "2", "--expert-memory", budget)
    ends_in_error(p, "experts.003", "layer 3", "checksum")
    (tmp_path / "d.jsonl").write_text(json.dumps({"text": "hello world " * 4}) + "\n")
    p = cli("finetune", "--model", folder, "--data", tmp_path / "d.jsonl", "--out", tmp_path / "a", "--iters", "1",
            "--expert-memory", budget)
    ends_in_error(p, "experts.003", "layer 3", "checksum")


def ends_in_error(p, *needles: str) -> None:
    """Exit 1, no traceback, and the last line of stderr the error (after the offloading line)."""
    assert p.returncode == 1 and "Traceback" not in p.stderr, p.stderr
    last = p.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and all(n in last for n in needles), last


def test_aligned_reads_bypass_the_page_cache_and_the_rest_do_not(tmp_path, monkeypatch):
    """A piece whose file offset, buffer address and length are aligned is read with O_DIRECT (where
    the filesystem has it); any other through the page cache; the same bytes either way."""
    from concurrent.futures import ThreadPoolExecutor

    from glm_mlx.offload import ALIGN, ExpertFile, aligned_buffer

    data = np.random.default_rng(0).integers(0, 256, ALIGN + 3 * 2 * ALIGN, dtype=np.uint8).tobytes()
    (tmp_path / "experts.bin").write_bytes(data)
    entry = {"file": "experts.bin", "num_experts": 3, "data_start": ALIGN, "stride": 2 * ALIGN,
             "parts": {"gate_proj.weight": {"dtype": "BF16", "shape": [ALIGN], "offset": 0}}}
    f = ExpertFile(tmp_path, 0, entry)
    if f.direct is None:
        pytest.skip("this filesystem has no O_DIRECT")
    want = data[3 * ALIGN: 5 * ALIGN]  # expert 1
    pool = ThreadPoolExecutor(2)
    buf = aligned_buffer(2 * ALIGN)
    f.start_read(pool, 1, [buf]).result()
    assert bytes(buf) == want and f.pieces == {"direct": 1, "buffered": 0}
    odd = memoryview(bytearray(2 * ALIGN + 1))[1:]  # an address off the boundary
    f.start_read(pool, 1, [odd]).result()
    assert bytes(odd) == want and f.pieces == {"direct": 1, "buffered": 1}
    f.start = ALIGN + 1  # an offset off the boundary
    f.start_read(pool, 1, [buf]).result()
    assert bytes(buf) == data[3 * ALIGN + 1: 5 * ALIGN + 1] and f.pieces == {"direct": 1, "buffered": 2}
    # a filesystem that takes O_DIRECT at open but refuses its reads: the piece is read through the page
    # cache, and the file reads so from then on
    import errno

    import glm_mlx.offload as offload

    real, direct = offload.preadv_all, f.direct

    def refusing(fd, views, offset):
        if fd == direct:
            raise OSError(errno.EINVAL, "Invalid argument")
        return real(fd, views, offset)

    monkeypatch.setattr(offload, "preadv_all", refusing)
    f.start, buf = ALIGN, aligned_buffer(2 * ALIGN)
    f.start_read(pool, 2, [buf]).result()
    assert bytes(buf) == data[5 * ALIGN: 7 * ALIGN] and f.direct is None and f.pieces["buffered"] == 3


def test_expert_files_start_their_data_aligned(converted):
    """The converter pads an experts file's header so its bytes start at offload.ALIGN: reads can be direct."""
    from glm_mlx.offload import ALIGN

    m = json.loads((converted("glm45-tiny", "none") / MANIFEST).read_text())
    assert m["experts"] and all(e["data_start"] % ALIGN == 0 for e in m["experts"].values())


def test_frequency_with_aging_beats_lru_on_skewed_routing():
    """The default eviction (LFU, aged) against LRU on offload_bench's skewed traces, replayed through the
    bank's own bookkeeping (scripts/policy_sim.py): more hits at 25% and 10% budgets, three seeds; and no
    policy beats the optimum (Belady's) on any trace."""
    from test_bench import _script

    sim = _script("policy_sim")  # (scripts/ on the path while it imports offload_bench)
    from glm_mlx.offload import PIN, POLICY

    assert (POLICY, PIN) == sim.POLICIES["lfu"]  # the default is the policy tested
    for seed in (1, 2, 3):
        tr = sim.trace("skewed", 120, 4, 128, 8, seed)
        for slots, by in ((32, 0.001), (12, 0.01)):  # (seeds 1-10 measured 0.3-1.3 and 1.9-2.7 points)
            lru, lfu = (sim.hit_rate(tr, slots, 128, *sim.POLICIES[p], warm=20) for p in ("lru", "lfu"))
            assert lfu > lru + by, (seed, slots, lfu, lru)
    for kind in ("skewed", "drifting", "uniform"):
        tr = sim.trace(kind, 60, 2, 128, 8, 4)
        for slots in (64, 12):
            best = sim.optimum(tr, slots, 128, warm=10)
            assert all(sim.hit_rate(tr, slots, 128, *pp, warm=10) <= best for pp in sim.POLICIES.values())


def test_a_prefetch_never_evicts_the_last_steps_experts():
    """Slots.admit for a prefetch's guesses (spare_recent), pin off as by default: only slots the previous
    step did not use are taken, as many as there are; a step's own admission may take any unprotected one."""
    from glm_mlx.offload import Slots

    t = Slots(4, 16, "lfu", pin=False)
    for needed in (np.array([0, 1]), np.array([2, 3])):  # four slots filled; the last step used 2 and 3
        t.use(needed)
        t.admit(needed)
        t.remember(needed)
    got = t.admit(np.array([5, 6, 7]), spare_recent=True)
    assert [e for e, _ in got] == [5, 6] and set(t.expert_in) == {2, 3, 5, 6}  # 0 and 1 gave way, then none
    t.use(np.array([8]))
    assert t.admit(np.array([8])) and 8 in t.expert_in  # a step's own miss: the coldest, whichever it is


def test_a_held_slot_is_never_taken_until_freed():
    """A slot an abandoned read still writes into (Slots.free held=True) holds no expert and is neither
    free nor evictable; freed again, it is the first taken."""
    from glm_mlx.offload import Slots

    t = Slots(3, 8)
    t.use(np.array([0, 1, 2]))
    t.admit(np.array([0, 1, 2]))
    t.free(t.slot_of[1], held=True)
    assert t.slot_of[1] == -1 and t.usable == 2
    for e in (3, 4, 5):  # misses one at a time: only the two other slots go round
        t.use(np.array([e]))
        t.admit(np.array([e]))
    assert set(t.expert_in) == {-2, 4, 5}
    held = int(np.flatnonzero(t.expert_in == -2)[0])
    t.free(held)
    t.use(np.array([6]))
    assert t.admit(np.array([6])) == [(6, held)] and t.usable == 3


def test_crc32_of_pieces_combines_to_the_whole():
    import zlib

    from glm_mlx.offload import crc32_combine, split

    rng = np.random.default_rng(3)
    data = rng.integers(0, 256, 100_003, dtype=np.uint8).tobytes()
    views = [memoryview(bytearray(data[:40_000])), memoryview(bytearray(data[40_000:]))]
    for size in (1, 7, 4096, 39_999, 40_000, 100_003, 1 << 20):
        pieces = split(views, size)
        assert [len(bytes(b"".join(p))) for p in pieces][:-1] == [size] * (len(pieces) - 1)
        assert b"".join(b"".join(p) for p in pieces) == data
        if size < 100:
            continue
        crc = 0
        for p in pieces:
            blob = b"".join(p)
            crc = crc32_combine(crc, zlib.crc32(blob), len(blob))
        assert crc == zlib.crc32(data)


def test_parse_size(monkeypatch):
    import glm_mlx.offload as offload

    assert parse_size("24GB", 10**12) == 24 * 10**9
    assert parse_size("512MiB", 10**12) == 512 * 2**20
    assert parse_size(None, 1) is None
    with pytest.raises(ValueError, match="expert-memory"):
        parse_size("lots", 1)
    # auto: what MLX may use, less the resident weights and the reserve; None when all experts fit
    monkeypatch.setattr(offload, "machine_memory", lambda: 64 * 10**9)
    want = 64 * 10**9 - 10 * 10**9 - offload.AUTO_RESERVE
    assert parse_size("auto", 200 * 10**9, resident=10 * 10**9, smallest=10**9) == want
    assert parse_size("auto", want, resident=10 * 10**9) is None
    with pytest.raises(ValueError, match="less than one expert per layer"):
        parse_size("auto", 200 * 10**9, resident=62 * 10**9, smallest=10**9)


MEASURE = """
import json, sys
import mlx.core as mx, numpy as np
from glm_mlx.loading import load_model
def hwm():
    return int([l for l in open('/proc/self/status') if l.startswith('VmHWM')][0].split()[1]) * 1024
folder, budget, dtype = sys.argv[1], int(sys.argv[2]), sys.argv[3] if len(sys.argv) > 3 else None
base = hwm()
model, _ = load_model(folder, dtype, expert_memory=budget)
toks = np.random.default_rng(0).integers(0, model.args.vocab_size, size=(1, 64))
cache = model.make_cache()
mx.eval(model(toks, cache))
for t in range(16):
    mx.eval(model(toks[:, t:t + 1], cache))
print(json.dumps({"mlx_peak": mx.get_peak_memory(), "rss_peak": hwm() - base,
                  "kv": sum(c.keys.nbytes + c.values.nbytes for c in cache)}))
"""
MARGIN = 24 * 2**20  # activations and read buffers at these sizes, stated


@pytest.mark.parametrize("dtype", [None, "float32"])  # reads straight into the bank; reads converted
def test_memory_stays_within_the_budget(dtype, tmp_path):
    """Experts five times the budget: MLX's peak and the process's RSS growth stay
    within budget + non-expert weights + KV cache + MARGIN."""
    from convert.convert import convert
    from convert.synthetic import make_config, write_checkpoint

    cfg = make_config("air-tiny", hidden_size=256, moe_intermediate_size=256, n_routed_experts=64,
                      num_hidden_layers=4, intermediate_size=512)
    folder = convert(write_checkpoint(tmp_path / "src", cfg, num_shards=3), tmp_path / "m", "mixed")
    manifest = json.loads((folder / MANIFEST).read_text())
    experts = expert_bytes(manifest)
    non_expert = sum(r["size"] for f, r in manifest["files"].items() if f.startswith("weights/")
                     and "experts." not in f) * (4 if dtype else 1)  # float32: 8-bit weights widen 4x at most
    budget = experts // 5
    argv = [sys.executable, "-c", MEASURE, str(folder), str(budget)] + ([dtype] if dtype else [])
    p = subprocess.run(argv, capture_output=True, text=True,
                       env=ENV, cwd=ROOT, timeout=600)
    assert p.returncode == 0, p.stderr
    m = json.loads(p.stdout)
    limit = budget + non_expert + m["kv"] + MARGIN
    print(f"experts {experts / 2**20:.1f} MiB, budget {budget / 2**20:.1f} MiB, MLX peak {m['mlx_peak'] / 2**20:.1f} "
          f"MiB, RSS growth {m['rss_peak'] / 2**20:.1f} MiB, limit {limit / 2**20:.1f} MiB")
    assert m["mlx_peak"] < limit and m["rss_peak"] < limit


def test_generate_with_expert_memory_and_adapters_on_the_experts(converted, tmp_path):
    folder = converted("glm45-tiny", "mixed")
    p = cli("generate", "--model", folder, "--prompt", "hi", "-n", "6", "--temp", "0",
            "--expert-memory", str(budget_for(folder, 2)), check_ok=True)
    assert "experts:" in p.stderr and "hits" in p.stderr
    resident = cli("generate", "--model", folder, "--prompt", "hi", "-n", "6", "--temp", "0", check_ok=True)
    assert p.stdout == resident.stdout
    ahead = cli("generate", "--model", folder, "--prompt", "hi", "-n", "6", "--temp", "0", "--prefetch",
                "--expert-memory", str(budget_for(folder, 5)), check_ok=True)  # room beside a step's 4 to guess
    assert ahead.stdout == resident.stdout and " prefetched used" in ahead.stderr
    banks = offloaded_banks(glm_mlx.load(folder, expert_memory=budget_for(folder, 5), prefetch=True)[0])
    assert [b.next is not None for b in banks] == [True, False, False]  # the trunk's first layer guesses the second's
    from glm_mlx.lora import apply_lora, base_info, lora_modules, save_adapter

    model, manifest = load_model(folder, "float32")
    apply_lora(model, targets={"experts", "attention"}, rank=2, alpha=4.0)
    rng = np.random.default_rng(5)
    for _, layer in lora_modules(model):  # a trained-looking adapter: B is zero at initialisation
        layer.lora_b = mx.array(rng.standard_normal(layer.lora_b.shape, dtype=np.float32) * 0.5)
    save_adapter(tmp_path / "a", model, {"base": base_info(manifest, folder), "targets": ["experts", "attention"],
                                         "rank": 2, "alpha": 4.0, "dropout": 0.0})
    toks = np.random.default_rng(6).integers(0, model.args.vocab_size, size=(1, 16))
    plain = np.array(load_model(folder, "float32")[0](toks))
    want = run_all(glm_mlx.load(folder, dtype="float32", adapter=tmp_path / "a")[0], toks)
    assert rel_err(want[0], plain) > 1e-2  # the adapter changes the logits
    for slots in (2, 5):  # the experts' factors follow each row's expert, whichever slot holds it
        got = run_all(glm_mlx.load(folder, dtype="float32", adapter=tmp_path / "a",
                                   expert_memory=budget_for(folder, slots))[0], toks)
        for a, b in zip(got, want):
            assert rel_err(a, b) < 1e-5


TRAIN = """
import json, sys
import mlx.core as mx
from glm_mlx.data import Dataset, Example
from glm_mlx.finetune import TrainConfig, Trainer
from glm_mlx.loading import load_model
def hwm():
    return int([l for l in open('/proc/self/status') if l.startswith('VmHWM')][0].split()[1]) * 1024
folder, budget, out = sys.argv[1], int(sys.argv[2]) or None, sys.argv[3]
base = hwm()
model, manifest = load_model(folder, "float32", expert_memory=budget)
ds = Dataset([Example([1 + i % 200 for i in range(96)], [True] * 96)] * 2, 0, 0)
cfg = TrainConfig(rank=4, iters=2, batch_size=2, max_seq_len=128)
losses = [r["loss"] for r in Trainer(model, ds, cfg, out, base_manifest=manifest, base_dir=folder,
                                     log=lambda s: None).run()]
print(json.dumps({"mlx_peak": mx.get_peak_memory(), "rss_peak": hwm() - base, "losses": losses}))
"""


def test_training_memory_leaves_the_offloaded_experts_out(tmp_path):
    """QLoRA with the experts offloaded to a fifth of their bytes: MLX's peak and the process's RSS
    growth are the resident run's less the experts' memory beyond the budget (MARGIN aside), and the
    losses are the same."""
    from convert.convert import convert
    from convert.synthetic import make_config, write_checkpoint

    cfg = make_config("air-tiny", hidden_size=256, moe_intermediate_size=512, n_routed_experts=128,
                      num_hidden_layers=4, intermediate_size=512)
    folder = convert(write_checkpoint(tmp_path / "src", cfg, num_shards=3), tmp_path / "m", "mixed")
    manifest = json.loads((folder / MANIFEST).read_text())
    experts = expert_bytes(manifest)
    runs = {}
    for budget in (0, experts // 5):
        p = subprocess.run([sys.executable, "-c", TRAIN, str(folder), str(budget), str(tmp_path / f"a{budget}")],
                           capture_output=True, text=True, env=ENV, cwd=ROOT, timeout=600)
        assert p.returncode == 0, p.stderr
        runs[budget] = json.loads(p.stdout)
    resident, offloaded = runs[0], runs[experts // 5]
    saved = (experts - experts // 5) * 1.2  # float32 widens the experts' bf16 scales and biases: 1.1x to 1.2x
    print(f"experts {experts / 2**20:.1f} MiB; MLX peak {resident['mlx_peak'] / 2**20:.1f} -> "
          f"{offloaded['mlx_peak'] / 2**20:.1f} MiB, RSS growth {resident['rss_peak'] / 2**20:.1f} -> "
          f"{offloaded['rss_peak'] / 2**20:.1f} MiB")
    for key in ("mlx_peak", "rss_peak"):
        assert offloaded[key] < resident[key] - experts * 0.8 + MARGIN  # at least the experts beyond the budget
        assert offloaded[key] > resident[key] - saved - MARGIN  # and no more than they weigh: measured right
    np.testing.assert_allclose(offloaded["losses"], resident["losses"], rtol=1e-5)


def test_a_grouped_step_starts_with_the_experts_already_in_the_bank(converted):
    """The same grouped step twice (a training step's recomputation, its backward pass): the second
    reads only what did not stay in the bank, and computes the same."""
    folder = converted("glm45-tiny", "mixed")
    model, _ = load_model(folder, "float32", expert_memory=budget_for(folder, 3))
    bank = offloaded_banks(model)[0]
    rng = np.random.default_rng(2)
    x = mx.array(rng.standard_normal((1, 30, model.args.hidden_size), dtype=np.float32))
    inds = mx.array(np.stack([rng.permutation(16)[:4] for _ in range(30)])[None])
    first = np.array(bank(x, inds))
    before = bank.stats.misses
    second = np.array(bank(x, inds))
    needed = np.unique(np.array(inds)).size
    assert needed > 2 * bank.slots and bank.stats.misses - before == needed - bank.slots
    np.testing.assert_array_equal(first, second)


@pytest.mark.parametrize("hints", ["piece", "expert", "copy"])
def test_reads_into_the_bank_are_sent_to_the_card_once_read(hints, converted, monkeypatch):
    """With HINTS on CUDA, what is read into a slot is sent to the card once read (glm_mlx.uvm; a no-op here,
    so recorded): each piece by its reading thread ("piece"), or each expert once checked ("expert"), or
    each expert read into page-locked memory and copied into its slot ("copy"); the file's bytes in it by
    then; the logits still the resident model's; a copy that fails is a clear error."""
    from glm_mlx import uvm
    from glm_mlx.offload import _Spans, aligned_buffer

    assert not uvm.available() and uvm.after_write([memoryview(bytearray(8))]) == 0  # off CUDA: no hints, no-ops
    assert uvm.pinned(4096) is None and uvm.copy_to_card([], memoryview(bytearray(8))) != 0 and uvm.copies_done() == 0
    folder = converted("glm45-tiny", "mixed")
    resident, _ = load_model(folder)
    toks = np.random.default_rng(0).integers(0, resident.args.vocab_size, size=(1, 16))
    want = run_all(resident, toks)
    calls = []
    monkeypatch.setattr(glm_mlx.offload, "HINTS", hints)

    # the hints' own thread, made synchronous: the bytes recorded are the read's, not a later one's
    monkeypatch.setattr(glm_mlx.offload, "_hinting", Now())
    monkeypatch.setattr(uvm, "available", lambda a=None: True)
    monkeypatch.setattr(uvm, "after_write", lambda views: calls.append(("after", [bytes(v) for v in views])))

    def copy(views, src):
        at = 0
        for v in views:
            v[:] = src[at: at + v.nbytes]
            at += v.nbytes
        calls.append(("copy", [bytes(v) for v in views]))
        return 0

    monkeypatch.setattr(uvm, "pinned", aligned_buffer)
    monkeypatch.setattr(uvm, "copy_to_card", copy)
    monkeypatch.setattr(glm_mlx.offload, "_spans", _Spans(1))  # fewer than a step's misses: some take the hints
    model, _ = load_model(folder, expert_memory=budget_for(folder, 2))
    banks = offloaded_banks(model)
    assert all(b.hints and b.views is not None for b in banks)
    for a, b in zip(run_all(model, toks), want):
        np.testing.assert_array_equal(a, b)
    st = offloaded_stats(model)
    afters = [c[1] for c in calls]
    assert len(afters) >= st.misses > 0 and st.bytes == sum(len(b) for bs in afters for b in bs)
    experts = [b.file.path.read_bytes()[b.file.start + e * b.file.stride:][: b.file.stride]
               for b in banks for e in range(b.slot_of.size)]
    assert all(any(b"".join(bs) in x for x in experts) for bs in afters)  # each piece holds the file's bytes
    if hints == "expert":  # one hint an expert, for its whole slot
        assert len(afters) == st.misses and all(len(b"".join(bs)) == banks[0].file.stride for bs in afters)
    if hints == "copy":  # each expert copied whole, or (no span free) read into its slot and hinted whole
        assert {c[0] for c in calls} == {"copy", "after"} and len(afters) == st.misses
        assert all(len(b"".join(bs)) == banks[0].file.stride for bs in afters)
        spans = glm_mlx.offload._spans
        assert spans.made == 1 and len(spans.free[banks[0].file.stride]) == 1  # the span given back
        monkeypatch.setattr(uvm, "copy_to_card", lambda views, src: 700)
        model, _ = load_model(folder, expert_memory=budget_for(folder, 2))
        with pytest.raises(ExpertReadError, match="to the card failed .CUDA error 700"):
            model(toks)
        calls.clear()  # a step that reads more experts than COPY_MISSES takes the hints, every expert of it
        monkeypatch.setattr(glm_mlx.offload, "COPY_MISSES", 0)
        model, _ = load_model(folder, expert_memory=budget_for(folder, 2))
        for a, b in zip(run_all(model, toks), want):
            np.testing.assert_array_equal(a, b)
        assert calls and {c[0] for c in calls} == {"after"}
    monkeypatch.setattr(glm_mlx.offload, "HINTS", False)
    calls.clear()
    model, _ = load_model(folder, expert_memory=budget_for(folder, 2))
    run_all(model, toks)
    assert not calls and not any(b.hints for b in offloaded_banks(model))


@pytest.mark.parametrize("slow", [False, True])
def test_no_hint_moves_a_slot_while_a_read_writes_it(converted, monkeypatch, slow):
    """CUDA's hint (the bulk move of a slot's pages to the card) never comes while a read is writing that slot,
    and a read into a slot waits for the hints asked for before it (the hints' thread and stream settled):
    here with prefetches whose wrong guesses were read whole before this step's misses took their slots (an
    offload_bench run on the GPU failed a checksum there). `slow`: reads that take a while, so that wrong
    guesses are abandoned with pieces under way: not waited for, their slots held (never read into, never
    computed on) until those stop. The hints are recorded (no-ops off CUDA); the logits stay exact."""
    import time

    import glm_mlx.offload as offload
    from glm_mlx import uvm

    folder = converted("glm45-tiny", "mixed")
    resident, _ = load_model(folder)
    toks = np.random.default_rng(1).integers(0, resident.args.vocab_size, size=(1, 24))
    want = run_all(resident, toks)
    events = []
    key = lambda views: offload._address(views[0])  # noqa: E731 - a slot, by its first byte
    monkeypatch.setattr(offload, "PREFETCH", True)
    monkeypatch.setattr(offload, "_hinting", Now())  # the hints' thread, made synchronous
    monkeypatch.setattr(uvm, "available", lambda a=None: True)
    monkeypatch.setattr(uvm, "after_write", lambda views: events.append(("hint", key(views))) or 0)
    monkeypatch.setattr(uvm, "copies_done", lambda: events.append(("settled", None)) or 0)
    if slow:  # seven pieces an expert, each a while, one at a time: a wrong guess's pieces still queued
        monkeypatch.setattr(offload, "PIECE", 1024)
        monkeypatch.setattr(offload, "WORKERS", 1)
        read_piece = offload.ExpertFile.read_piece
        monkeypatch.setattr(offload.ExpertFile, "read_piece", lambda *a: time.sleep(0.002) or read_piece(*a))
    start = OffloadedExperts._start

    def recorded(self, e, slot, *rest):
        assert all(r[1] != slot for r in self.stopping), "a read into a slot an abandoned read still writes"
        r = start(self, e, slot, *rest)
        k, read = key(self.views[slot]), r[2]
        events.append(("read", k))
        result = read.result
        read.result = lambda: (result(), events.append(("got", k)))[0]
        return r

    release = OffloadedExperts._release

    def released(self, wait=False):  # an abandoned read's slot freed: its pieces have stopped writing
        before = list(self.stopping)
        release(self, wait)
        events.extend(("got", key(self.views[r[1]])) for r in before if r not in self.stopping)

    monkeypatch.setattr(OffloadedExperts, "_start", recorded)
    monkeypatch.setattr(OffloadedExperts, "_release", released)
    k = resident.args.num_experts_per_tok
    model, _ = load_model(folder, expert_memory=budget_for(folder, 2 * k))  # room to read ahead
    for a, b in zip(run_all(model, toks), want):
        np.testing.assert_array_equal(a, b)
    st = offloaded_stats(model)
    assert st.prefetched > st.prefetch_used > 0  # some guesses right, some wrong
    if slow:  # some wrong guesses dropped unread: counted apart from what was read
        stride = offloaded_banks(model)[0].file.stride
        assert st.dropped > 0 and st.bytes + st.dropped == (st.misses + st.prefetched) * stride
    reading, hinted = {}, set()  # reads under way into each slot; slots hinted since the hints settled
    for what, k in events:
        if what == "hint":
            assert not reading.get(k), "a hint moved a slot while a read was writing it"
            hinted.add(k)
        elif what == "settled":
            hinted.clear()
        elif what == "read":
            assert k not in hinted, "a read wrote into a slot a hint may still be moving"
            reading[k] = reading.get(k, 0) + 1
        else:
            reading[k] -= 1
    assert ("settled", None) in events


def test_offload_bench_guesses_and_bursts(tmp_path, monkeypatch):
    """offload_bench's prediction of a trace is right at about the accuracy asked; its wrong guesses are any expert
    alike, or (near) only experts the layer itself chooses in the trace; the disk measured in bursts reads every
    byte of the experts asked for."""
    from test_bench import _script

    ob = _script("offload_bench")
    tr = ob.trace("skewed", 40, 3, 128, 8, seed=1)  # (each layer chooses about half the experts in 40 tokens)
    freq = [np.bincount(tr[:, layer].ravel(), minlength=128) for layer in range(3)]
    drawn = {}
    for near in (False, True):
        g = ob.guess(tr, 0.75, 128, seed=2, near=near)
        assert 0.70 < (g == tr).mean() < 0.80
        _, layers, _ = np.nonzero(g != tr)
        drawn[near] = np.array([freq[layer][e] for layer, e in zip(layers, g[g != tr])])
    assert (drawn[True] > 0).all() and (drawn[False] == 0).mean() > 0.3  # near: only experts the layer chooses
    assert drawn[True].mean() > 3 * drawn[False].mean()  # and as often as it chooses them
    f = tmp_path / "experts.bin"
    f.write_bytes(os.urandom(4096 + 6 * 3000))
    entry = {"file": f.name, "stride": 3000, "data_start": 4096}
    calls, real = [], os.pread
    monkeypatch.setattr(os, "pread", lambda fd, n, at: calls.append((n, at)) or real(fd, n, at))
    assert ob.disk_bandwidth(tmp_path, entry, piece=1024, workers=2, experts=6, burst=4) > 0
    assert sorted(calls) == sorted((min(1024, 3000 - o), 4096 + e * 3000 + o) for e in range(6)
                                   for o in range(0, 3000, 1024))


def test_stats_line_over_nothing_shows_dashes():
    from glm_mlx.offload import Stats

    line = Stats().line()
    assert "- hits" in line and "at - GB/s" in line, line
    s = Stats(hits=0, misses=4, bytes=4 * 10**9, seconds=2.0)
    assert s.hit_rate == 0.0 and s.gbps == 2.0 and "0.0% hits" in s.line() and "at 2.00 GB/s" in s.line()
    assert "at - GB/s" in Stats(misses=1, bytes=10**6, seconds=0.0).line()  # a read of no measured time
