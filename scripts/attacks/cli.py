"""Options of generate, chat and demo that are not numbers, or not sensible ones (items 32.6-32.8, 32.13,
33.9, 33.13): each refused in one line before a model is loaded, naming the option."""

from __future__ import annotations

from attacks import Lab, Problem, case

GENERATE = ("generate", "-p", "hi", "-n", "2")


BAD_OPTIONS = [  # (item, the option and its value, the name the error must give)
    ("32.6", ("--dtype", "int8"), "--dtype"), ("32.6", ("--dtype", "fp8"), "--dtype"),
    ("33.13", ("--dtype", "bogus"), "--dtype"), ("32.6", ("--temp", "-1"), "--temp"),
    ("33.9", ("--temp", "nan"), "--temp"), ("33.9", ("--temp", "inf"), "--temp"), ("32.6", ("--top-p", "2"), "--top-p"),
    ("33.9", ("--top-p", "0"), "--top-p"), ("33.9", ("--top-p", "nan"), "--top-p"),
    ("33.9", ("--top-p", "-1"), "--top-p"),
    ("33.13", ("--seed", "-1"), "--seed"), ("33.13", ("--seed", str(2**64)), "--seed"),
    ("32.6", ("--expert-memory", "0"), "--expert-memory"), ("32.6", ("--expert-memory", "1.2.3GB"), "--expert-memory"),
    ("32.6", ("-n", "-5"), "--max-tokens"), ("33.13", ("--token-ids", "1,x"), "--token-ids"),
    ("33.13", ("--token-ids", "99999999"), "vocabulary"),
]


def _bad_option(args: tuple[str, ...], needle: str):
    def run(lab: Lab) -> str:
        prompt = () if args[0] == "--token-ids" else ("-p", "hi")
        return lab.cli("generate", "-n", "2", "-m", lab.model(), *prompt, *args).refused(needle)
    return run


for _item, _args, _needle in BAD_OPTIONS:
    case(_item, "generate " + " ".join(_args), f"error naming {_needle}")(_bad_option(_args, _needle))


@case("32.6", "chat --context 0", "error naming --context")
def chat_context_zero(lab: Lab) -> str:
    return lab.cli("chat", "-m", lab.model(), "--context", "0").refused("--context")


@case("32.6", "chat --context above the model's maximum", "error naming the maximum")
def chat_context_huge(lab: Lab) -> str:
    return lab.cli("chat", "-m", lab.model(), "--context", "99999999").refused("maximum")


@case("32.8", "generate -p - with invalid UTF-8 on stdin", "error: stdin is not UTF-8")
def stdin_not_utf8(lab: Lab) -> str:
    return lab.cli("generate", "-m", lab.model(), "-p", "-", stdin=b"\xff\xfe\xfa").refused("UTF-8")


@case("32.8", "generate -m a file, not a folder", "error: not a folder")
def model_is_a_file(lab: Lab) -> str:
    f = lab.tmp() / "weights.bin"
    f.write_bytes(b"\0" * 10)
    return lab.cli(*GENERATE, "-m", f).refused("not a folder")


@case("32.8", "generate -m a repo id not converted, no terminal to ask", "error saying what --yes would do")
def repo_not_converted(lab: Lab) -> str:
    return lab.cli(*GENERATE, "-m", "zai-org/Nothing-Here").refused("--yes")


@case("32.13", "demo --preset nope", "error before anything is written")
def demo_bad_preset(lab: Lab) -> str:
    d = lab.tmp() / "demo"
    line = lab.cli("demo", "--dir", d, "--preset", "nope").refused("nope")
    if d.exists():
        raise Problem(f"{d} was written before the refusal")
    return line


@case("33.13", "bench --seed -1", "error naming --seed")
def bench_seed(lab: Lab) -> str:
    return lab.cli("bench", "--seed", "-1").refused("--seed")


@case("33.14", "bench --prompts 99999999", "error naming the shape's maximum, nothing allocated")
def bench_huge_prompt(lab: Lab) -> str:
    return lab.cli("bench", "--runtime", "ours", "--prompts", "99999999", "--contexts", "0").refused("above")
