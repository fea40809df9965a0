"""The converter: bad input, interruption, memory, and the folder it writes."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

import glm_mlx
from convert.convert import MANIFEST, PROGRESS
from convert.synthetic import make_config, write_checkpoint
from glm_mlx.loading import ModelFolderError

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(ROOT)}


def cli(*args, check_ok=False) -> subprocess.CompletedProcess:
    p = subprocess.run([sys.executable, "-m", "glm_mlx.cli", *map(str, args)], capture_output=True,
                       text=True, env=ENV, cwd=ROOT, timeout=600)
    if check_ok:
        assert p.returncode == 0, p.stderr
    return p


def one_line_error(p: subprocess.CompletedProcess, *needles: str) -> None:
    assert p.returncode != 0
    lines = p.stderr.strip().splitlines()
    assert "Traceback" not in p.stderr
    assert len(lines) == 1 and lines[0].startswith("error: "), p.stderr
    for n in needles:
        assert n in lines[0], lines[0]


@pytest.fixture
def source(tmp_path, checkpoint) -> Path:
    """A private copy of the air-tiny checkpoint, to break."""
    return Path(shutil.copytree(checkpoint("air-tiny"), tmp_path / "src"))


def _truncate(src: Path):
    shard = src / "model-00002-of-00002.safetensors"
    with open(shard, "r+b") as f:
        f.truncate(shard.stat().st_size - 100)
    return shard.name, "truncated"


def _corrupt_header(src: Path):
    shard = src / "model-00001-of-00002.safetensors"
    with open(shard, "r+b") as f:
        f.seek(8)
        f.write(b"\x00garbage{")
    return shard.name, "corrupt header"


def _missing_shard(src: Path):
    (src / "model-00002-of-00002.safetensors").unlink()
    return "model-00002-of-00002.safetensors", "missing shard"


def _other_model(src: Path):
    cfg = json.loads((src / "config.json").read_text())
    cfg["model_type"] = "llama"
    (src / "config.json").write_text(json.dumps(cfg))
    return "config.json", "'llama' is not a GLM-4.5 model"


def _index_outside(src: Path):
    idx = json.loads((src / "model.safetensors.index.json").read_text())
    name = next(iter(idx["weight_map"]))
    idx["weight_map"][name] = "../elsewhere.safetensors"
    (src / "model.safetensors.index.json").write_text(json.dumps(idx))
    return "model.safetensors.index.json", "outside the folder"


@pytest.mark.parametrize("breakage", [_truncate, _corrupt_header, _missing_shard, _other_model, _index_outside])
def test_bad_source_fails_in_one_line_and_leaves_no_loadable_folder(breakage, source, tmp_path):
    where, cause = breakage(source)
    out = tmp_path / "out"
    p = cli("convert", source, "--out", out)
    one_line_error(p, where, cause)
    with pytest.raises(ModelFolderError):
        glm_mlx.load(out)


def test_token_id_past_the_vocabulary_fails_in_one_line(converted):
    folder = converted("air-tiny", "none")
    V = json.loads((folder / "config.json").read_text())["vocab_size"]
    one_line_error(cli("generate", "--model", folder, "--token-ids", f"1,2,{V}"), f"token id {V}", "vocabulary")


def test_loading_refuses_incomplete_or_corrupt_folders(converted, tmp_path):
    good = converted("air-tiny", "mixed")
    cases = {}
    for name, damage, message in [
        ("no-manifest", lambda d: (d / MANIFEST).unlink(), "no glm_mlx.json"),
        ("short", lambda d: _chop(d / "weights/layer.001.safetensors"), "size"),
        ("flipped", lambda d: _flip(d / "weights/experts.002.safetensors"), "checksum"),
        ("gone", lambda d: (d / "tokenizer.json").unlink(), "missing"),
    ]:
        d = Path(shutil.copytree(good, tmp_path / name))
        damage(d)
        cases[name] = (d, message)
    for name, (d, message) in cases.items():
        with pytest.raises(ModelFolderError, match=message):
            glm_mlx.load(d)
        one_line_error(cli("generate", "--model", d, "--prompt", "hi", "-n", "2"), message)


def _chop(p: Path):
    with open(p, "r+b") as f:
        f.truncate(p.stat().st_size - 1)


def _flip(p: Path):
    with open(p, "r+b") as f:
        f.seek(p.stat().st_size // 2)
        b = f.read(1)
        f.seek(-1, 1)
        f.write(bytes([b[0] ^ 0xFF]))


def test_verified_stamp_does_not_hide_a_later_change(converted, tmp_path):
    d = Path(shutil.copytree(converted("air-tiny", "mixed"), tmp_path / "m"))
    glm_mlx.load(d)  # verifies, leaves a stamp
    _flip(d / "weights/main.safetensors")
    with pytest.raises(ModelFolderError, match="checksum"):
        glm_mlx.load(d)


KILLER = textwrap.dedent("""
    import os, signal, sys
    from convert import safetensors_io
    from convert.convert import convert
    calls = [0]
    real = safetensors_io.SafetensorsWriter.write
    def write(self, name, arr):
        calls[0] += 1
        if calls[0] == int(sys.argv[3]):
            os.kill(os.getpid(), signal.SIGKILL)  # as abrupt as a power cut
        return real(self, name, arr)
    safetensors_io.SafetensorsWriter.write = write
    convert(sys.argv[1], sys.argv[2], "mixed")
