"""Tampered and hostile model folders, as generate loads them (items 33.3, 33.4, 33.7, 33.9, 33.13, 33.14).

Most cases edit a file and then record its new size and sha256 in the manifest: a folder whose manifest
agrees with its files, as a hostile one would, so that the checksum is not what refuses it.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from attacks import Lab, Problem, Run, case
from convert.safetensors_io import sha256_file
from glm_mlx.loading import MANIFEST, VERIFIED as STAMP

EXPERTS = "weights/experts.001.safetensors"


def manifest(folder: Path) -> dict:
    return json.loads((folder / MANIFEST).read_text())


def save(folder: Path, m: dict) -> None:
    (folder / MANIFEST).write_text(json.dumps(m))


def record(path: Path) -> dict:
    return {"size": path.stat().st_size, "sha256": sha256_file(path)}


def rewrite(folder: Path, rel: str, data: str | bytes) -> None:
    """Replace a file and record it in the manifest, as a hostile folder's manifest would."""
    path = folder / rel
    path.write_bytes(data.encode() if isinstance(data, str) else data)
    m = manifest(folder)
    m["files"][rel] = record(path)
    save(folder, m)


def edit_config(folder: Path, **values) -> None:
    config = json.loads((folder / "config.json").read_text())
    rewrite(folder, "config.json", json.dumps({**config, **values}))


def edit_experts(folder: Path, layer: str = "1", **values) -> None:
    m = manifest(folder)
    m["experts"][layer].update(values)
    save(folder, m)


def generate(lab: Lab, folder: Path, *extra) -> Run:
    return lab.cli("generate", "-m", folder, "-p", "hi", "-n", "2", "--temp", "0", *extra, timeout=180)


def flip(path: Path, offset: int) -> None:
    """One byte changed in place, size and mtime as they were (what `touch -d` or bit rot leaves)."""
    st = path.stat()
    with open(path, "r+b") as f:
        f.seek(offset)
        b = f.read(1)
        f.seek(offset)
        f.write(bytes([b[0] ^ 0xFF]))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


# -- 33.3: paths the manifest names stay inside the folder and are checksummed ------------------------

@case("33.3", "manifest files entry ../ outside the folder", "error: outside the model folder")
def files_dotdot(lab: Lab) -> str:
    model = lab.model()
    shutil.copy(model / "config.json", model.parent / "secret.json")
    m = manifest(model)
    m["files"]["../secret.json"] = record(model.parent / "secret.json")
    save(model, m)
    return generate(lab, model).refused("outside the model folder")


@case("33.3", "manifest files entry an absolute path", "error: outside the model folder")
def files_absolute(lab: Lab) -> str:
    model = lab.model()
    secret = lab.tmp() / "secret.json"
    shutil.copy(model / "config.json", secret)
    m = manifest(model)
    m["files"][str(secret)] = record(secret)
    save(model, m)
    return generate(lab, model).refused("outside the model folder")


@case("33.3", "experts file ../ outside the folder", "error: outside the model folder")
def experts_dotdot(lab: Lab) -> str:
    model = lab.model()
    shutil.copy(model / EXPERTS, model.parent / "experts.safetensors")
    m = manifest(model)
    m["experts"]["1"]["file"] = "../experts.safetensors"
    m["files"]["../experts.safetensors"] = record(model.parent / "experts.safetensors")
    save(model, m)
    return generate(lab, model).refused("outside the model folder")


@case("33.3", "experts file a link leaving the folder", "error: a link outside the model folder")
def experts_symlink(lab: Lab) -> str:
    model = lab.model()
    outside = model.parent / "experts.safetensors"
    shutil.move(model / EXPERTS, outside)
    (model / EXPERTS).symlink_to(outside)
    return generate(lab, model).refused("outside the model folder", EXPERTS)


@case("33.3", "experts file not listed in files (never checksummed)", "error: not listed in files")
def experts_unlisted(lab: Lab) -> str:
    model = lab.model()
    m = manifest(model)
    del m["files"][EXPERTS]
    save(model, m)
    flip(model / EXPERTS, 9000)  # what an unlisted file could hold unnoticed
    return generate(lab, model).refused("not listed in files")


@case("33.3", "a tokenizer file added after conversion", "error: not listed in the manifest")
def tokenizer_added(lab: Lab) -> str:
    model = lab.model()
    (model / "added_tokens.json").write_text('{"<evil>": 5}')
    return generate(lab, model).refused("added_tokens.json", "not listed")


# -- 33.4: every number of an experts entry is bounded by the file ------------------------------------

