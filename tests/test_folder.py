"""What a model folder guarantees: its manifest's paths stay inside it and are checksummed, its numbers are
bounded by the files, its config describes a model, a changed file is hashed again, `verify` hashes all."""

from __future__ import annotations

import json
import math
import os
import shutil
import sys
import time
import tracemalloc
from pathlib import Path

import pytest
from typer.testing import CliRunner

import glm_mlx
from glm_mlx.cli import app
from glm_mlx.config import ModelArgs
from glm_mlx.loading import (MANIFEST, VERIFIED, ModelFolderError, full_check, load_model, read_experts,
                             verify_folder)
from glm_mlx.offload import ExpertFile

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
from attacks.load import EXPERTS, flip, manifest, record, rewrite, save  # noqa: E402  (hostile folders' recipes)


@pytest.fixture
def folder(converted, tmp_path) -> Path:
    """A private copy of a converted tiny model (quantized experts)."""
    return Path(shutil.copytree(converted("air-tiny", "mixed"), tmp_path / "model"))


# -- paths ---------------------------------------------------------------------------------------------

def _outside(folder: Path, rel: str) -> None:
    shutil.copy(folder / "config.json", folder.parent / "secret.json")
    m = manifest(folder)
    m["files"][rel] = record(folder.parent / "secret.json")
    save(folder, m)


def _experts_outside(folder: Path) -> None:
    shutil.copy(folder / EXPERTS, folder.parent / "experts.safetensors")
    m = manifest(folder)
    m["experts"]["1"]["file"] = "../experts.safetensors"
    m["files"]["../experts.safetensors"] = record(folder.parent / "experts.safetensors")
    save(folder, m)


def _experts_linked_out(folder: Path) -> None:
    shutil.move(folder / EXPERTS, folder.parent / "experts.safetensors")
    (folder / EXPERTS).symlink_to(folder.parent / "experts.safetensors")


def _experts_unlisted(folder: Path) -> None:
    m = manifest(folder)
    del m["files"][EXPERTS]
    save(folder, m)


def _experts_twice(folder: Path) -> None:
    m = manifest(folder)
    m["experts"]["2"]["file"] = EXPERTS
    save(folder, m)


@pytest.mark.parametrize("tamper, message", [
    (lambda f: _outside(f, "../secret.json"), "outside the model folder"),
    (lambda f: _outside(f, str(f.parent / "secret.json")), "outside the model folder"),
    (_experts_outside, "outside the model folder"),
    (_experts_linked_out, "is a link to .*outside the model folder"),
    (_experts_unlisted, "is not listed in files"),
    (_experts_twice, "another layer's experts file"),
    (lambda f: (f / "tokenizer.model").write_bytes(b"\0"), "tokenizer.model: not listed in the manifest"),
], ids=["files-dotdot", "files-absolute", "experts-dotdot", "experts-symlink", "experts-unlisted",
        "experts-twice", "unlisted-tokenizer-file"])
def test_every_path_the_manifest_names_is_inside_the_folder_and_checksummed(folder, tamper, message):
    tamper(folder)
    with pytest.raises(ModelFolderError, match=message):
        verify_folder(folder)


# -- numbers -------------------------------------------------------------------------------------------

def _part(entry: dict, **spec) -> dict:
    parts = json.loads(json.dumps(entry["parts"]))
    parts["down_proj.biases"].update(spec)
    return {"parts": parts}