""")


def test_killed_conversion_resumes_and_matches_an_uninterrupted_one(checkpoint, converted, tmp_path):
    src, out = checkpoint("glm45-tiny"), tmp_path / "out"
    p = subprocess.run([sys.executable, "-c", KILLER, src, out, "250"], env=ENV, cwd=ROOT, timeout=300)
    assert p.returncode == -9
    with pytest.raises(ModelFolderError, match="did not finish"):
        glm_mlx.load(out)
    done_before = json.loads((out / PROGRESS).read_text())["files"]
    reference = json.loads((converted("glm45-tiny", "mixed") / MANIFEST).read_text())
    assert 2 <= len(done_before) < len(reference["files"]) - 2  # killed midway through
    assert list(out.rglob("*.partial"))  # in the middle of a file
    p = cli("convert", src, "--out", out, check_ok=True)
    skipped = [line for line in p.stderr.splitlines() if "skipped" in line]
    assert len(skipped) == len(done_before)
    assert not list(out.rglob("*.partial")) and not (out / PROGRESS).exists()
    ours = json.loads((out / MANIFEST).read_text())
    assert ours["files"] == reference["files"]
    glm_mlx.load(out)
    # a third run has nothing to do
    assert "already converted" in cli("convert", src, "--out", out, check_ok=True).stderr


def test_unknown_recipe_is_refused_before_anything_happens(checkpoint, tmp_path):
    one_line_error(cli("convert", checkpoint("air-tiny"), "--out", tmp_path / "o", "--quant", "q3"), "'q3'")
    assert not (tmp_path / "o").exists()


def test_refuses_to_write_into_another_folder(checkpoint, converted, tmp_path):
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    one_line_error(cli("convert", checkpoint("air-tiny"), "--out", other), "not an unfinished conversion")
    assert (other / "notes.txt").read_text() == "mine"
    done = Path(shutil.copytree(converted("air-tiny", "mixed"), tmp_path / "done"))
    one_line_error(cli("convert", checkpoint("air-tiny"), "--out", done, "--quant", "none"),
                   "finished conversion of recipe 'mixed', not 'none'", "delete")


MEMORY_CAP_MB = 100


def test_conversion_memory_is_bounded_by_a_layer_not_the_model(tmp_path):
    """A checkpoint ~5x the cap converts with the converter's peak RSS under it."""
    cfg = make_config("air-tiny", hidden_size=512, moe_intermediate_size=512, n_routed_experts=64,
                      num_hidden_layers=4, intermediate_size=512, num_attention_heads=4, head_dim=128)
    src = write_checkpoint(tmp_path / "big", cfg, num_shards=4)
    size_mb = sum(f.stat().st_size for f in src.glob("*.safetensors")) / 2**20
    assert size_mb > 4 * MEMORY_CAP_MB
    # VmHWM, the peak RSS of this process image: ru_maxrss would carry over
    # the forking pytest process's own peak (it survives execve on Linux).
    code = ("import sys; from convert.convert import convert; convert(sys.argv[1], sys.argv[2]);"
            "print([l for l in open('/proc/self/status') if l.startswith('VmHWM')][0].split()[1])")
    p = subprocess.run([sys.executable, "-c", code, src, tmp_path / "out"], env=ENV, cwd=ROOT,
                       capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr
    peak_mb = int(p.stdout.split()[-1]) / 1024
    print(f"checkpoint {size_mb:.0f} MB, converter peak RSS {peak_mb:.0f} MB")
    assert peak_mb < MEMORY_CAP_MB


def test_each_expert_is_one_contiguous_read(converted):
    """One os.pread of [data_start + e*stride, +stride) brings in expert e:
    its gate, up and down weights with their scales, as loading stacks them."""
    from glm_mlx.loading import read_experts

    folder = converted("glm45-tiny", "mixed")
    manifest = json.loads((folder / MANIFEST).read_text())
    assert set(manifest["experts"]) == {"3", "4", "5"}  # the MoE layers and the MTP layer
    entry = manifest["experts"]["4"]
    assert entry["quantization"] == {p: {"bits": 4, "group_size": 64} for p in ("gate_proj", "up_proj", "down_proj")}
    stacked = read_experts(folder, entry)
    fd = os.open(folder / entry["file"], os.O_RDONLY)
    try:
        for e in (0, 7, entry["num_experts"] - 1):
            blob = os.pread(fd, entry["stride"], entry["data_start"] + e * entry["stride"])
            assert len(blob) == entry["stride"]
            for part, spec in entry["parts"].items():
                want = np.array(stacked[part][e].view(mx.uint16) if spec["dtype"] == "BF16" else stacked[part][e])
                got = np.frombuffer(blob, dtype=want.dtype, count=want.size, offset=spec["offset"])
                np.testing.assert_array_equal(got.reshape(want.shape), want, err_msg=part)
    finally:
        os.close(fd)


def test_a_fresh_conversion_loads_without_rehashing(checkpoint, tmp_path, monkeypatch):
    """The converter hashed every byte as it wrote it; the first load trusts
    that record (sizes and mtimes unchanged) instead of re-reading 60 GB."""
    import glm_mlx.loading as loading
    from convert.convert import convert

    out = convert(checkpoint("air-tiny"), tmp_path / "m", "mixed")

    def no_hashing(path):
        raise AssertionError(f"re-hashed {path}")

    monkeypatch.setattr(loading, "_sha256", no_hashing)
    glm_mlx.load(out)
    _flip(out / "weights/layer.001.safetensors")  # a write changes the mtime: hashing is back
    with pytest.raises(AssertionError, match="layer.001"):
        glm_mlx.load(out)


# -- hostile sources: refused whole, before anything is written ------------------

def _rewrite(src: Path, edit) -> None:
    """Rewrite src's shards with edit(shard name, {tensor: (dtype, shape, stored array)}) applied, and the
    index to match (a tensor in two shards is indexed at the first)."""
    from convert.safetensors_io import SafetensorsFile, write_safetensors

    index = src / "model.safetensors.index.json"
    meta, weight_map = json.loads(index.read_text()), {}
    for shard in sorted(src.glob("model-*.safetensors")):
        f = SafetensorsFile(shard)
        tensors = {n: (t.dtype, t.shape, f.read(n)) for n, t in f.tensors.items()}
        edit(shard.name, tensors)
        write_safetensors(shard, tensors)
        for n in tensors:
            weight_map.setdefault(n, shard.name)
    meta["weight_map"] = weight_map
    index.write_text(json.dumps(meta))


def _edit_header(shard: Path, edit) -> None:
    """Replace the shard's JSON header text by edit(text), in place (the header is space-padded)."""
    import struct

    raw = shard.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    new = edit(raw[8: 8 + n].decode().rstrip()).encode()
    assert len(new) <= n
    shard.write_bytes(raw[:8] + new.ljust(n) + raw[8 + n:])


def _edit_index(src: Path, edit) -> None:
    index = src / "model.safetensors.index.json"
    meta = json.loads(index.read_text())
    edit(meta)
    index.write_text(json.dumps(meta))


def _edit_config(src: Path, **changes) -> None:
    cfg = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps({**cfg, **changes}))