@case("33.4", "experts num_experts 1000000 (segfaulted)", "error: ends past the file")
def num_experts_huge(lab: Lab) -> str:
    model = lab.model()
    edit_experts(model, num_experts=1000000)
    return generate(lab, model).refused("experts['1']", "past the file")


@case("33.4", "experts num_experts 1000000, offloaded", "error: ends past the file")
def num_experts_huge_offloaded(lab: Lab) -> str:
    model = lab.model()
    edit_experts(model, num_experts=1000000)
    return generate(lab, model, "--expert-memory", "20KB").refused("experts['1']", "past the file")


@case("33.4", "experts data_start -4096 (read the file's end)", "error: data_start must be at least 0")
def data_start_negative(lab: Lab) -> str:
    model = lab.model()
    edit_experts(model, data_start=-4096)
    return generate(lab, model).refused("data_start")


@case("33.4", "experts stride past the file", "error: ends past the file")
def stride_huge(lab: Lab) -> str:
    model = lab.model()
    edit_experts(model, stride=1 << 40)
    return generate(lab, model).refused("past the file")


@case("33.4", "experts part offset past its expert", "error: leave the expert's bytes")
def part_offset(lab: Lab) -> str:
    model = lab.model()
    parts = manifest(model)["experts"]["1"]["parts"]
    parts["down_proj.biases"]["offset"] = 1 << 20
    edit_experts(model, parts=parts)
    return generate(lab, model).refused("down_proj.biases")


@case("33.4", "experts part shape not the model's", "error: config.json makes it")
def part_shape(lab: Lab) -> str:
    model = lab.model()
    parts = manifest(model)["experts"]["1"]["parts"]
    parts["gate_proj.weight"]["shape"] = [8, 64]  # same bytes, transposed
    edit_experts(model, parts=parts)
    return generate(lab, model, "--expert-memory", "20KB").refused("gate_proj.weight", "config.json makes it")


for _field, _value in (("num_experts", True), ("data_start", "8192"), ("stride", 6912.0)):
    def _typed(lab: Lab, field=_field, value=_value) -> str:
        model = lab.model()
        edit_experts(model, **{field: value})
        return generate(lab, model).refused(MANIFEST, field)

    case("33.4", f"experts {_field} {_value!r}", "error naming the manifest and the field")(_typed)


# -- 33.7: the verified stamp ----------------------------------------------------------------------------

@case("33.7", "a weight changed, mtime set back (touch -d)", "error: checksum does not match")
def mtime_set_back(lab: Lab) -> str:
    model = lab.model()
    generate(lab, model).ok()  # stamps the folder as verified
    flip(model / "weights/layer.001.safetensors", 20000)
    return generate(lab, model).refused("layer.001", "checksum")


@case("33.7", "rot the stamp cannot see: verify finds it", "verify: error: checksum does not match")
def verify_finds_rot(lab: Lab) -> str:
    model = lab.model()
    lab.cli("verify", "-m", model).ok()
    stamp = json.loads((model / STAMP).read_text())
    flip(model / EXPERTS, 9000)
    st = (model / EXPERTS).stat()  # as though nothing had touched the file (rot on the disk)
    stamp[EXPERTS] = [st.st_size, st.st_mtime_ns, st.st_ino, st.st_dev, st.st_ctime_ns, stamp[EXPERTS][-1]]
    (model / STAMP).write_text(json.dumps(stamp))
    line = lab.cli("verify", "-m", model).refused(EXPERTS, "checksum")
    generate(lab, model).refused(EXPERTS, "checksum")  # and the fast path no longer trusts it
    return line


# -- 33.9: config values that are not numbers, or not sensible ones ---------------------------------------

for _field, _value in (("rms_norm_eps", float("nan")), ("num_hidden_layers", -1), ("num_experts_per_tok", 0),
                       ("num_experts_per_tok", 9), ("num_attention_heads", 0), ("num_key_value_heads", 0),
                       ("n_group", 0), ("num_key_value_heads", "2"), ("hidden_size", True),
                       ("head_dim", 16)):
    def _config(lab: Lab, field=_field, value=_value) -> str:
        model = lab.model()
        edit_config(model, **{field: value})
        return generate(lab, model).refused("config.json", field if field != "head_dim" else "weights")

    case("33.9", f"config {_field} {_value!r}", "error naming config.json and the field")(_config)


# -- 33.13: wrong JSON, templates ------------------------------------------------------------------------