@pytest.mark.parametrize("change, message", [
    (lambda e: {"num_experts": 1000000}, "end past the file's"),
    (lambda e: {"data_start": -4096}, "data_start must be an integer of at least 0"),
    (lambda e: {"stride": 1 << 40}, "end past the file's"),
    (lambda e: {"stride": 0}, "stride must be an integer of at least 1"),
    (lambda e: {"num_experts": True}, "num_experts must be an integer"),
    (lambda e: {"data_start": "8192"}, "data_start must be an integer"),
    (lambda e: {"stride": float(e["stride"])}, "stride must be an integer"),
    (lambda e: _part(e, offset=1 << 20), "leave the expert's"),
    (lambda e: _part(e, offset=0), "overlap another part"),
    (lambda e: _part(e, shape=[64, -1]), "shape must be an integer of at least 1"),
    (lambda e: _part(e, dtype="I64"), "dtype 'I64' is not one of"),
    (lambda e: {"crc32": e["crc32"][:3]}, "one 32-bit checksum per expert"),
], ids=["num-experts-huge", "data-start-negative", "stride-huge", "stride-zero", "bool", "string", "float",
        "part-past-stride", "parts-overlap", "shape-negative", "dtype", "crc32-short"])
def test_experts_numbers_are_bounded_by_the_file_before_any_read(folder, change, message):
    entry = manifest(folder)["experts"]["1"]
    bad = {**entry, **change(entry)}
    # read_experts and the offloader check the entry against the file as it is, whatever loaded it
    with pytest.raises(ModelFolderError, match=message):
        read_experts(folder, bad)
    with pytest.raises(ModelFolderError, match=message):
        ExpertFile(folder, 1, bad)
    m = manifest(folder)
    m["experts"]["1"] = bad
    save(folder, m)
    with pytest.raises(ModelFolderError, match=f"{MANIFEST}: experts\\['1'\\].*{message}"):
        load_model(folder)


def test_an_experts_file_cut_short_after_the_check_is_refused_before_the_memmap(folder):
    entry = manifest(folder)["experts"]["1"]
    with open(folder / EXPERTS, "r+b") as f:
        f.truncate(entry["data_start"] + entry["stride"])
    with pytest.raises(ModelFolderError, match="end past the file's"):
        read_experts(folder, entry)
    with pytest.raises(ModelFolderError, match="end past the file's"):
        ExpertFile(folder, 1, entry)


@pytest.mark.parametrize("edit, message", [
    (lambda m: m["experts"]["1"]["parts"]["gate_proj.weight"].update(shape=[8, 64]), "gate_proj.weight"),
    (lambda m: m["experts"]["1"]["parts"]["gate_proj.weight"].update(dtype="F32"), "gate_proj.weight.*F32"),
    (lambda m: m["experts"]["1"]["quantization"].update(gate_proj={"bits": "4", "group_size": 64}), "bits '4'"),
    (lambda m: m["quantization"]["lm_head"].update(bits=7), "bits 7"),
    (lambda m: m["experts"].pop("2"), "the config's MoE layers"),
], ids=["shape-transposed", "dtype", "bits-string", "bits-7", "layer-missing"])
@pytest.mark.parametrize("offloaded", [False, True])
def test_the_manifests_experts_are_the_models_resident_or_offloaded(folder, edit, message, offloaded):
    m = manifest(folder)
    edit(m)
    save(folder, m)
    with pytest.raises(ModelFolderError, match=message):
        load_model(folder, "float32", expert_memory="20KB" if offloaded else None)


def test_a_tensor_in_two_weights_files_is_refused(folder):
    shutil.copy(folder / "weights/layer.001.safetensors", folder / "weights/layer.001b.safetensors")
    m = manifest(folder)
    m["files"]["weights/layer.001b.safetensors"] = record(folder / "weights/layer.001b.safetensors")
    save(folder, m)
    with pytest.raises(ModelFolderError, match="is also in weights/layer.001.safetensors"):
        load_model(folder)