def _retype(tensor: str, dtype: str):
    def edit(text: str) -> str:
        header = json.loads(text)
        header[tensor]["dtype"] = dtype
        return json.dumps(header, separators=(",", ":"))
    return edit


def _overlap(a: str, b: str):
    def edit(text: str) -> str:
        header = json.loads(text)
        header[b]["data_offsets"] = header[a]["data_offsets"]
        return json.dumps(header, separators=(",", ":"))
    return edit


SHARD1, SHARD2 = "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"
EXPERT = "model.layers.2.mlp.experts.3.gate_proj.weight"
NORM0, NORM1 = "model.layers.0.input_layernorm.weight", "model.layers.0.post_attention_layernorm.weight"
HOSTILE = {
    # 33.13: found only after nine files were written
    "missing expert": (lambda s: _rewrite(s, lambda f, t: t.pop(EXPERT, None)), [EXPERT, "missing"]),
    # 33.10
    "tensor in two shards": (lambda s: _rewrite(s, lambda f, t: f == SHARD2 and t.update(
        {NORM0: (*t[next(iter(t))][:1], (64,), np.zeros(64, np.uint16))})), [SHARD2, NORM0, SHARD1, "too"]),
    "index names the other shard": (lambda s: _edit_index(s, lambda m: m["weight_map"].update({NORM0: SHARD2})),
                                    [NORM0, "index", SHARD2]),
    "index leaves a tensor out": (lambda s: _edit_index(s, lambda m: m["weight_map"].pop(NORM0)),
                                  [NORM0, "does not list"]),
    "overlapping data": (lambda s: _edit_header(s / SHARD1, _overlap(NORM0, NORM1)), [SHARD1, NORM0, NORM1, "overlap"]),
    "dtype not the bytes": (lambda s: _edit_header(s / SHARD1, _retype(NORM0, "F32")),
                            [SHARD1, NORM0, "F32", "128"]),
    "tensor named twice in a header": (
        lambda s: _edit_header(s / SHARD1, lambda t: t.replace(f'"{NORM1}"', f'"{NORM0}"')), [SHARD1, NORM0, "twice"]),
    # 33.13: wrong types, zero heads and groups
    "zero heads": (lambda s: _edit_config(s, num_attention_heads=0), ["config.json", "num_attention_heads"]),
    "zero groups": (lambda s: _edit_config(s, n_group=0), ["config.json", "n_group"]),
    "hidden size a string": (lambda s: _edit_config(s, hidden_size="64"), ["config.json", "hidden_size"]),
    "rope_scaling a string": (lambda s: _edit_config(s, rope_scaling="yarn"), ["config.json", "rope_scaling"]),
    "config a list": (lambda s: (s / "config.json").write_text("[1]"), ["config.json", "not a JSON object"]),
    "config names a key twice": (lambda s: (s / "config.json").write_text(
        (s / "config.json").read_text().rstrip()[:-1] + ', "hidden_size": 128}'), ["config.json", "twice"]),
    "heads not the tensors'": (lambda s: _edit_config(s, num_attention_heads=8),
                               ["q_proj", "config.json implies"]),
    "weight_map a list": (lambda s: _edit_index(s, lambda m: m.update(weight_map=[1])),
                          ["model.safetensors.index.json", "not a valid safetensors index"]),
    "index not JSON": (lambda s: (s / "model.safetensors.index.json").write_text("{"),
                       ["model.safetensors.index.json", "not valid JSON"]),
    # 33.14: sized by the tensors, not the claim
    "a billion layers": (lambda s: _edit_config(s, num_hidden_layers=10**9), ["num_hidden_layers", "holds 4 layers"]),
    "a million experts": (lambda s: _edit_config(s, n_routed_experts=10**6), ["n_routed_experts", "holds 8"]),
}


