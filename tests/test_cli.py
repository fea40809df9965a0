"""The command itself: version, help, the module entry point, and option validation."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

import glm_mlx
from glm_mlx.cli import app

ROOT = Path(__file__).resolve().parents[1]


def test_version_and_short_help():
    r = CliRunner().invoke(app, ["--version"])
    assert r.exit_code == 0 and r.output.strip() == f"glm-mlx {glm_mlx.__version__}"
    for args in (["-h"], ["generate", "-h"], ["finetune", "-h"]):
        r = CliRunner().invoke(app, args)
        assert r.exit_code == 0 and "Usage" in r.output, (args, r.output)


def test_python_dash_m():
    p = subprocess.run([sys.executable, "-m", "glm_mlx", "--version"], capture_output=True, text=True, cwd=ROOT,
                       env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=120)
    assert p.returncode == 0 and p.stdout.strip() == f"glm-mlx {glm_mlx.__version__}", p.stderr


# -- option validation: one line each, before any model is loaded ------------------------

@pytest.fixture(scope="module")
def model(converted) -> Path:
    return converted("air-tiny", "mixed")


def run(*args, stdin: bytes = b"", env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "glm_mlx", *map(str, args)], capture_output=True, cwd=ROOT,
                          input=stdin, timeout=300, env={**os.environ, "PYTHONPATH": str(ROOT), **(env or {})})


def one_error(p: subprocess.CompletedProcess, *needles: str) -> str:
    err = p.stderr.decode()
    assert p.returncode != 0 and "Traceback" not in err, err[-2000:]
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert all(n in lines[0] for n in needles), lines[0]
    return lines[0]


BAD_OPTIONS = [
    (["--dtype", "int8"], "--dtype"), (["--dtype", "bogus"], "--dtype"),
    (["--temp", "-1"], "--temp"), (["--temp", "nan"], "--temp"), (["--temp", "inf"], "--temp"),
    (["--top-p", "2"], "--top-p"), (["--top-p", "0"], "--top-p"), (["--top-p", "nan"], "--top-p"),
    (["--top-p", "-1"], "--top-p"), (["--seed", "-1"], "--seed"), (["-n", "-1"], "--max-tokens"),
    (["--expert-memory", "0"], "--expert-memory"), (["--expert-memory", "0GB"], "--expert-memory"),
    (["--expert-memory", "1.2.3GB"], "--expert-memory"), (["--expert-memory", "lots"], "--expert-memory"),
]


@pytest.mark.parametrize("args,needle", BAD_OPTIONS, ids=[" ".join(a) for a, _ in BAD_OPTIONS])
def test_generate_refuses_bad_options_in_one_line(model, args, needle):
    one_error(run("generate", "-m", model, "-p", "hi", "-n", "2", *args), needle)


def test_chat_context_bounds(model):
    one_error(run("chat", "-m", model, "--context", "0"), "--context")
    one_error(run("chat", "-m", model, "--context", "10000000"), "--context", "maximum")
    one_error(run("chat", "-m", model, "--top-p", "nan"), "--top-p")


@pytest.mark.parametrize("name", ["float16", "fp16", "bf16", "FP32"])
def test_dtype_names_are_accepted(model, name):
    p = run("generate", "-m", model, "-p", "hi", "-n", "2", "--temp", "0", "--dtype", name)
    assert p.returncode == 0, p.stderr.decode()[-2000:]


def test_prefetch_that_cannot_act_says_so(model):
    p = run("generate", "-m", model, "-p", "hi", "-n", "2", "--temp", "0", "--prefetch")
    assert p.returncode == 0 and "warning: --prefetch does nothing" in p.stderr.decode()
    p = run("generate", "-m", model, "-p", "hi", "-n", "2", "--temp", "0", "--prefetch", "--mtp",
            "--expert-memory", "1KB")
    assert p.returncode == 0 and "--prefetch does nothing with --mtp" in p.stderr.decode(), p.stderr.decode()


def test_prompt_from_stdin_is_the_same_prompt(model):
    args = ("generate", "-m", model, "-n", "4", "--temp", "0", "--no-think")
    given = run(*args, "-p", "tell me about routers")
    piped = run(*args, "-p", "-", stdin="tell me about routers".encode())
    assert given.returncode == 0 and piped.returncode == 0, piped.stderr.decode()
    assert given.stdout == piped.stdout and given.stdout.strip()
    one_error(run(*args, "-p", "-", stdin=b"\xff\xfe bad"), "UTF-8")
    one_error(run(*args, "-p", "-", stdin=b""), "empty")


def test_token_ids_and_model_paths(model, tmp_path):
    one_error(run("generate", "-m", model, "--token-ids", "1,x"), "--token-ids")
    one_error(run("generate", "-m", model, "--token-ids", ""), "--token-ids")
    one_error(run("generate", "-m", tmp_path / "nothing-here", "-p", "hi"), "no such model folder")
    (tmp_path / "file").write_text("x")
    one_error(run("generate", "-m", tmp_path / "file", "-p", "hi"), "not a folder")
    # A repo id never converted, without a terminal to ask on: refused with what --yes would do.
    one_error(run("generate", "-m", "zai-org/Not-Here", "-p", "hi", env={"GLM_MLX_HOME": str(tmp_path)}),
              "--yes", str(tmp_path))


def test_generate_converts_a_repo_id_on_first_use(tmp_path):
    """generate -m REPO --yes downloads (from a stand-in of the Hub) and converts once, as chat does."""
    from test_source import REPO, Hub

    from convert.synthetic import make_config, write_checkpoint

    ckpt = write_checkpoint(tmp_path / "ckpt", make_config("air-tiny"))
    hub = Hub({REPO: {p.name: p.read_bytes() for p in ckpt.iterdir()}})
    env = {"HF_ENDPOINT": hub.url, "HF_HOME": str(tmp_path / "hf"), "HF_HUB_DISABLE_TELEMETRY": "1",
           "HF_HUB_DISABLE_PROGRESS_BARS": "1", "GLM_MLX_HOME": str(tmp_path / "home")}
    try:
        args = ("generate", "-m", REPO, "-p", "hi", "-n", "3", "--temp", "0", "--yes")
        first = run(*args, env=env)
        assert first.returncode == 0, first.stderr.decode()[-3000:]
        folder = tmp_path / "home" / "models" / REPO.replace("/", "--")
        assert (folder / "glm_mlx.json").is_file()
        again = run(*args, env=env)  # converted: no download, the same reply
        assert again.returncode == 0 and again.stdout == first.stdout
        assert "download" not in again.stderr.decode().lower()
    finally:
        hub.close()


def test_no_pytorch_advice_when_torch_is_absent(model):
    """Users have no torch: transformers' "PyTorch was not found" advice must not print on every command."""
    code = ("import importlib.util as u, sys\n"
            "real = u.find_spec\n"
            "u.find_spec = lambda name, package=None: None if name.split('.')[0] == 'torch' else real(name, package)\n"
            "from glm_mlx.cli import main\n"
            f"sys.argv = ['glm-mlx', 'generate', '-m', {str(model)!r}, '-p', 'hi', '-n', '2']\n"
            "main()\n")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=300,
                       env={k: v for k, v in {**os.environ, "PYTHONPATH": str(ROOT)}.items()
                            if k != "TRANSFORMERS_NO_ADVISORY_WARNINGS"})
    assert p.returncode == 0, p.stderr[-2000:]
    assert "PyTorch" not in p.stderr, p.stderr


def test_demo_refuses_an_unknown_preset_before_writing(tmp_path):
    p = run("demo", "--dir", tmp_path / "d", "--preset", "nope")
    one_error(p, "nope", "air-tiny")
    assert not (tmp_path / "d").exists()


def test_bench_bounds():
    r = CliRunner().invoke(app, ["bench", "--seed", "-1"])
    assert r.exit_code == 1 and "--seed" in r.output
    r = CliRunner().invoke(app, ["bench", "--runtime", "ours", "--prompts", "99999999", "--contexts", "0"])
    assert r.exit_code == 1 and "above" in r.output, r.output
