"""Hostile checkpoints and two writers on one folder, through `glm-mlx convert` (items 33.5, 33.6, 33.10,
33.13, 33.14)."""

from __future__ import annotations

import json
import os
import signal
import struct
import subprocess
import sys
from pathlib import Path

from attacks import ROOT, Lab, Problem, case

SHARD1, SHARD2 = "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"
NORM0, NORM1 = "model.layers.0.input_layernorm.weight", "model.layers.0.post_attention_layernorm.weight"


def _nothing_written(out: Path) -> None:
    if out.exists() and any(p.name != ".glm_mlx.lock" for p in out.iterdir()):
        raise Problem(f"refused, but after writing {sorted(p.name for p in out.iterdir())}")


def _refused_before_writing(lab: Lab, src: Path, *needles: str) -> str:
    out = lab.tmp() / "out"
    line = lab.cli("convert", src, "--out", out, timeout=120).refused(*needles)
    _nothing_written(out)
    return line


def _edit_json(path: Path, edit) -> None:
    value = json.loads(path.read_text())
    edit(value)
    path.write_text(json.dumps(value))


def _edit_header(shard: Path, edit) -> None:
    """Rewrite the shard's JSON header in place (the writer pads it with spaces)."""
    raw = shard.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8: 8 + n])
    new = edit(header) if isinstance(header, dict) else header
    text = new if isinstance(new, str) else json.dumps(header, separators=(",", ":"))
    shard.write_bytes(raw[:8] + text.encode().ljust(n) + raw[8 + n:])


def _other_checkpoint(lab: Lab) -> Path:
    """A checkpoint of the same config as the lab's, with other weights."""
    from convert.synthetic import make_config, write_checkpoint

    return write_checkpoint(lab.tmp() / "other", make_config("air-tiny"), seed=1)


# -- 33.5: links out of the source -----------------------------------------------------------------

def _link_out(lab: Lab, rel: str) -> str:
    src = lab.checkpoint()
    secret = src.parent / "id_rsa"
    secret.write_text("-----BEGIN OPENSSH PRIVATE KEY-----\n")
    (src / rel).unlink(missing_ok=True)
    (src / rel).symlink_to(secret)
    out = src.parent / "out"
    line = lab.cli("convert", src, "--out", out).refused(rel, "outside the source folder")
    if out.exists() and any("OPENSSH" in p.read_text(errors="replace") for p in out.rglob("*") if p.is_file()):
        raise Problem("the linked file was copied into the model folder")
    return line


@case("33.5", "chat_template.jinja links to a file outside the source", "error naming the link, nothing copied")
def link_template(lab: Lab) -> str:
    return _link_out(lab, "chat_template.jinja")


@case("33.5", "merges.txt links to a file outside the source", "error naming the link, nothing copied")
def link_merges(lab: Lab) -> str:
    return _link_out(lab, "merges.txt")


@case("33.5", "tokenizer.model links to a file outside the source", "error naming the link, nothing copied")
def link_tokenizer_model(lab: Lab) -> str:
    return _link_out(lab, "tokenizer.model")


@case("33.5", "a shard links to a file outside the source", "error naming the shard")
def link_shard(lab: Lab) -> str:
    src = lab.checkpoint()
    outside = src.parent / SHARD2
    os.replace(src / SHARD2, outside)
    (src / SHARD2).symlink_to(outside)
    return _refused_before_writing(lab, src, SHARD2, "outside the source folder")


# -- 33.6: two writers, one folder ------------------------------------------------------------------

@case("33.6", "a second convert into a folder being converted", "error: another process is writing it")
def second_writer(lab: Lab) -> str:
    from convert.lock import writing

    out = lab.tmp() / "out"
    out.mkdir()
    with writing(out):  # the first convert, holding the folder
        line = lab.cli("convert", _other_checkpoint(lab), "--out", out).refused("another process is writing it")
    _nothing_written(out)
    return line


@case("33.6", "generate on a folder a convert is writing", "error: a convert is writing it")
def reader_while_writing(lab: Lab) -> str:
    from convert.lock import writing

    model = lab.model()
    with writing(model):
        return lab.cli("generate", "-m", model, "-p", "hi", "-n", "2").refused("convert is writing it")


KILLED = """
import os, signal, sys
from convert import safetensors_io
from convert.convert import convert
real, calls = safetensors_io.SafetensorsWriter.write, [0]
def write(self, name, arr):
    calls[0] += 1
    if calls[0] == 40:
        os.kill(os.getpid(), signal.SIGKILL)
    return real(self, name, arr)
safetensors_io.SafetensorsWriter.write = write
convert(sys.argv[1], sys.argv[2], "mixed")
"""


