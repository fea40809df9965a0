"""LoRA / QLoRA layers, adapters on disk, and fusing them back in.

Everything in float32: MLX's CPU gather_mm takes nothing else, and float32
keeps the comparisons about the code, not the rounding.
"""

from __future__ import annotations

import json
import shutil

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten
from test_convert import cli

import glm_mlx
from glm_mlx.experts import QuantizedSwitchLinear, SwitchGLU, SwitchLinear
from glm_mlx.fuse import describe, fuse_folder, fuse_model
from glm_mlx.loading import load_model
from glm_mlx.lora import (ADAPTER_CONFIG, ADAPTER_WEIGHTS, LoRASwitchLinear, apply_lora, base_info,
                          load_adapter, lora_modules, lora_parameters, save_adapter)

ALL = {"attention", "shared_experts", "dense_mlp", "experts"}


def rel_err(a, b) -> float:
    return float(np.linalg.norm(np.asarray(a) - np.asarray(b)) / np.linalg.norm(np.asarray(b)))


def tokens(vocab: int, B=2, T=24, seed=0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, vocab, size=(B, T))


def randomize_b(model, std: float, seed: int = 0) -> None:
    """A trained-looking adapter: B away from its zero init."""
    mx.random.seed(seed)
    for _, layer in lora_modules(model):
        layer.lora_b = mx.random.normal(layer.lora_b.shape) * std
    mx.eval(lora_parameters(model))


def with_adapter(folder, targets=ALL, std=0.02, rank=4, alpha=8.0, seed=0):
    model, manifest = load_model(folder, "float32")
    mx.random.seed(seed)
    apply_lora(model, targets=targets, rank=rank, alpha=alpha, dropout=0.0)
    randomize_b(model, std, seed)
    return model, manifest


def saved_adapter(folder, path, **kw):
    model, manifest = with_adapter(folder, **kw)
    save_adapter(path, model, {"base": base_info(manifest, folder)})
    return model, manifest


# -- the layers ------------------------------------------------------------------

@pytest.mark.parametrize("recipe", ["none", "mixed"])
@pytest.mark.parametrize("preset", ["air-tiny", "glm45-tiny"])
def test_fresh_adapter_changes_nothing_and_a_trained_one_does(preset, recipe, converted):
    model, _ = load_model(converted(preset, recipe), "float32")
    toks = tokens(model.args.vocab_size)
    base = np.array(model(toks))
    wrapped = apply_lora(model, targets=ALL | {"mtp"}, rank=4, alpha=8, dropout=0.0)

    a = model.args
    n_moe = sum(a.is_moe_layer(i) for i in range(a.num_hidden_layers))
    # 4 attention projections a layer, 3 MLP / shared / routed projections; the MTP layer is a MoE layer
    assert len(wrapped) == 4 * (a.num_hidden_layers + 1) + 3 * (a.num_hidden_layers - n_moe) + 6 * (n_moe + 1)
    assert any(p.startswith("mtp.0.layer.mlp.experts.") for p in wrapped)
    assert not any(p.endswith(".mlp.gate") for p in wrapped)  # the router stays as it is
    # only the factors train; the base (4/8-bit or float) is frozen
    assert set(dict(tree_flatten(model.trainable_parameters()))) == set(lora_parameters(model))
    kinds = {type(m.base).__name__ for _, m in lora_modules(model)}
    assert kinds == ({"Linear", "SwitchLinear"} if recipe == "none" else {"QuantizedLinear", "QuantizedSwitchLinear"})

    assert np.array_equal(np.array(model(toks)), base)
    randomize_b(model, 0.02)
    assert rel_err(np.array(model(toks)), base) > 1e-2


def test_targets_choose_groups_and_unknown_ones_are_refused(converted):
    model, _ = load_model(converted("air-tiny"), "float32")
    wrapped = apply_lora(model, targets={"dense_mlp"}, rank=2, alpha=2)
    assert wrapped == [f"model.layers.0.mlp.{p}" for p in ("down_proj", "gate_proj", "up_proj")]
    with pytest.raises(ValueError, match="already applied"):
        apply_lora(model, targets={"attention"}, rank=2, alpha=2)
    model, _ = load_model(converted("air-tiny"), "float32")
    with pytest.raises(ValueError, match="unknown LoRA target.*router"):
        apply_lora(model, targets={"attention", "router"}, rank=2, alpha=2)