# -- the config ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("field, value, message", [
    ("rms_norm_eps", math.nan, "must be a finite number"),
    ("num_hidden_layers", -1, "must be at least 1"),
    ("num_experts_per_tok", 0, "must be at least 1"),
    ("num_experts_per_tok", 9, "more than the experts a token may choose from"),
    ("num_attention_heads", 0, "must be at least 1"),
    ("num_key_value_heads", 0, "must be at least 1"),
    ("num_key_value_heads", 3, "not a multiple of num_key_value_heads"),
    ("n_group", 0, "must be at least 1"),
    ("num_attention_heads", "4", "must be an integer"),
    ("hidden_size", True, "must be an integer"),
    ("vocab_size", 448.0, "must be an integer"),
    ("partial_rotary_factor", 0.03, "rotary dims"),
    ("rope_scaling", "yarn", "must be an object or null"),
    ("eos_token_id", [352, 100000], "outside the vocabulary"),
    ("vocab_size", 10**12, "more than an MLX array's dimension holds"),
    ("num_attention_heads", 10**8, "num_attention_heads x head_dim 3200000000 is more than"),
], ids=lambda v: str(v)[:20])
def test_config_values_that_no_model_has_are_refused_naming_the_field(checkpoint, field, value, message):
    config = json.loads((checkpoint("air-tiny") / "config.json").read_text())
    with pytest.raises(ValueError, match=f"^config.json: {field}.*{message}|^config.json: .*{message}") as e:
        ModelArgs.from_dict({**config, field: value})
    assert field in str(e.value)


def test_a_head_dim_the_hidden_size_does_not_divide_into_is_refused(checkpoint):
    config = json.loads((checkpoint("air-tiny") / "config.json").read_text())
    del config["head_dim"]
    with pytest.raises(ValueError, match="no head_dim, and hidden_size 64 does not divide into num_attention_heads 3"):
        ModelArgs.from_dict({**config, "num_attention_heads": 3, "num_key_value_heads": 1})


def test_layers_the_folder_does_not_hold_are_refused_before_any_is_built(folder):
    rewrite(folder, "config.json", json.dumps({**json.loads((folder / "config.json").read_text()),
                                               "num_hidden_layers": 1_000_000_000}))
    tracemalloc.start()
    t = time.perf_counter()
    with pytest.raises(ModelFolderError, match="config.json: num_hidden_layers 1000000000 \\(and 1 MTP layers in "
                                               "glm_mlx.json\\), but the folder's weights hold 4 layers"):
        load_model(folder)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert time.perf_counter() - t < 30 and peak < 100e6


# -- JSON that is not, or not of the right types ----------------------------------------------------------

@pytest.mark.parametrize("field, value", [("n_routed_experts", 10**9), ("hidden_size", 10**9), ("head_dim", 16)])
@pytest.mark.parametrize("offloaded", [False, True])
def test_config_sizes_the_weights_do_not_have_are_refused_naming_config_json(folder, field, value, offloaded):
    rewrite(folder, "config.json", json.dumps({**json.loads((folder / "config.json").read_text()), field: value}))
    with pytest.raises(ModelFolderError, match="the weights do not match config.json: .* config.json makes it"):
        load_model(folder, expert_memory="20KB" if offloaded else None)


@pytest.mark.parametrize("tamper, message", [
    (lambda f: (f / MANIFEST).write_text("{"), f"{MANIFEST}: not valid JSON \\(Expecting"),
    (lambda f: (f / MANIFEST).write_bytes(b"\xff\xfe"), f"{MANIFEST}: not valid JSON \\(.*utf-8"),
    (lambda f: (f / MANIFEST).write_text("[]"), f"{MANIFEST} must be an object"),
    (lambda f: save(f, {**manifest(f), "files": list(manifest(f)["files"])}), "files must be an object"),
    (lambda f: save(f, {**manifest(f), "format_version": "1"}), "format version '1' is not 1"),
    (lambda f: save(f, {**manifest(f), "mtp_layers": None}), "mtp_layers must be an integer"),
    (lambda f: save(f, {**manifest(f), "experts": {"one": {}}}), "experts\\['one'\\]: not a layer number"),
    (lambda f: rewrite(f, "config.json", ""), "config.json: not valid JSON"),
    (lambda f: rewrite(f, "config.json", "[1]"), "config.json: the config must be an object"),
    (lambda f: rewrite(f, "weights/layer.002.safetensors", "\xff" * 64), "layer.002.safetensors: not a readable"),
], ids=["manifest-truncated", "manifest-not-utf8", "manifest-list", "files-list", "version-string", "mtp-null",
        "layer-name", "config-empty", "config-list", "weights-garbage"])