@case("33.13", "manifest not JSON", "error naming glm_mlx.json")
def manifest_not_json(lab: Lab) -> str:
    model = lab.model()
    (model / MANIFEST).write_text("{")
    return generate(lab, model).refused(MANIFEST, "not valid")


@case("33.13", "manifest files a list", "error naming glm_mlx.json and files")
def manifest_files_list(lab: Lab) -> str:
    model = lab.model()
    m = manifest(model)
    m["files"] = list(m["files"])
    save(model, m)
    return generate(lab, model).refused(MANIFEST, "files")


@case("33.13", "manifest quantization bits '8'", "error naming glm_mlx.json and the module")
def manifest_bits_string(lab: Lab) -> str:
    model = lab.model()
    m = manifest(model)
    m["quantization"]["lm_head"]["bits"] = "8"
    save(model, m)
    return generate(lab, model).refused(MANIFEST, "lm_head")


@case("33.13", "config.json not JSON", "error naming config.json")
def config_not_json(lab: Lab) -> str:
    model = lab.model()
    rewrite(model, "config.json", "")
    return generate(lab, model).refused("config.json", "not valid")


@case("33.13", "tokenizer_config.json not JSON", "error naming tokenizer_config.json")
def tokenizer_config_not_json(lab: Lab) -> str:
    model = lab.model()
    rewrite(model, "tokenizer_config.json", "{")
    return generate(lab, model).refused("tokenizer_config.json", "not valid JSON")


@case("33.13", "tokenizer.json not a tokenizer", "error: its tokenizer cannot be loaded")
def tokenizer_json_empty(lab: Lab) -> str:
    model = lab.model()
    rewrite(model, "tokenizer.json", "{}")
    return generate(lab, model).refused("tokenizer cannot be loaded")


@case("33.13", "a weights file that is not safetensors", "error naming the file")
def weights_garbage(lab: Lab) -> str:
    model = lab.model()
    rewrite(model, "weights/layer.002.safetensors", b"\xff" * 64)
    return generate(lab, model).refused("layer.002.safetensors")


for _name, _template in (("a syntax error", "{% for m in messages %}{{ m.content }"),
                         ("a blocked escape", "{{ ''.__class__.__mro__[1].__subclasses__() }}"),
                         ("an include", "{% include 'secrets.jinja' %}"),
                         ("an import", "{% import 'x.jinja' as x %}")):
    def _template_case(lab: Lab, template=_template) -> str:
        model = lab.model()
        rewrite(model, "chat_template.jinja", template)
        run = generate(lab, model)
        if "Traceback" not in run.err and len(run.err.strip().splitlines()) > 1 + run.err.count("[transformers]"):
            raise Problem(f"more than one line: {run.err.strip()[-300:]!r}")
        return run.refused("chat_template.jinja")

    case("33.13", f"template: {_name}", "one line naming chat_template.jinja")(_template_case)


# -- 33.14: hostile sizes ----------------------------------------------------------------------------------

@case("33.14", "config num_hidden_layers 1e9 (ran out of memory)", "error: the folder's weights hold 4 layers")
def layers_billion(lab: Lab) -> str:
    model = lab.model()
    edit_config(model, num_hidden_layers=1_000_000_000)
    return generate(lab, model).refused("config.json", "layers")


@case("33.14", "config n_routed_experts 1e9", "error: the weights do not match config.json")
def experts_billion(lab: Lab) -> str:
    model = lab.model()
    edit_config(model, n_routed_experts=1_000_000_000)
    return generate(lab, model).refused("config.json", "e_score_correction_bias")


@case("33.14", "config vocab_size 1e12", "error naming config.json and vocab_size")
def vocab_huge(lab: Lab) -> str:
    model = lab.model()
    edit_config(model, vocab_size=10**12)
    return generate(lab, model).refused("config.json", "vocab_size")


@case("33.14", "template: a string times 3e9", "error naming the template: over the limit")
def template_repeat(lab: Lab) -> str:
    model = lab.model()
    rewrite(model, "chat_template.jinja", "{{ 'x' * 3000000000 }}")
    return generate(lab, model).refused("chat_template.jinja", "characters")


@case("33.14", "template: a string doubled in a loop", "error naming the template: over the limit")
def template_doubling(lab: Lab) -> str:
    model = lab.model()
    rewrite(model, "chat_template.jinja", "{% set ns = namespace(s='x') %}{% for i in range(64) %}"
                                          "{% set ns.s = ns.s ~ ns.s %}{% endfor %}{{ ns.s }}")
    return generate(lab, model).refused("chat_template.jinja", "characters")