def test_dropout_acts_in_training_only(converted):
    model, _ = load_model(converted("air-tiny"), "float32")  # loaded in eval mode
    apply_lora(model, targets={"attention"}, rank=4, alpha=8, dropout=0.5)
    randomize_b(model, 0.05)
    toks = tokens(model.args.vocab_size)
    first = np.array(model(toks))
    assert np.array_equal(first, np.array(model(toks)))
    model.train()
    assert rel_err(np.array(model(toks)), first) > 1e-3


def _loop_oracle(layer: LoRASwitchLinear, x: np.ndarray, inds: np.ndarray) -> np.ndarray:
    """Every row, every chosen expert, one at a time: base_e(x) + s * B_e A_e x."""
    base = layer.base
    if isinstance(base, QuantizedSwitchLinear):
        w = np.array(mx.dequantize(base.weight, base.scales, base.biases, group_size=base.group_size, bits=base.bits))
    else:
        w = np.array(base.weight)
    a, b = np.array(layer.lora_a), np.array(layer.lora_b)
    out = np.zeros((*inds.shape, w.shape[1]), np.float32)
    for n in range(inds.shape[0]):
        for j, e in enumerate(inds[n]):
            out[n, j] = w[e] @ x[n] + layer.scale * (b[e] @ (a[e] @ x[n]))
    return out