@pytest.mark.parametrize("name", HOSTILE)
def test_hostile_source_is_refused_in_one_line_before_anything_is_written(name, source, tmp_path):
    from convert.convert import ConvertError, convert

    damage, needles = HOSTILE[name]
    damage(source)
    with pytest.raises(ConvertError) as e:
        convert(source, tmp_path / "out", "mixed")
    message = str(e.value)
    assert "\n" not in message
    for n in needles:
        assert n in message, message
    assert not (tmp_path / "out").exists()


def test_hostile_source_on_the_command_line_is_one_line(source, tmp_path):
    _edit_config(source, num_hidden_layers=10**9)
    one_line_error(cli("convert", source, "--out", tmp_path / "out"), "num_hidden_layers")


def test_links_out_of_the_source_are_refused(source, tmp_path):
    from convert.convert import ConvertError, convert

    secret = tmp_path / "secret.txt"
    secret.write_text("the user's private key")
    for rel in ("chat_template.jinja", "merges.txt", SHARD2):
        src = Path(shutil.copytree(source, tmp_path / f"src-{rel}"))
        if (src / rel).exists():
            os.replace(src / rel, tmp_path / f"moved-{rel}")
        (src / rel).symlink_to(secret if not rel.endswith(".safetensors") else tmp_path / f"moved-{rel}")
        with pytest.raises(ConvertError, match=f"{rel}: is a link to .*outside the source folder"):
            convert(src, tmp_path / f"out-{rel}", "none")
        assert not (tmp_path / f"out-{rel}").exists()


