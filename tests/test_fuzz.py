"""Fuzzing the command line and the config loader: random config values, flags and file contents.

Whatever comes in, the only outcomes allowed are success and the project's user error: exit
status 2 with one ``error: ...`` line on stderr (after any ``note: ...`` lines) and no traceback
(argparse's own exit 2, for a flag that does not parse, counts too). Anything else (an exception from deep inside, another
exit status, a message over several lines) fails the test with the example that caused it.

The strategies keep a run that succeeds cheap: a size is tiny, or invalid, or so huge that the
memory check refuses it before anything is allocated; loop counts (steps, evaluation batches,
tokens to generate) are small or invalid, never huge; nothing compiles or downloads. The default
run is a few examples per command, the same ones each time (derandomized); the ``slow`` run
draws many more (a fixed set too; FUZZ_FRESH=1 draws afresh).
"""

from __future__ import annotations

import contextlib
import io
import os
import signal
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, event, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from mini_transformer.cli import main  # noqa: E402
from mini_transformer.config import Config, load_config  # noqa: E402
from mini_transformer.errors import UserError  # noqa: E402

_COMMON = dict(deadline=None, database=None, print_blob=True,
               suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
FAST = settings(max_examples=12, derandomize=True, **_COMMON)
# The long run draws afresh only when asked (FUZZ_FRESH=1): in CI it is a fixed, larger set, so a
# new finding shows up on a developer's run instead of failing an unrelated change.
LONG = settings(max_examples=300, derandomize=os.environ.get("FUZZ_FRESH") != "1", **_COMMON)
# Each target runs twice: the default (the same few examples every run) and, under slow, many fresh ones.
BUDGETS = [pytest.param(FAST, id="default"), pytest.param(LONG, id="long", marks=pytest.mark.slow)]
EXAMPLE_SECONDS = int(os.environ.get("FUZZ_EXAMPLE_SECONDS", "60"))  # a first run imports torch's compiler: seconds


# -- running the CLI in-process -----------------------------------------------------------------

@contextlib.contextmanager
def inside(directory: Path) -> Iterator[None]:
    """Run in ``directory``: the defaults (out, data/cache) are relative paths."""
    before = os.getcwd()
    os.chdir(directory)
    try:
        yield
    finally:
        os.chdir(before)


class TookTooLong(Exception):
    pass


@contextlib.contextmanager
def time_limit(seconds: int) -> Iterator[None]:
    """Fail an example that runs past ``seconds`` (a hang, or work the strategies should not make)."""
    if not hasattr(signal, "SIGALRM"):  # Windows
        yield
        return

    def expire(signum, frame):
        raise TookTooLong(f"the command ran longer than {seconds} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def assert_success_or_user_error(argv: list[str]) -> None:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err), time_limit(EXAMPLE_SECONDS):
        try:
            status = main(argv)
        except SystemExit as exc:  # argparse: a flag that does not parse
            assert exc.code == 2, f"SystemExit({exc.code!r}) for {argv}"
            event("argparse")
            return
    # What the examples came to (pytest --hypothesis-show-statistics): successes must not be rare.
    event("success" if status == 0 else " ".join(err.getvalue().split()[:4]))
    if status == 0:
        return
    # The error is one line, and the last; only notes (what generate says about a prompt) come before it.
    *notes, last = err.getvalue().splitlines() or [""]
    assert status == 2, f"exit status {status} for {argv}; stderr: {err.getvalue()!r}"
    assert last.startswith("error: ") and all(line.startswith("note: ") for line in notes), \
        f"not one error line: {err.getvalue()!r}"


@pytest.fixture(scope="module", autouse=True)
def _no_matmul_probe():
    """A training run times the device's matmul rate for MFU (half a second); not what is fuzzed."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr("mini_transformer.training.loop.measure_matmul_flops", lambda *args, **kwargs: 1e12)
        yield


# -- values ---------------------------------------------------------------------------------------

def as_text(value: Any) -> str:
    """A value as typed on the command line (parsed as YAML there)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    return value if isinstance(value, str) else repr(value)


# Values no key accepts, or only some: zero and negatives, fractions, words, YAML's other types.
BAD = st.one_of(
    st.integers(-3, 0),
    st.floats(-1e3, 1e3, allow_nan=False),
    st.text(max_size=6),
    st.none(),
    st.booleans(),
    st.sampled_from([".nan", ".inf", "-.inf", "[1, 2]", "{a: 1}", "~", "''", "1e400", "0x10", "2001-12-14", "[", "*x"]),
)
# Sizes so large that no machine holds the model, its activations or its cache: refused by the
# memory check before anything is allocated (at most 10**18: the sizes are int64 for torch).
HUGE = st.integers(10**12, 10**18)


@st.composite
def mostly(draw, valid: st.SearchStrategy, bad: st.SearchStrategy) -> Any:
    """A valid value four times in five: enough runs get past the checks to train or generate."""
    return draw(valid) if draw(st.integers(0, 4)) else draw(bad)


def sized(*valid: Any) -> st.SearchStrategy:
    return mostly(st.sampled_from(valid), st.one_of(BAD, HUGE))


def choice(*valid: Any) -> st.SearchStrategy:
    return mostly(st.sampled_from(valid), BAD)


def fraction() -> st.SearchStrategy:
    return mostly(st.floats(0, 1, allow_nan=False), BAD)


# Every key of a training config, with values that keep a successful run to a second or so.
TRAIN_KEYS: dict[str, st.SearchStrategy] = {
    "model.vocab_size": sized(None, 100, 10),
    "model.d_model": sized(8, 16, 32),
    "model.n_heads": sized(1, 2, 4),
    "model.n_kv_heads": sized(None, 1, 2),
    "model.n_layers": sized(1, 2),
    "model.block_size": sized(4, 8, 16),
    "model.dropout": fraction(),
    "model.ffn_hidden_size": sized(None, 8, 24),
    "model.norm": choice("layernorm", "rmsnorm"),
    "model.norm_eps": choice(1e-5, 1e-12),
    "model.rope_base": choice(10000.0, 1.0, 1e9),
    "model.tie_embeddings": choice(True, False),
    "model.bias": choice(True, False),
    "model.attention": choice("auto", "sdpa", "flash", "math"),
    "model.init_std": choice(0.02, 0.0, 10.0),
    "model.activation": choice("swiglu", "relu2"),
    "model.qk_norm": choice(True, False),
    "model.logit_softcap": choice(None, 30.0, 1e-9, 0.0),
    "model.zero_init_projections": choice(True, False),
    "training.batch_size": sized(1, 2, 4),
    "training.learning_rate": choice(3e-4, 1e-9, 1e6),
    "training.max_iters": st.one_of(st.sampled_from([1, 2]), st.integers(-2, 0)),
    "training.max_seconds": choice(None, 0.0, 1e-9, 100.0),
    "training.warmup_iters": choice(0, 1, 5, 10**12),
    "training.lr_schedule": choice("cosine", "linear", "constant"),
    "training.lr_decay_iters": choice(None, 1, 2, 10**12),
    "training.min_lr": choice(None, 0.0, 1e-4, 1.0),
    "training.weight_decay": choice(0.0, 0.1, 100.0),
    "training.beta1": fraction(),
    "training.beta2": fraction(),
    "training.eps": choice(1e-8, 1e-30),
    "training.grad_clip": choice(0.0, 1.0, 1e-12),
    "training.gradient_accumulation_steps": st.one_of(st.sampled_from([1, 2]), st.integers(-2, 0)),
    "training.global_batch_size": st.one_of(st.sampled_from([None, 1, 2, 3, 4]), st.integers(-2, 0)),
    "training.dropout_end": st.one_of(st.none(), fraction()),
    "training.dropout_anneal": choice("linear", "cosine"),
    "training.dropout_anneal_fraction": fraction(),
    "training.eval_interval": choice(1, 2, 10**12),
    "training.eval_iters": st.one_of(st.sampled_from([1, 2]), st.integers(-2, 0)),
    "training.log_interval": choice(1, 10**12),
    "training.always_save_checkpoint": choice(True, False),
    "training.keep_last": choice(1, 3, 10**12),
    "training.max_bad_steps": choice(1, 5, 10**12),
    "training.init_from": choice(None, "nowhere", ".", "out"),
    "training.seed": st.one_of(st.integers(-(2**70), 2**70), BAD),
    "training.device": choice("cpu", "auto", "cuda", "cuda:7", "mps", "meta", "tpu", "cpu:1", ""),
    "training.dtype": choice("auto", "fp32", "bf16", "fp16"),
    # Never true: torch.compile takes tens of seconds (and YAML's yes/on are true).
    "training.compile": st.sampled_from(["false", "no", "1", "maybe", "null"]),
    "training.gradient_checkpointing": choice(True, False),
    "training.distributed": choice("auto", "none", "ddp", "fsdp"),
    "training.backend": choice("auto", "gloo", "nccl"),
    "training.dist_timeout_s": choice(300.0, 0.0, 1e-9),
    "training.tensorboard": st.sampled_from(["false", "0", "x"]),  # TensorBoard's import alone takes seconds
    "training.out_dir": choice("out", "input.txt", "input.txt/out", "."),
    "data.cache_dir": choice("cache", "input.txt", "input.txt/cache"),
    "data.path": choice("input.txt", "missing.txt", ".", "cache", "out"),
    "data.dataset": choice(None, "nonexistent", "Shakespeare"),
    "data.tokenizer": choice("char", "byte", "bpe"),
    "data.bpe_vocab_size": sized(260, 300, 600),
    "data.bpe_train_bytes": sized(None, 1, 100),
    "data.val_fraction": fraction(),
    "advanced.use_lora": choice(True, False),
    "advanced.lora_rank": sized(1, 4),
    "advanced.lora_targets": choice("attention", "ffn", "attention,ffn", "[attention, ffn]", "mlp", "[]"),
    "advanced.log_attention": choice(True, False),
}
# Keys that are not keys: misspelt, sectionless, unknown sections, no value.
NOT_KEYS = st.sampled_from(["--model.d_modle", "--d_model", "--foo.bar", "--model", "--model.", "--.x",
                            "--training.max_iters=", "--model.d_model=8=8", "-x", "--", "x"])
# Not --force: it skips the memory check, and the huge sizes here then allocate until the allocator throws.
CLI_FLAGS = st.sampled_from(["--resume", "--quiet", "--preset", "tiny", "--preset", "nope", "--bogus"])


@st.composite
def overrides(draw, keys: dict[str, st.SearchStrategy], max_keys: int = 5) -> list[str]:
    """``--section.key value`` pairs (some as ``--section.key=value``), and now and then a stray token."""
    argv: list[str] = []
    for key in draw(st.lists(st.sampled_from(sorted(keys)), max_size=max_keys, unique=True)):
        value = as_text(draw(keys[key]))
        argv += [f"--{key}={value}"] if draw(st.booleans()) else [f"--{key}", value]
    if draw(st.integers(0, 9)) == 0:
        argv.insert(draw(st.integers(0, len(argv))), draw(st.one_of(NOT_KEYS, CLI_FLAGS)))
    return argv


# Text to tokenize: mostly enough for a few windows, sometimes too little, or not UTF-8 at all.
CORPUS = mostly(
    st.builds(lambda text: (text * (1 + 600 // len(text))).encode("utf-8"), st.text(min_size=1, max_size=40)),
    st.one_of(st.text(max_size=40).map(lambda text: text.encode("utf-8")), st.binary(max_size=400)),
)

# YAML documents: random text, and random nested data written as YAML.
YAML_DATA = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.floats(), st.text(max_size=8)),
    lambda inner: st.one_of(st.lists(inner, max_size=3),
                            st.dictionaries(st.one_of(st.sampled_from(["model", "training", "data", "generation",
                                                                       "advanced", "d_model", "max_iters",
                                                                       "batch_size", "temperature", "lora_rank"]),
                                                      st.text(max_size=6)), inner, max_size=4)),
    max_leaves=12,
)


def yaml_dump(data: Any) -> str:
    import yaml

    return yaml.safe_dump(data, allow_unicode=True)


# Config files are random text (UTF-8): a file of random bytes is for when non-UTF-8 config files are
# refused in one line like any other unreadable config.
CONFIG_TEXT = st.one_of(st.text(max_size=200), YAML_DATA.map(yaml_dump),
                        st.sampled_from(["model: {d_model: 16}", "- a\n- b", "a: [", "model: 3", "? [a, b]\n: c",
                                         "&a [*a]", "!!python/object:os.system {}", "model:\n  d_model: !!binary AA=="]))


# -- the config loader ------------------------------------------------------------------------------

def check_config_loader(text: str, argv: list[str], preset: str | None, raw: Any) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "config.yaml"
        path.write_text(text, encoding="utf-8")
        for load in (lambda: load_config(path, preset=preset, overrides=argv),
                     lambda: load_config(overrides=argv), lambda: Config.from_dict(raw)):
            try:
                config = load()
            except UserError as exc:
                assert "\n" not in str(exc).strip(), repr(str(exc))
            else:
                assert isinstance(config, Config)


CONFIG_CASE = dict(text=CONFIG_TEXT, argv=overrides(TRAIN_KEYS, max_keys=12),
                   preset=st.sampled_from([None, "tiny", "small", "gpt2", "nope", "../config", ""]),
                   raw=st.one_of(YAML_DATA, st.dictionaries(st.sampled_from(["model", "training", "data"]),
                                                            st.dictionaries(st.sampled_from(
                                                                [k.split(".")[1] for k in TRAIN_KEYS]),
                                                                YAML_DATA, max_size=3), max_size=3)))


@pytest.mark.parametrize("budget", BUDGETS)
def test_config_loader_fuzz(budget):
    budget(given(**CONFIG_CASE)(check_config_loader))()


# -- train --------------------------------------------------------------------------------------------

def check_train(corpus: bytes, argv: list[str], config_text: str | None) -> None:
    with tempfile.TemporaryDirectory() as tmp, inside(Path(tmp)):
        Path("input.txt").write_bytes(corpus)
        base = ["train", "--quiet", "--data.path", "input.txt", "--training.tensorboard", "false",
                "--training.max_iters", "2", "--training.eval_iters", "1", "--model.d_model", "16",
                "--model.n_heads", "2", "--model.n_layers", "1", "--model.block_size", "8",
                "--training.batch_size", "2", "--training.device", "cpu"]
        if config_text is not None:
            Path("config.yaml").write_text(config_text, encoding="utf-8")
            base += ["--config", "config.yaml"]
        assert_success_or_user_error(base + argv)


TRAIN_CASE = dict(corpus=CORPUS, argv=overrides(TRAIN_KEYS), config_text=mostly(st.none(), CONFIG_TEXT))


@pytest.mark.parametrize("budget", BUDGETS)
def test_train_fuzz(budget):
    budget(given(**TRAIN_CASE)(check_train))()


# -- prepare ----------------------------------------------------------------------------------------

PREPARE_FLAGS: dict[str, st.SearchStrategy] = {
    "--tokenizer": st.sampled_from(["char", "byte", "bpe", "wordpiece", ""]),
    "--vocab_size": sized(260, 300, 1000),
    "--bpe_train_bytes": sized(1, 50),
    "--val_fraction": fraction(),
    "--out": st.sampled_from(["out", "input.txt", ".", "a/b/c", ""]),
    "--block_size": sized(1, 8, 100),
    "--chunk_size": sized(1, 3, 64),
    "--dataset": st.sampled_from(["nonexistent", "", "Shakespeare "]),
}


@st.composite
def prepare_argv(draw) -> list[str]:
    inputs = draw(st.lists(st.sampled_from(["input.txt", "input.txt", "missing.txt", "dir", "dir/*.txt", "*.md",
                                            "empty.txt"]), min_size=1, max_size=3))
    argv = ["prepare", "--quiet", "--input", *inputs]
    for flag in draw(st.lists(st.sampled_from(sorted(PREPARE_FLAGS)), max_size=5, unique=True)):
        argv += [flag, as_text(draw(PREPARE_FLAGS[flag]))]
    return argv


def check_prepare(corpus: bytes, argv: list[str]) -> None:
    with tempfile.TemporaryDirectory() as tmp, inside(Path(tmp)):
        Path("input.txt").write_bytes(corpus)
        Path("empty.txt").write_bytes(b"")
        Path("dir").mkdir()
        (Path("dir") / "a.txt").write_bytes(corpus[::-1])
        assert_success_or_user_error(argv)


@pytest.mark.parametrize("budget", BUDGETS)
def test_prepare_fuzz(budget):
    budget(given(corpus=CORPUS, argv=prepare_argv())(check_prepare))()


# -- generate -------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """A tiny trained run directory (two steps on a short text)."""
    from mini_transformer.training import train

    directory = tmp_path_factory.mktemp("fuzz-run")
    (directory / "input.txt").write_text("the quick brown fox jumps over the lazy dog\n" * 20)
    config = load_config(overrides=[
        "--model.d_model", "16", "--model.n_heads", "2", "--model.n_layers", "1", "--model.block_size", "8",
        "--training.batch_size", "2", "--training.max_iters", "2", "--training.eval_iters", "1",
        "--training.device", "cpu", "--training.tensorboard", "false", "--training.out_dir", str(directory / "out"),
        "--data.path", str(directory / "input.txt"), "--data.cache_dir", str(directory / "cache")])
    train(config, progress=False, log=None)
    return directory / "out"


GENERATION_KEYS: dict[str, st.SearchStrategy] = {
    "generation.max_tokens": st.one_of(st.sampled_from([0, 1, 3]), st.integers(-2, -1)),
    "generation.temperature": choice(0.0, 0.8, 1e-30, 1e30),
    "generation.top_k": sized(None, 1, 5),
    "generation.top_p": st.one_of(st.none(), fraction()),
    "generation.min_p": st.one_of(st.none(), fraction()),
    "generation.repetition_penalty": choice(1.0, 1.3, 1e30),
    "generation.stop": choice("\\n", "e", "[a, b]", "[]"),
    "generation.context_keep": sized(None, 0, 1, 4, 8),
    "generation.compile_decode": st.sampled_from(["false", "0"]),  # compiling takes seconds
    "generation.decode_dtype": choice("auto", "fp32", "bf16", "fp16"),
    "advanced.quantize": choice(None, "int8", "int4"),
    "advanced.quantize_group_size": sized(4, 8, 16),
    "advanced.quantize_embedding": choice(True, False),
    "advanced.draft_checkpoint": choice(None, "CKPT", "nowhere"),
    "advanced.speculative_gamma": sized(1, 2),
    "advanced.log_attention": choice(False),
    "training.out_dir": choice("CKPT", "nowhere"),
    "model.d_model": choice(8),
}
# Flag values for generate: no nan or inf (a non-finite sampling setting's own check is elsewhere);
# max_tokens never huge (that runs long, correctly).
FLOAT = st.one_of(st.floats(-2, 2, allow_nan=False), st.sampled_from([0.0, 1e-30, 1e30]))
WORD = st.text(max_size=3)
GENERATE_FLAGS: dict[str, st.SearchStrategy] = {
    "--prompt": st.text(max_size=20),
    "--prompts_file": mostly(st.just("prompts.txt"), st.sampled_from(["missing.txt", "empty.txt", "."])),
    "--max_tokens": mostly(st.integers(0, 4), st.one_of(st.just(-1), WORD)),
    "--stop": st.text(max_size=3),
    "--repetition_penalty": mostly(st.floats(1, 2), FLOAT),
    "--temperature": mostly(st.floats(0, 2), FLOAT),
    "--top_k": mostly(st.integers(1, 100), st.one_of(st.integers(-1, 0), HUGE)),
    "--top_p": mostly(st.floats(0.01, 1), FLOAT),
    "--min_p": mostly(st.floats(0, 1), FLOAT),
    "--seed": mostly(st.integers(-(2**70), 2**70), WORD),
    "--checkpoint": mostly(st.just("CKPT"), st.sampled_from(["nowhere", "prompts.txt", "."])),
    "--config": mostly(st.just("config.yaml"), st.just("missing.yaml")),
    "--device": mostly(st.just("cpu"), st.sampled_from(["auto", "cuda", "mps", "meta", "tpu", "cuda:1", ""])),
    "--dtype": st.sampled_from(["fp32", "bf16", "fp16", "fp8"]),
    "--adapter": st.sampled_from(["nowhere", "CKPT", "."]),
    "--quantize": st.sampled_from(["int8", "int4", "int2"]),
    "--gamma": mostly(st.integers(1, 3), st.one_of(st.integers(-1, 0), HUGE)),
    "--attention_dir": st.sampled_from(["att", "prompts.txt", ""]),
}
GENERATE_SWITCHES = ["--compare_plain", "--log_attention"]  # not --force: see CLI_FLAGS
# Samples streamed or drafted run one after another: never a huge number of those (that runs long,
# correctly). A batch may ask for any number: the memory check refuses what cannot fit.
ONE_AT_A_TIME = st.sampled_from([["--stream"], ["--draft_checkpoint", "CKPT"], ["--draft_checkpoint", "nowhere"],
                                 ["--advanced.speculative_sampling", "true"],
                                 ["--advanced.speculative_sampling=true", "--advanced.draft_checkpoint", "CKPT"]])


@st.composite
def generate_argv(draw) -> list[str]:
    argv = ["generate"]
    for flag in draw(st.lists(st.sampled_from(sorted(GENERATE_FLAGS)), max_size=5, unique=True)):
        argv += [flag, as_text(draw(GENERATE_FLAGS[flag]))]
    argv += draw(st.lists(st.sampled_from(GENERATE_SWITCHES), max_size=2, unique=True))
    argv += draw(overrides(GENERATION_KEYS, max_keys=3))
    if draw(st.booleans()):
        argv += draw(ONE_AT_A_TIME)
        samples = st.integers(-1, 3)
    else:
        samples = mostly(st.integers(1, 3), st.one_of(st.integers(-1, 0), HUGE, WORD))
    if draw(st.booleans()):
        argv += draw(st.sampled_from([["--num_samples"], ["--generation.num_samples"]])) + [as_text(draw(samples))]
    if "--checkpoint" not in argv and not draw(st.integers(0, 4)) == 0:
        argv += ["--checkpoint", "CKPT"]
    if "--device" not in argv:
        argv += ["--device", "cpu"]
    return argv


def check_generate(checkpoint: Path, argv: list[str], prompts: bytes, config_text: str) -> None:
    with tempfile.TemporaryDirectory() as tmp, inside(Path(tmp)):
        Path("prompts.txt").write_bytes(prompts)
        Path("empty.txt").write_bytes(b"")
        Path("config.yaml").write_text(config_text, encoding="utf-8")
        argv = [str(checkpoint) if arg == "CKPT" else arg.replace("CKPT", str(checkpoint)) for arg in argv]
        assert_success_or_user_error(argv)


GENERATE_CASE = dict(argv=generate_argv(), config_text=mostly(st.just(""), CONFIG_TEXT),
                     prompts=st.one_of(st.text(max_size=60).map(lambda s: s.encode("utf-8")), st.binary(max_size=60)))


@pytest.mark.parametrize("budget", BUDGETS)
def test_generate_fuzz(budget, checkpoint):
    def check(argv: list[str], prompts: bytes, config_text: str) -> None:
        check_generate(checkpoint, argv, prompts, config_text)

    budget(given(**GENERATE_CASE)(check))()