@pytest.mark.parametrize("quantized", [False, True])
def test_switch_lora_equals_a_per_expert_loop(quantized):
    E, D, H, k, N = 8, 64, 32, 2, 40
    mx.random.seed(3)
    base = SwitchLinear(E, D, H)
    base.weight = mx.random.normal((E, H, D)) * D**-0.5
    if quantized:
        base = base.to_quantized(group_size=32, bits=4)
    layer = LoRASwitchLinear(base, rank=4, alpha=8.0, dropout=0.0)
    layer.lora_b = mx.random.normal(layer.lora_b.shape) * 0.1
    x = np.random.default_rng(0).normal(size=(N, D)).astype(np.float32)
    inds = np.random.default_rng(1).integers(0, E, size=(N, k))
    want = _loop_oracle(layer, x, inds)

    # unsorted: each row broadcast over its k experts
    got = layer(mx.array(x)[:, None, None, :], mx.array(inds)).squeeze(-2)
    assert rel_err(got, want) < 1e-5
    # sorted by expert, as SwitchGLU does for long inputs
    flat = inds.reshape(-1)
    order = np.argsort(flat, kind="stable")
    got = layer(mx.array(x[order // k])[:, None, :], mx.array(flat[order]), sorted_indices=True).squeeze(-2)
    back = np.empty_like(np.array(got))
    back[order] = np.array(got)
    assert rel_err(back.reshape(N, k, H), want) < 1e-5


def test_switch_glu_with_lora_takes_both_paths_alike():
    """The same experts give the same output whether SwitchGLU sorts the rows or not."""
    E, D, H, k = 8, 64, 32, 2
    mx.random.seed(4)
    glu = SwitchGLU(D, H, E)
    for p in ("gate_proj", "up_proj", "down_proj"):
        sl = getattr(glu, p)
        sl.weight = mx.random.normal(sl.weight.shape) * sl.weight.shape[-1] ** -0.5
        layer = LoRASwitchLinear(sl, rank=4, alpha=8.0, dropout=0.0)
        layer.lora_b = mx.random.normal(layer.lora_b.shape) * 0.1
        setattr(glu, p, layer)
    x = mx.random.normal((48, D))
    inds = mx.array(np.random.default_rng(2).integers(0, E, size=(48, k)))
    long = np.array(glu(x, inds))  # 96 rows x experts: sorted
    short = np.concatenate([np.array(glu(x[i : i + 8], inds[i : i + 8])) for i in range(0, 48, 8)])  # 16: unsorted
    assert rel_err(long, short) < 1e-5


# -- gradients -------------------------------------------------------------------

def _loss64(model, toks: mx.array) -> float:
    """Mean next-token cross-entropy, in float64 from the float32 logits: the
    central difference subtracts two losses near 10, and float32's last bit
    there (1e-6) over 2*eps would swamp it."""
    lg = np.array(model(toks[:, :-1], checked=True)).astype(np.float64)
    y = np.array(toks[:, 1:])
    top = lg.max(-1, keepdims=True)
    lse = np.log(np.exp(lg - top).sum(-1)) + top[..., 0]
    return float((lse - np.take_along_axis(lg, y[..., None], -1)[..., 0]).mean())


def _routed(model, toks: mx.array, layer: int) -> np.ndarray:
    """Expert ids the router of decoder layer `layer` chooses for these tokens."""
    h = model.model.embed_tokens(toks)
    for blk in model.model.layers[:layer]:
        h = blk(h)
    blk = model.model.layers[layer]
    h = h + blk.self_attn(blk.input_layernorm(h))
    inds, _ = blk.mlp.gate(blk.post_attention_layernorm(h))
    return np.array(inds)


@pytest.mark.parametrize("T", [12, 40])  # 2x11x2 = 44 expert rows: unsorted; 2x39x2 = 156: sorted
def test_lora_gradients_agree_with_central_differences(T, converted):
    model, _ = with_adapter(converted("air-tiny"), targets={"attention", "shared_experts", "experts"}, std=0.05)
    toks = mx.array(tokens(model.args.vocab_size, B=2, T=T, seed=5))

    def loss_fn(m, toks=toks):
        return nn.losses.cross_entropy(m(toks[:, :-1], checked=True), toks[:, 1:], reduction="mean")

    # on three tokens most experts of layer 1 see no row: exactly those get no gradient
    short = toks[:1, :4]
    used = np.bincount(_routed(model, short[:, :-1], 1).ravel(), minlength=model.args.n_routed_experts) > 0
    _, g = nn.value_and_grad(model, lambda m: loss_fn(m, short))(model)
    g = np.array(g["model"]["layers"][1]["mlp"]["experts"]["up_proj"]["lora_b"])
    assert not used.all() and [bool(np.any(g[i])) for i in range(len(used))] == used.tolist()

    loss, grads = nn.value_and_grad(model, loss_fn)(model)
    grads = dict(tree_flatten(grads))
    assert set(grads) == set(lora_parameters(model))
    assert abs(loss.item() - _loss64(model, toks)) < 1e-4

    layers = dict(lora_modules(model))
    counts = np.bincount(_routed(model, toks[:, :-1], 1).ravel(), minlength=model.args.n_routed_experts)
    e = int(counts.argmax())  # an expert layer 1 actually routes to

    eps, rtol, atol = 1e-2, 1e-2, 1e-4
    rng = np.random.default_rng(T)
    checks, worst = 0, 0.0
    for path, expert in [("model.layers.0.self_attn.q_proj", None), ("model.layers.1.self_attn.o_proj", None),
                         ("model.layers.1.mlp.shared_experts.gate_proj", None),
                         ("model.layers.1.mlp.experts.up_proj", e), ("model.layers.1.mlp.experts.down_proj", e)]:
        layer = layers[path]
        for name in ("lora_a", "lora_b"):
            g = np.array(grads[f"{path}.{name}"])
            block = g if expert is None else g[expert]
            # the largest coordinates and two at random
            picks = list(np.argsort(-np.abs(block).ravel())[:2]) + list(rng.choice(block.size, 2, replace=False))
            for flat in picks:
                idx = np.unravel_index(int(flat), block.shape)
                idx = tuple(int(i) for i in ((expert, *idx) if expert is not None else idx))
                orig = layer[name]
                losses = []
                for sign in (1, -1):
                    layer[name] = orig.at[idx].add(sign * eps)
                    losses.append(_loss64(model, toks))
                layer[name] = orig
                fd = (losses[0] - losses[1]) / (2 * eps)
                err = abs(fd - g[idx])
                assert err <= rtol * abs(fd) + atol, f"{path}.{name}{idx}: autodiff {g[idx]:.6g}, central {fd:.6g}"
                worst = max(worst, err / (rtol * abs(fd) + atol))
                checks += 1
    print(f"\nT={T}: {checks} coordinates, worst |grad - fd| / (1e-2 |fd| + 1e-4) = {worst:.3f}")


# -- adapters on disk ------------------------------------------------------------

def test_adapter_round_trip(converted, tmp_path):
    folder = converted("air-tiny", "mixed")
    trained, manifest = saved_adapter(folder, tmp_path / "ad", targets=ALL | {"mtp"}, rank=3, alpha=6.0)
    toks = tokens(trained.args.vocab_size)
    cfg = json.loads((tmp_path / "ad" / ADAPTER_CONFIG).read_text())
    assert (cfg["rank"], cfg["alpha"], cfg["dropout"]) == (3, 6.0, 0.0)
    assert cfg["targets"] == sorted(ALL | {"mtp"})
    assert set(cfg["modules"]) == {p for p, _ in lora_modules(trained)}
    assert cfg["base"]["fingerprint"] == manifest["fingerprint"] and cfg["base"]["model"] == folder.name

    model, manifest = load_model(folder, "float32")
    got = load_adapter(model, tmp_path / "ad", manifest)
    assert got["modules"] == cfg["modules"]
    assert np.array_equal(np.array(model(toks)), np.array(trained(toks)))
    for k, v in lora_parameters(trained).items():
        assert np.array_equal(np.array(lora_parameters(model)[k]), np.array(v))


def test_an_adapter_for_another_model_is_refused(converted, tmp_path):
    saved_adapter(converted("air-tiny", "mixed"), tmp_path / "ad")
    for folder in (converted("glm45-tiny", "mixed"), converted("air-tiny", "none")):  # other model; other recipe
        model, manifest = load_model(folder, "float32")
        with pytest.raises(ValueError) as e:
            load_adapter(model, tmp_path / "ad", manifest)
        msg = str(e.value)
        assert "\n" not in msg and "trained for model-air-tiny-mixed" in msg and manifest["fingerprint"][:12] in msg
        assert not lora_modules(model)  # left as it was
    # the same architecture and recipe, other weights
    model, manifest = load_model(converted("air-tiny", "mixed"), "float32")
    other = {**manifest, "files": {**manifest["files"], "weights/main.safetensors": {"size": 1, "sha256": "0" * 64}}}
    with pytest.raises(ValueError, match="other weights"):
        load_adapter(model, tmp_path / "ad", other)


def _flip(p):
    b = bytearray(p.read_bytes())
    b[-3] ^= 0xFF
    p.write_bytes(bytes(b))


@pytest.mark.parametrize("damage, file, says", [
    (lambda d: (d / ADAPTER_WEIGHTS).unlink(), ADAPTER_WEIGHTS, "missing"),
    (lambda d: _flip(d / ADAPTER_WEIGHTS), ADAPTER_WEIGHTS, "checksum"),
    (lambda d: (d / ADAPTER_CONFIG).unlink(), ADAPTER_CONFIG, "missing"),
    (lambda d: (d / ADAPTER_CONFIG).write_text("{\"rank\": "), ADAPTER_CONFIG, "corrupt"),
    (lambda d: (d / ADAPTER_CONFIG).write_text("{}"), ADAPTER_CONFIG, "corrupt"),
])
def test_a_missing_or_corrupt_adapter_file_is_named(damage, file, says, converted, tmp_path):
    folder = converted("air-tiny")
    saved_adapter(folder, tmp_path / "ad")
    damage(tmp_path / "ad")
    model, manifest = load_model(folder, "float32")
    with pytest.raises(ValueError) as e:
        load_adapter(model, tmp_path / "ad", manifest)
    assert str(tmp_path / "ad" / file) in str(e.value) and says in str(e.value) and "\n" not in str(e.value)
    assert not lora_modules(model)


# -- fusing ----------------------------------------------------------------------

@pytest.mark.parametrize("preset", ["air-tiny", "glm45-tiny"])
def test_fused_float_model_equals_base_plus_adapter(preset, converted, tmp_path):
    folder = converted(preset, "none")
    model, _ = saved_adapter(folder, tmp_path / "ad")
    toks = tokens(model.args.vocab_size)
    want = np.array(model(toks))
    plain = {k for k, _ in tree_flatten(load_model(folder, "float32")[0].parameters())}

    report = fuse_model(model)
    assert not lora_modules(model)
    assert {k for k, _ in tree_flatten(model.parameters())} == plain  # folded back into the same layers
    assert rel_err(np.array(model(toks)), want) < 1e-5
    assert report["worst"]["rel_err"] == 0.0  # float32 + float32: nothing to round

    # a folder in float32 is exact
    fuse_folder(folder, tmp_path / "ad", tmp_path / "fused32", dtype="float32")
    fused, _ = glm_mlx.load(tmp_path / "fused32", dtype="float32")
    assert rel_err(np.array(fused(toks)), want) < 1e-5
    # one that keeps the source's bf16 rounds each sum once (2^-9 at most). A
    # token whose router then picks another expert moves by far more, so the
    # bound is on the typical token; the whole-tensor error is printed.
    rep = fuse_folder(folder, tmp_path / "ad", tmp_path / "fused16")
    assert {m["kind"] for m in rep["modules"].values()} == {"bfloat16"} and rep["worst"]["rel_err"] < 2**-9
    fused, _ = glm_mlx.load(tmp_path / "fused16", dtype="float32")
    got = np.array(fused(toks))
    per_token = np.linalg.norm(got - want, axis=-1) / np.linalg.norm(want, axis=-1)
    print(f"\n{preset} fused bf16 folder: logits rel err {rel_err(got, want):.2e}, per token median "
          f"{np.median(per_token):.2e}, {int((per_token > 1e-2).sum())} of {per_token.size} tokens past 1e-2; "
          f"{describe(rep)}")
    assert np.median(per_token) < 1e-2


def test_fused_quantized_folder_loads_and_its_error_is_reported(converted, tmp_path):
    folder = converted("air-tiny", "mixed")
    # |scale * B @ A| / |W| about 1%: the size of a real fine-tune's update
    model, manifest = saved_adapter(folder, tmp_path / "ad", std=0.005)
    toks = tokens(model.args.vocab_size, B=4, T=64)  # enough tokens that a few routing flips do not decide
    base = np.array(load_model(folder, "float32")[0](toks))
    want = np.array(model(toks))

    report = fuse_folder(folder, tmp_path / "ad", tmp_path / "fused")
    fused, _ = glm_mlx.load(tmp_path / "fused", dtype="float32")
    got = np.array(fused(toks))
    err = rel_err(got, want)

    def per_token(a, b):
        return float(np.median(np.linalg.norm(a - b, axis=-1) / np.linalg.norm(b, axis=-1)))

    print(f"\nmixed: the adapter moves the logits by {rel_err(want, base):.4f} (per token median "
          f"{per_token(want, base):.4f}); the fused folder is {err:.4f} from base + adapter (median "
          f"{per_token(got, want):.4f}); {describe(report)}")
    for kind in ("4-bit", "8-bit"):
        mods = [m for m in report["modules"].values() if m["kind"] == kind]
        print(f"  {kind}: {len(mods)} modules, stored-weight error max {max(m['rel_err'] for m in mods):.2e}, "
              f"update error mean {np.mean([m['update_err'] for m in mods]):.2f}")
    assert err < 5e-2
    assert per_token(got, want) < 0.75 * per_token(want, base)  # fusing keeps much of the update, if not all
    assert 0 < report["worst"]["rel_err"] < 0.1 and report["worst"]["kind"] == "4-bit"
    # the folder holds exactly what fuse_model makes in memory
    fuse_model(model)
    assert rel_err(got, np.array(model(toks))) < 1e-6

    m = json.loads((tmp_path / "fused" / "glm_mlx.json").read_text())
    assert m["fingerprint"] != manifest["fingerprint"]
    assert m["fused_from"]["base"] == {"fingerprint": manifest["fingerprint"], "model": folder.name}
    assert m["experts"].keys() == manifest["experts"].keys() and m["quantization"] == manifest["quantization"]
    # a normal model folder: the adapter's own base check now refuses it
    with pytest.raises(ValueError, match="trained for"):
        load_adapter(fused, tmp_path / "ad", m)


def test_fusing_a_zero_update_rewrites_the_same_bytes(converted, tmp_path):
    """Re-quantizing dequantized weights keeps their own grid: nothing is lost."""
    folder = converted("glm45-tiny", "mixed")
    saved_adapter(folder, tmp_path / "ad", targets=ALL | {"mtp"}, std=0.0)
    report = fuse_folder(folder, tmp_path / "ad", tmp_path / "fused")
    assert report["worst"]["rel_err"] == 0.0
    before = json.loads((folder / "glm_mlx.json").read_text())["files"]
    after = json.loads((tmp_path / "fused" / "glm_mlx.json").read_text())["files"]
    assert after == before


def test_fuse_refuses_an_occupied_folder_and_leaves_none_half_written(converted, tmp_path):
    folder = converted("air-tiny")
    saved_adapter(folder, tmp_path / "ad")
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "x").write_text("mine")
    with pytest.raises(ValueError, match="busy: exists and is not empty"):
        fuse_folder(folder, tmp_path / "ad", tmp_path / "busy")
    shutil.rmtree(tmp_path / "ad")
    saved_adapter(converted("glm45-tiny"), tmp_path / "ad")
    with pytest.raises(ValueError, match="trained for"):
        fuse_folder(folder, tmp_path / "ad", tmp_path / "out")
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.partial").exists()


def test_fuse_never_removes_a_partial_folder_it_did_not_make(converted, tmp_path):
    """OUT.partial is where fuse builds OUT: one holding the user's files is refused before any work,
    untouched; one a fuse left behind (its mark inside) is replaced."""
    from glm_mlx.fuse import PARTIAL_MARK

    folder = converted("air-tiny")
    saved_adapter(folder, tmp_path / "ad")
    (tmp_path / "out.partial").mkdir()
    (tmp_path / "out.partial" / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="out.partial: exists and is not a fuse's unfinished output"):
        fuse_folder(folder, tmp_path / "ad", tmp_path / "out")
    assert (tmp_path / "out.partial" / "notes.txt").read_text() == "mine" and not (tmp_path / "out").exists()
    (tmp_path / "afile").write_text("mine")
    with pytest.raises(ValueError, match="afile: exists and is not a folder"):
        fuse_folder(folder, tmp_path / "ad", tmp_path / "afile")
    (tmp_path / "out.partial" / "notes.txt").unlink()
    (tmp_path / "out.partial" / PARTIAL_MARK).touch()  # as a fuse cut short leaves it
    fuse_folder(folder, tmp_path / "ad", tmp_path / "out")
    assert not (tmp_path / "out.partial").exists() and not (tmp_path / "out" / PARTIAL_MARK).exists()
    assert (tmp_path / "out" / "glm_mlx.json").is_file()


def test_fuse_explains_its_update_error_and_what_to_do_when_it_is_large(converted, tmp_path):
    from glm_mlx.fuse import LARGE_UPDATE_ERROR, explain

    for recipe, std in (("none", 0.05), ("mixed", 0.0005)):  # bf16 holds this update; 4 bits round a tiny one away
        folder = converted("air-tiny", recipe)
        saved_adapter(folder, tmp_path / recipe, std=std)
        report = fuse_folder(folder, tmp_path / recipe, tmp_path / f"f-{recipe}")
        worst, lines = report["worst_update"]["update_err"], explain(report)
        print(recipe, lines)
        assert (worst > LARGE_UPDATE_ERROR) == (recipe == "mixed"), (recipe, worst)
        assert f"{worst:.2e}" in lines[0] and report["worst_update"]["module"] in lines[0]
        assert ("--quant none" in lines[1] and "--adapter" in lines[1]) == (recipe == "mixed")
    p = cli("fuse", "--model", folder, "--adapter", tmp_path / recipe, "--out", tmp_path / "f-cli", check_ok=True)
    assert all(line in p.stderr for line in lines)


@pytest.mark.parametrize("edit, says", [
    (lambda c, w: c.update(alpha=float("nan")), "corrupt or not a glm-mlx adapter config"),
    (lambda c, w: c.update(alpha=float("inf")), "corrupt or not a glm-mlx adapter config"),
    (lambda c, w: c.update(rank=8.5), "corrupt or not a glm-mlx adapter config"),
    (lambda c, w: c.update(rank=True), "corrupt or not a glm-mlx adapter config"),
    (lambda c, w: w.update({k: mx.full(v.shape, float("nan")) for k, v in list(w.items())[:1]}), "not finite"),
])
def test_an_adapter_that_is_not_numbers_is_refused(converted, tmp_path, edit, says):
    """An adapter whose scale or factors are not finite numbers would make every logit nan, silently."""
    from convert.safetensors_io import sha256_file

    from glm_mlx.lora import ADAPTER_CONFIG, ADAPTER_WEIGHTS, load_adapter

    folder = converted("air-tiny")
    saved_adapter(folder, tmp_path / "ad", std=0.1)
    cpath, wpath = tmp_path / "ad" / ADAPTER_CONFIG, tmp_path / "ad" / ADAPTER_WEIGHTS
    config, weights = json.loads(cpath.read_text()), dict(mx.load(str(wpath)))
    edit(config, weights)
    mx.save_safetensors(str(wpath), weights)
    config["weights"]["sha256"] = sha256_file(wpath)  # a consistent folder: only its numbers are wrong
    cpath.write_text(json.dumps(config))
    model, manifest = load_model(folder)
    with pytest.raises(ValueError, match=says):
        load_adapter(model, tmp_path / "ad", manifest)