def test_the_hub_caches_own_links_into_its_blobs_are_followed(source, tmp_path):
    """snapshots/<commit>/x -> ../../blobs/<hash>, as huggingface_hub lays out its cache."""
    from convert.convert import convert

    repo = tmp_path / "hub" / "models--zai-org--tiny"
    snap = repo / "snapshots" / ("0" * 40)
    (repo / "blobs").mkdir(parents=True)
    snap.mkdir(parents=True)
    for i, f in enumerate(sorted(source.iterdir())):
        os.replace(f, repo / "blobs" / f"blob{i}")
        (snap / f.name).symlink_to(Path("../../blobs") / f"blob{i}")
    out = convert(snap, tmp_path / "out", "none")
    glm_mlx.load(out)


def test_same_config_another_checkpoint_is_not_already_converted(source, tmp_path):
    """A folder converted from one checkpoint is neither resumed nor 'already converted' for another of
    the same config (another seed: every tensor's name, dtype, shape and offset the same)."""
    from convert.convert import ConvertError, convert

    other = write_checkpoint(tmp_path / "other", make_config("air-tiny"), seed=1)
    out = tmp_path / "out"

    def interrupt_after_three(line: str):
        if line.startswith("[3/"):
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        convert(source, out, "mixed", log=interrupt_after_three)
    with pytest.raises(ConvertError, match="holds an unfinished conversion of another source; choose another --out"):
        convert(other, out, "mixed")
    with pytest.raises(ConvertError, match="unfinished conversion of recipe 'mixed', not 'none'"):
        convert(source, out, "none")
    lines = []
    convert(source, out, "mixed", log=lines.append)  # the same source resumes
    assert sum("skipped" in line for line in lines) == 3
    with pytest.raises(ConvertError, match="holds a finished conversion of another source"):
        convert(other, out, "mixed")
    moved = Path(shutil.copytree(source, tmp_path / "moved"))  # the same checkpoint elsewhere is the same source
    lines = []
    convert(moved, out, "mixed", log=lines.append)
    assert "already converted" in lines[0]
    recorded = json.loads((out / MANIFEST).read_text())["source"]["files"]
    assert set(recorded) >= {SHARD1, SHARD2, "config.json", "model.safetensors.index.json", "tokenizer.json"}
    assert recorded[SHARD1]["size"] == (source / SHARD1).stat().st_size