@case("33.6", "kill -9 mid-convert, then another source into the same --out", "error: another source; what to do")
def other_source_resumes(lab: Lab) -> str:
    out = lab.tmp() / "out"
    p = subprocess.run([sys.executable, "-c", KILLED, lab.checkpoint(), out], cwd=ROOT, env=lab.env, timeout=120)
    if p.returncode != -signal.SIGKILL or not (out / ".glm_mlx_progress.json").exists():
        raise Problem(f"the first convert was not killed midway (rc {p.returncode})")
    before = {q.name: q.stat().st_mtime_ns for q in out.rglob("*")}
    line = lab.cli("convert", _other_checkpoint(lab), "--out", out).refused("another source", "--out", "delete")
    if {q.name: q.stat().st_mtime_ns for q in out.rglob("*")} != before:
        raise Problem("refused, but the unfinished folder was changed")
    return line


@case("33.6", "a finished folder of another checkpoint with the same config",
      "error: another source, not 'already converted'")
def other_source_finished(lab: Lab) -> str:
    return lab.cli("convert", _other_checkpoint(lab), "--out", lab.model()).refused("another source")


# -- 33.10: duplicate or overlapping tensors ----------------------------------------------------------

@case("33.10", "a tensor in two shards", "error naming both shards and the tensor")
def tensor_in_two_shards(lab: Lab) -> str:
    from convert.safetensors_io import SafetensorsFile, write_safetensors

    src = lab.checkpoint()
    first, second = SafetensorsFile(src / SHARD1), SafetensorsFile(src / SHARD2)
    tensors = {n: (t.dtype, t.shape, second.read(n)) for n, t in second.tensors.items()}
    tensors[NORM0] = (first.tensors[NORM0].dtype, first.tensors[NORM0].shape, first.read(NORM0) * 0)
    write_safetensors(src / SHARD2, tensors)  # the index still places it in the first shard
    return _refused_before_writing(lab, src, SHARD1, SHARD2, NORM0)


@case("33.10", "the index places a tensor in a shard that does not hold it", "error naming the shard and tensor")
def index_other_shard(lab: Lab) -> str:
    src = lab.checkpoint()
    _edit_json(src / "model.safetensors.index.json", lambda m: m["weight_map"].update({NORM0: SHARD2}))
    return _refused_before_writing(lab, src, NORM0, SHARD2)


@case("33.10", "two tensors' data offsets overlap in one shard", "error naming the shard and both tensors")
def overlapping_offsets(lab: Lab) -> str:
    src = lab.checkpoint()
    _edit_header(src / SHARD1, lambda h: h[NORM1].update(data_offsets=h[NORM0]["data_offsets"]))
    return _refused_before_writing(lab, src, SHARD1, NORM0, NORM1, "overlap")


@case("33.10", "a dtype that does not match the bytes", "error naming the shard, tensor and sizes")
def dtype_not_bytes(lab: Lab) -> str:
    src = lab.checkpoint()
    _edit_header(src / SHARD1, lambda h: h[NORM0].update(dtype="F32"))
    return _refused_before_writing(lab, src, SHARD1, NORM0, "F32")


@case("33.10", "a header naming one tensor twice", "error naming the shard and tensor")
def header_names_twice(lab: Lab) -> str:
    src = lab.checkpoint()

    def twice(header: dict) -> str:
        return json.dumps(header, separators=(",", ":")).replace(f'"{NORM1}"', f'"{NORM0}"')

    _edit_header(src / SHARD1, twice)
    return _refused_before_writing(lab, src, SHARD1, NORM0, "twice")


# -- 33.13: incomplete or mistyped sources --------------------------------------------------------------

@case("33.13", "an expert tensor missing from the last layer", "error naming it, before any file is written")
def missing_expert(lab: Lab) -> str:
    from convert.safetensors_io import SafetensorsFile, write_safetensors

    src = lab.checkpoint()
    name = "model.layers.2.mlp.experts.3.gate_proj.weight"
    index = json.loads((src / "model.safetensors.index.json").read_text())
    shard = src / index["weight_map"].pop(name)
    f = SafetensorsFile(shard)
    write_safetensors(shard, {n: (t.dtype, t.shape, f.read(n)) for n, t in f.tensors.items() if n != name})
    (src / "model.safetensors.index.json").write_text(json.dumps(index))
    return _refused_before_writing(lab, src, name, "missing")


def _config(lab: Lab, **changes) -> Path:
    src = lab.checkpoint()
    _edit_json(src / "config.json", lambda c: c.update(changes))
    return src


