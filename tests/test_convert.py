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
    one_line_error(cli("convert", checkpoint("air-tiny"), "--out", done, "--quant", "none"), "another conversion")


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