def test_a_progress_file_of_the_wrong_shape_is_named(source, tmp_path):
    from convert.convert import ConvertError, convert

    out = tmp_path / "out"
    out.mkdir()
    for bad in ('{"fingerprint": 3, "files": []}', "[]", "{", '{"fingerprint": "x", "files": {"a": {"size": "1"}}}'):
        (out / PROGRESS).write_text(bad)
        with pytest.raises(ConvertError, match=PROGRESS):
            convert(source, out, "none")


def test_one_writer_per_folder_and_no_reader_while_it_writes(checkpoint, converted, tmp_path):
    from convert.lock import FolderBusy, writing

    out = tmp_path / "out"
    out.mkdir()
    with writing(out):  # as a convert in another process holds it
        one_line_error(cli("convert", checkpoint("air-tiny"), "--out", out), "another process is writing it")
    assert [p.name for p in out.iterdir()] == [".glm_mlx.lock"]  # the second writer wrote nothing
    done = Path(shutil.copytree(converted("air-tiny", "mixed"), tmp_path / "done"))
    with writing(done):
        with pytest.raises(FolderBusy, match="convert is writing it"):
            glm_mlx.load(done)
    glm_mlx.load(done)  # the lock file left behind blocks nothing


def test_convert_ends_with_the_folders_size_and_bits_per_weight(checkpoint, tmp_path):
    from convert.convert import convert
    from quantize.quality import bits_per_weight

    lines = []
    out = convert(checkpoint("air-tiny"), tmp_path / "m", "mixed", log=lines.append)
    size = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    assert lines[-1] == (f"{out}: {size / 1e6:.1f} MB on disk, {bits_per_weight(out):.2f} bits per weight "
                         "(tensor bytes over parameters, the MTP layer left out)")


def test_router_is_stored_as_the_source_holds_it_and_computes_in_float32(checkpoint, converted):
    """The router keeps the source's dtype (bf16 weight, float32 correction bias, as published): no
    bits spent on float32 copies of bf16 values, and the float32 values loading computes with are the
    source's exactly."""
    from convert.safetensors_io import SafetensorsFile

    src, folder = checkpoint("air-tiny"), converted("air-tiny", "mixed")
    stored = SafetensorsFile(folder / "weights/layer.001.safetensors").tensors
    index = json.loads((src / "model.safetensors.index.json").read_text())["weight_map"]
    model, _ = glm_mlx.load(folder, dtype="float32")
    for leaf, attr in (("weight", "weight"), ("e_score_correction_bias", "e_score_correction_bias")):
        name = f"model.layers.1.mlp.gate.{leaf}"
        source = SafetensorsFile(src / index[name])
        assert stored[name].dtype == source.tensors[name].dtype
        loaded = getattr(model.model.layers[1].mlp.gate, attr)
        assert loaded.dtype == mx.float32
        np.testing.assert_array_equal(np.array(loaded), source.read_float32(name))
    # where a source's router were dequantized (fp8 times its scale), float32 holds it exactly, bf16 would not
    from convert.checkpoint import Checkpoint

    fp8 = Checkpoint(checkpoint("air-tiny", fmt="fp8"))
    up = "model.layers.1.mlp.experts.0.up_proj.weight"
    assert (fp8.dtype(up), fp8.exact_dtype(up)) == ("BF16", "F32")
    assert fp8.exact_dtype("model.layers.1.mlp.gate.weight") == "BF16"  # kept bf16 by the FP8 release