@case("33.13", "config num_attention_heads 0", "error naming config.json and the field")
def zero_heads(lab: Lab) -> str:
    return _refused_before_writing(lab, _config(lab, num_attention_heads=0), "config.json", "num_attention_heads")


@case("33.13", "config n_group 0", "error naming config.json and the field")
def zero_groups(lab: Lab) -> str:
    return _refused_before_writing(lab, _config(lab, n_group=0), "config.json", "n_group")


@case("33.13", "config hidden_size a string", "error naming config.json and the field")
def config_string(lab: Lab) -> str:
    return _refused_before_writing(lab, _config(lab, hidden_size="64"), "config.json", "hidden_size")


@case("33.13", "config.json a JSON list", "error naming config.json")
def config_list(lab: Lab) -> str:
    src = lab.checkpoint()
    (src / "config.json").write_text("[]")
    return _refused_before_writing(lab, src, "config.json")


@case("33.13", "index weight_map a list", "error naming the index")
def index_list(lab: Lab) -> str:
    src = lab.checkpoint()
    _edit_json(src / "model.safetensors.index.json", lambda m: m.update(weight_map=[SHARD1]))
    return _refused_before_writing(lab, src, "model.safetensors.index.json")


@case("33.13", "index weight_map values numbers", "error naming the index")
def index_numbers(lab: Lab) -> str:
    src = lab.checkpoint()
    _edit_json(src / "model.safetensors.index.json", lambda m: m["weight_map"].update({NORM0: 1}))
    return _refused_before_writing(lab, src, "model.safetensors.index.json")


@case("33.13", "progress file of wrong types", "error naming the progress file")
def progress_types(lab: Lab) -> str:
    out = lab.tmp() / "out"
    out.mkdir()
    (out / ".glm_mlx_progress.json").write_text('{"fingerprint": 1, "files": [1]}')
    return lab.cli("convert", lab.checkpoint(), "--out", out).refused(".glm_mlx_progress.json")


@case("33.13", "progress file not JSON", "error naming the progress file")
def progress_not_json(lab: Lab) -> str:
    out = lab.tmp() / "out"
    out.mkdir()
    (out / ".glm_mlx_progress.json").write_text("{")
    return lab.cli("convert", lab.checkpoint(), "--out", out).refused(".glm_mlx_progress.json")


def _mlx_lm_q4(lab: Lab) -> Path:
    """mlx-lm's 4-bit conversion of the lab's checkpoint (experts stacked as switch_mlp)."""
    import contextlib
    import io

    from mlx_lm import convert as mlx_convert

    out = lab.tmp() / "mlx-lm-q4"
    with contextlib.redirect_stdout(io.StringIO()):
        mlx_convert(str(lab.checkpoint()), str(out), quantize=True, q_bits=4, q_group_size=64)
    return out


@case("33.13", "mlx-lm source with quantization bits 0", "error naming config.json and the bits")
def mlx_bits_zero(lab: Lab) -> str:
    src = _mlx_lm_q4(lab)
    _edit_json(src / "config.json", lambda c: c["quantization"].update(bits=0))
    return _refused_before_writing(lab, src, "config.json", "bits 0")


@case("33.14", "mlx-lm source whose config claims more experts than are stacked", "error naming the file")
def mlx_more_experts(lab: Lab) -> str:
    src = _mlx_lm_q4(lab)
    _edit_json(src / "config.json", lambda c: c.update(n_routed_experts=16))
    return _refused_before_writing(lab, src, "n_routed_experts")


# -- 33.14: sizes claimed, not held ---------------------------------------------------------------------

@case("33.14", "config num_hidden_layers 1000000000", "error in bounded time and memory")
def billion_layers(lab: Lab) -> str:
    return _refused_before_writing(lab, _config(lab, num_hidden_layers=10**9), "num_hidden_layers")


@case("33.14", "config n_routed_experts 1000000", "error in bounded time and memory")
def million_experts(lab: Lab) -> str:
    return _refused_before_writing(lab, _config(lab, n_routed_experts=10**6), "n_routed_experts")


@case("33.14", "config num_nextn_predict_layers 1000000000", "converts without the missing MTP layers")
def billion_mtp_layers(lab: Lab) -> str:
    out = lab.tmp() / "out"
    run = lab.cli("convert", _config(lab, num_nextn_predict_layers=10**9), "--out", out, timeout=120).ok()
    mtp = json.loads((out / "glm_mlx.json").read_text())["mtp_layers"]
    if mtp != 1:
        raise Problem(f"{mtp} MTP layers recorded, the checkpoint holds 1")
    return "converted: " + run.err.strip().splitlines()[-1]