def test_wrong_json_is_one_error_naming_the_file(folder, tamper, message):
    tamper(folder)
    with pytest.raises(ModelFolderError, match=message) as e:
        load_model(folder)
    assert str(folder) in str(e.value) and "\n" not in str(e.value)


def test_a_stamp_that_is_not_ours_is_ignored(folder):
    (folder / VERIFIED).write_text("[1, 2]")
    assert verify_folder(folder)["files"]


# -- the verified stamp and `glm-mlx verify` --------------------------------------------------------------

def test_a_file_changed_with_its_mtime_set_back_is_hashed_again(folder):
    verify_folder(folder)  # stamps every file as verified
    flip(folder / "weights/layer.001.safetensors", 20000)
    with pytest.raises(ModelFolderError, match="layer.001.safetensors: checksum does not match"):
        verify_folder(folder)


def test_a_file_replaced_by_another_with_the_same_size_and_mtime_is_hashed_again(folder):
    verify_folder(folder)
    path = folder / "weights/layer.001.safetensors"
    st = path.stat()
    data = bytearray(path.read_bytes())
    data[20000] ^= 0xFF
    (folder / "new").write_bytes(data)
    os.replace(folder / "new", path)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    with pytest.raises(ModelFolderError, match="checksum does not match"):
        verify_folder(folder)


def _forge_stamp(folder: Path, rel: str) -> None:
    """The stamp rewritten for the file as it is now: what rot on a disk (which changes no metadata) leaves."""
    stamp = json.loads((folder / VERIFIED).read_text())
    st = (folder / rel).stat()
    stamp[rel] = [st.st_size, st.st_mtime_ns, st.st_ino, st.st_dev, st.st_ctime_ns, stamp[rel][-1]]
    (folder / VERIFIED).write_text(json.dumps(stamp))


def test_verify_hashes_every_byte_says_each_problem_and_refreshes_the_stamp(folder):
    r = CliRunner().invoke(app, ["verify", "-m", str(folder)])
    assert r.exit_code == 0 and "every file matches" in r.output
    verify_folder(folder)
    flip(folder / EXPERTS, 9000)
    _forge_stamp(folder, EXPERTS)
    m = manifest(folder)
    m["experts"]["2"]["crc32"][5] ^= 1
    save(folder, m)
    verify_folder(folder)  # the fast path trusts the stamp: what verify is for

    r = CliRunner().invoke(app, ["verify", "-m", str(folder)])
    errors = [line for line in r.output.splitlines() if line.startswith("error: ")]
    assert r.exit_code == 1 and len(errors) == 2
    assert f"{folder / EXPERTS}: checksum does not match" in errors[0]
    assert "experts.002.safetensors: expert 5 does not match the manifest's crc32" in errors[1]
    with pytest.raises(ModelFolderError, match="experts.001.safetensors: checksum"):
        verify_folder(folder)  # the stamp no longer vouches for the file verify refused


def test_verify_stamps_what_it_hashed(folder):
    (folder / VERIFIED).unlink()
    assert full_check(folder) == []
    stamp = json.loads((folder / VERIFIED).read_text())
    assert set(stamp) == set(manifest(folder)["files"])


# -- ~ -----------------------------------------------------------------------------------------------------

def test_load_expands_home_in_the_model_and_adapter_paths(folder, tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    model, tok = glm_mlx.load("~/model", dtype="float32")
    assert tok.folder == folder and len(tok) > 0
    with pytest.raises(ValueError, match=f"^{tmp_path / 'adapter'}: no such adapter folder"):
        glm_mlx.load("~/model", adapter="~/adapter")