def test_an_fp8_scale_of_the_wrong_shape_is_refused_before_writing(checkpoint, tmp_path):
    from convert.convert import ConvertError, convert

    src = Path(shutil.copytree(checkpoint("air-tiny", fmt="fp8"), tmp_path / "src"))
    name = "model.layers.1.mlp.experts.5.up_proj.weight_scale"

    def shrink(shard, tensors):
        if name in tensors:
            dtype, shape, arr = tensors[name]
            tensors[name] = (dtype, (2 * shape[0], 1), np.concatenate([arr, arr]))  # more rows than the weight

    _rewrite(src, shrink)
    with pytest.raises(ConvertError, match=f"{name} has shape \\[128, 1\\]"):
        convert(src, tmp_path / "out", "mixed")
    assert not (tmp_path / "out").exists()


def test_convert_walks_its_own_mistakes_in_one_line(converted, checkpoint, tmp_path):
    from convert.convert import ConvertError, convert

    model = converted("air-tiny", "mixed")
    with pytest.raises(ConvertError, match="is already a glm-mlx model folder"):
        convert(model, tmp_path / "again")
    (tmp_path / "file").write_text("")
    for out, why in ((tmp_path / "file", "is a file"), (tmp_path / "file" / "sub", "cannot create the folder")):
        with pytest.raises(ConvertError, match=why):
            convert(checkpoint("air-tiny"), out)


def test_an_mtp_embedding_equal_to_the_trunks_is_stored_once(source, tmp_path, monkeypatch):
    """Where the MTP layer's embed_tokens is the trunk's byte for byte, the folder holds it once and the
    MTP layer computes exactly what it computes with its own copy."""
    from convert.checkpoint import Checkpoint
    from convert.convert import convert
    from convert.safetensors_io import SafetensorsFile

    index = json.loads((source / "model.safetensors.index.json").read_text())["weight_map"]
    trunk = SafetensorsFile(source / index["model.embed_tokens.weight"]).read("model.embed_tokens.weight")
    copy = "model.layers.3.embed_tokens.weight"
    _rewrite(source, lambda shard, t: copy in t and t.update({copy: (t[copy][0], t[copy][1], trunk)}))
    once = convert(source, tmp_path / "once", "mixed")
    monkeypatch.setattr(Checkpoint, "same_bytes", lambda self, a, b: False)
    twice = convert(source, tmp_path / "twice", "mixed")
    mtp_file = "weights/layer.003.safetensors"
    assert copy not in SafetensorsFile(once / mtp_file).tensors and copy in SafetensorsFile(twice / mtp_file).tensors
    saved = (twice / mtp_file).stat().st_size - (once / mtp_file).stat().st_size
    assert saved >= trunk.size  # a byte a weight at least (8 bits, and scales)
    outs = []
    for folder in (once, twice):
        model, _ = glm_mlx.load(folder, dtype="float32")
        assert ("embed_tokens" in model.mtp[0]) == (folder == twice)
        toks = mx.array(np.arange(2, 14).reshape(1, 12) % model.args.vocab_size)
        outs.append(np.array(model.mtp[0](model.model(toks)[:, :-1], toks[:, 1:], model.model.embed_tokens)))
    np.testing.assert_array_equal(outs[0], outs[1])


def test_a_folder_that_recorded_no_source_says_so(source, tmp_path):
    """A folder an earlier glm-mlx wrote (no source identity in its manifest) is not called another source."""
    from convert.convert import ConvertError, convert

    out = convert(source, tmp_path / "out", "none")
    manifest = json.loads((out / MANIFEST).read_text())
    del manifest["source"]["files"]
    manifest["fingerprint"] = "an earlier formula"
    (out / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(ConvertError, match="a source it has no record of \\(an older glm-mlx\\); choose another"):
        convert(source, out, "none")
