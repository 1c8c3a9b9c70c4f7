"""``generate`` on the command line, with a tiny checkpoint: flags, batches, errors, and the REPL
driven through a pseudo-terminal."""

from __future__ import annotations

import os
import select
import signal
import sys
import time

import numpy as np
import pytest
import torch

from mini_transformer.checkpoint import save_checkpoint
from mini_transformer.config import Config, ModelConfig
from mini_transformer.model import Transformer
from mini_transformer.tokenizer import CharTokenizer

from .conftest import REPO_ROOT

TEXT = "hello world\nthe quick brown fox jumps over the lazy dog\n"


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: one thread is fastest, and robust on a busy machine
    yield
    torch.set_num_threads(before)


def make_checkpoint(directory, seed: int = 0, n_layers: int = 2, **generation) -> str:
    tokenizer = CharTokenizer.from_text(TEXT)
    config = Config()
    config.model = ModelConfig(vocab_size=tokenizer.vocab_size, d_model=32, n_heads=4, n_layers=n_layers,
                               block_size=32, dropout=0.0, init_std=0.3)
    for key, value in generation.items():
        setattr(config.generation, key, value)
    torch.manual_seed(seed)
    model = Transformer(config.model)
    return str(save_checkpoint(directory, 1, model, config, tokenizer))


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> str:
    return make_checkpoint(tmp_path_factory.mktemp("run"), temperature=0.0, max_tokens=12)


def gen(run_cli, ckpt, *args):
    return run_cli("generate", "--checkpoint", ckpt, "--device", "cpu", *args)


def test_prompt_is_continued_and_greedy_is_deterministic(run_cli, ckpt):
    status, out, err = gen(run_cli, ckpt, "--prompt", "hello", "--max_tokens", "15", "--temperature", "0")
    assert status == 0, err
    assert out.startswith("hello") and len(out.rstrip("\n")) >= len("hello")
    assert gen(run_cli, ckpt, "--prompt", "hello", "--max_tokens", "15", "--temperature", "0")[1] == out


def test_defaults_come_from_the_checkpoint_generation_section(run_cli, ckpt):
    _, out, _ = gen(run_cli, ckpt, "--prompt", "the")  # checkpoint: temperature 0, max_tokens 12
    assert len(out) == len("the") + 12 + 1
    assert gen(run_cli, ckpt, "--prompt", "the", "--generation.max_tokens", "5")[1] == out[:3 + 5] + "\n"


def test_stream_prints_the_same_text(run_cli, ckpt):
    plain = gen(run_cli, ckpt, "--prompt", "fox", "--max_tokens", "20")[1]
    assert gen(run_cli, ckpt, "--prompt", "fox", "--max_tokens", "20", "--stream")[1] == plain


def test_seed_makes_sampling_reproducible(run_cli, ckpt):
    args = ("--prompt", "dog", "--max_tokens", "30", "--temperature", "1.0", "--top_k", "10", "--top_p", "0.95",
            "--min_p", "0.01", "--repetition_penalty", "1.2")
    a = gen(run_cli, ckpt, *args, "--seed", "1")[1]
    assert a == gen(run_cli, ckpt, *args, "--seed", "1")[1]
    assert a != gen(run_cli, ckpt, *args, "--seed", "2")[1]


def test_num_samples_prints_each(run_cli, ckpt):
    status, out, _ = gen(run_cli, ckpt, "--prompt", "the", "--num_samples", "3", "--temperature", "1", "--seed", "0")
    assert status == 0
    assert [line for line in out.splitlines() if line.startswith("--- sample")] == [
        "--- sample 1 ---", "--- sample 2 ---", "--- sample 3 ---"]


def test_prompts_file_is_one_batch_equal_to_single_prompts(run_cli, ckpt, tmp_path):
    prompts = ["hello", "the quick brown", "z"]
    path = tmp_path / "prompts.txt"
    path.write_text("\n".join(prompts) + "\n\n")
    status, out, err = gen(run_cli, ckpt, "--prompts_file", str(path), "--max_tokens", "10")
    assert status == 0, err
    blocks = out.split("--- prompt ")[1:]
    assert len(blocks) == 3
    for prompt, block in zip(prompts, blocks):
        alone = gen(run_cli, ckpt, "--prompt", prompt, "--max_tokens", "10")[1]
        assert block.split("---\n", 1)[1] == alone


def test_stop_string_cuts_the_output(run_cli, ckpt):
    full = gen(run_cli, ckpt, "--prompt", "h", "--max_tokens", "25")[1].rstrip("\n")
    stop = full[6:8]
    out = gen(run_cli, ckpt, "--prompt", "h", "--max_tokens", "25", "--stop", stop)[1].rstrip("\n")
    assert out == "h" + full[1:][:full[1:].index(stop)]


def test_empty_prompt_starts_from_a_newline_and_says_so(run_cli, ckpt):
    status, out, err = gen(run_cli, ckpt, "--max_tokens", "5")
    assert status == 0
    assert "empty prompt" in err and "newline" in err


@pytest.mark.parametrize("flags", [
    ["--temperature", "-1"], ["--top_k", "0"], ["--top_p", "0"], ["--top_p", "1.5"], ["--max_tokens", "-3"],
    ["--num_samples", "0"], ["--min_p", "2"],
])
def test_bad_flags_are_one_line_errors(run_cli, flags):
    status, out, err = run_cli("generate", "--checkpoint", "/nonexistent", "--prompt", "x", *flags)
    assert status == 2
    assert err.startswith("error: ") and err.count("\n") == 1
    assert flags[0] in err


def test_missing_checkpoint_and_unknown_characters_are_user_errors(run_cli, ckpt, tmp_path):
    status, _, err = run_cli("generate", "--checkpoint", str(tmp_path / "nothing"), "--prompt", "x")
    assert status == 2 and err.startswith("error: ")
    status, _, err = gen(run_cli, ckpt, "--prompt", "HELLO")  # upper case is not in the vocabulary
    assert status == 2 and err.startswith("error: ") and err.count("\n") == 1


def test_log_attention_writes_npz_and_png(run_cli, ckpt, tmp_path):
    pytest.importorskip("matplotlib")
    out_dir = tmp_path / "att"
    status, _, err = gen(run_cli, ckpt, "--prompt", "hello", "--max_tokens", "6", "--log_attention",
                         "--attention_dir", str(out_dir))
    assert status == 0, err
    data = np.load(out_dir / "attention.npz")
    assert data["attention"].shape == (2, 4, 11, 11)
    assert sorted(p.name for p in out_dir.glob("*.png")) == ["attention-layer0.png", "attention-layer1.png"]
    assert "one PNG per layer" in err


def test_attention_layer_and_head_draw_one_map_and_are_checked(run_cli, ckpt, tmp_path):
    pytest.importorskip("matplotlib")
    out_dir = tmp_path / "att"
    common = ("--prompt", "hello", "--max_tokens", "3", "--log_attention", "--attention_dir", str(out_dir))
    status, _, err = gen(run_cli, ckpt, *common, "--attention_layer", "1", "--attention_head", "3")
    assert status == 0, err
    assert [p.name for p in out_dir.glob("*.png")] == ["attention-layer1-head3.png"]
    status, _, err = gen(run_cli, ckpt, *common, "--attention_layer", "2")
    assert status == 2 and err.count("\n") == 1
    assert "--attention_layer 2 is out of range: the model has 2 layers (0 to 1)" in err
    status, _, err = gen(run_cli, ckpt, *common, "--attention_head", "-1")
    assert status == 2 and "--attention_head must be >= 0" in err


def test_speculative_with_a_draft_checkpoint_prints_acceptance(run_cli, ckpt, tmp_path):
    draft = make_checkpoint(tmp_path / "draft", seed=5, n_layers=1)
    plain = gen(run_cli, ckpt, "--prompt", "the", "--max_tokens", "20")[1]
    status, out, err = gen(run_cli, ckpt, "--prompt", "the", "--max_tokens", "20", "--draft_checkpoint", draft,
                           "--compare_plain")
    assert status == 0, err
    assert out == plain  # greedy: identical to the target alone
    assert "acceptance" in err and "speedup" in err


def test_help_lists_the_flags_and_examples(capsys):
    from mini_transformer.cli import main

    with pytest.raises(SystemExit):
        main(["generate", "--help"])
    text = capsys.readouterr().out
    for flag in ("--prompt", "--max_tokens", "--interactive", "--stream", "--temperature", "--top_k", "--top_p",
                 "--checkpoint", "--num_samples", "--seed", "--prompts_file", "--stop", "--repetition_penalty",
                 "--min_p", "--log_attention", "--draft_checkpoint", "--config"):
        assert flag in text
    assert 'python generate.py --prompt "Once upon a time" --max_tokens 200' in text


# -- the REPL through a pseudo-terminal ------------------------------------------------------

class Terminal:
    """A child process on a pseudo-terminal (its controlling tty, so Ctrl-C is a real SIGINT)."""

    def __init__(self, argv: list[str]):
        import pty

        env = {**os.environ, "TERM": "dumb", "PYTHONPATH": REPO_ROOT, "OMP_NUM_THREADS": "1",
               "PYTHONUNBUFFERED": "1"}
        self.pid, self.fd = pty.fork()
        if self.pid == 0:  # the child
            # A terminal's program starts with Ctrl-C's default action; a pytest-xdist worker
            # ignores SIGINT, and an ignored signal stays ignored across exec (Python would then
            # install no KeyboardInterrupt handler at all).
            signal.signal(signal.SIGINT, signal.SIG_DFL)
            os.execve(sys.executable, [sys.executable, *argv], env)
        self.buffer = ""

    def expect(self, text: str, timeout: float = 60.0) -> str:
        self._read_until(lambda: text in self.buffer, repr(text), timeout)
        before, _, self.buffer = self.buffer.partition(text)
        return before

    def expect_output(self, chars: int, timeout: float = 60.0) -> None:
        """Wait until at least ``chars`` characters have arrived (a generation under way)."""
        self._read_until(lambda: len(self.buffer) >= chars, f"{chars} characters of output", timeout)

    def _read_until(self, done, what: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not done():
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"timed out waiting for {what}; got:\n{self.buffer[-2000:]}")
            ready, _, _ = select.select([self.fd], [], [], left)
            if ready:
                try:
                    chunk = os.read(self.fd, 4096)
                except OSError:  # the child closed the terminal
                    chunk = b""
                if not chunk:
                    raise AssertionError(f"terminal closed while waiting for {what}; got:\n{self.buffer[-2000:]}")
                self.buffer += chunk.decode("utf-8", errors="replace")

    def send(self, data: str) -> None:
        os.write(self.fd, data.encode())

    def wait(self, timeout: float = 30.0) -> int:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                return os.waitstatus_to_exitcode(status)
            try:  # keep draining so the child never blocks on a full terminal
                if select.select([self.fd], [], [], 0.1)[0]:
                    os.read(self.fd, 4096)
            except OSError:
                pass
        os.kill(self.pid, signal.SIGKILL)
        os.waitpid(self.pid, 0)
        raise AssertionError("the REPL did not exit")

    def close(self) -> None:
        try:
            os.close(self.fd)
        except OSError:
            pass


@pytest.mark.slow  # runs the CLI in a pseudo-terminal
@pytest.mark.skipif(sys.platform == "win32", reason="needs a POSIX pseudo-terminal")
def test_repl_changes_settings_survives_ctrl_c_and_exits_on_ctrl_d(ckpt):
    term = Terminal(["-m", "mini_transformer", "generate", "--checkpoint", ckpt, "--device", "cpu",
                     "--interactive", "--seed", "0"])
    try:
        term.expect(">>> ")
        term.send("/temp 0.5\n")
        term.expect("temperature = 0.5")
        term.expect(">>> ")
        term.send("/top_k 5\n")
        term.expect("top_k = 5")
        term.send("/top_p 2\n")
        term.expect("error: --top_p must be in (0, 1]")
        term.send("/max_tokens 8\n")
        term.expect("max_tokens = 8")
        term.expect(">>> ")
        term.send("hello\n")
        term.expect(">>> ")  # one turn of 8 tokens, then the prompt again
        # A generation too long to finish: Ctrl-C must stop it and keep the session.
        term.send("/max_tokens 1000000\n")
        term.expect(">>> ")
        term.send("the\n")
        term.expect("the")  # the echo; then wait for the generation itself, however loaded the machine
        term.expect_output(16)
        # Ctrl-C as the terminal delivers it: SIGINT to the foreground process group. (Writing
        # \x03 to the pty did the same when the machine was quiet, but under heavy load the
        # keystroke was at times not turned into a signal within a minute.)
        os.killpg(os.getpgid(term.pid), signal.SIGINT)
        term.expect("[interrupted]")
        term.expect(">>> ")
        term.send("/reset\n")
        term.expect("conversation cleared")
        term.expect(">>> ")
        term.send("\x04")  # Ctrl-D
        assert term.wait() == 0
    finally:
        term.close()


def test_dtype_sets_the_precision_of_the_weights(run_cli, ckpt, monkeypatch):
    """--dtype (or generation.decode_dtype) converts the loaded model; auto keeps fp32 on CPU and picks
    bf16, or fp16 on GPUs without bf16, on CUDA; fp16 on CPU is refused in one line."""
    from mini_transformer import session as command
    from mini_transformer.device import inference_dtype

    seen = []
    real_init = command.Session.__init__

    def recording_init(self, model, *args, **kwargs):
        seen.append({p.dtype for p in model.parameters()})
        real_init(self, model, *args, **kwargs)

    monkeypatch.setattr(command.Session, "__init__", recording_init)
    for flags, expected in ((["--dtype", "bf16"], torch.bfloat16), ([], torch.float32),
                            (["--generation.decode_dtype", "bf16"], torch.bfloat16), (["--dtype", "fp32"], torch.float32)):
        status, out, err = gen(run_cli, ckpt, "--prompt", "the", "--max_tokens", "5", *flags)
        assert status == 0, err
        assert out.startswith("the") and len(out) == len("the") + 5 + 1
        assert seen.pop() == {expected}, flags
    status, out, err = gen(run_cli, ckpt, "--prompt", "the", "--dtype", "fp16")
    assert status == 2 and "CUDA" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    cuda = torch.device("cuda")
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert inference_dtype("auto", cuda) is torch.bfloat16
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert inference_dtype("auto", cuda) is torch.float16
    assert inference_dtype("auto", torch.device("cpu")) is None


def test_quantize_flag_quantizes_the_weights_on_load(run_cli, ckpt, monkeypatch):
    from mini_transformer import session
    from mini_transformer.quantize import is_quantized

    seen = []
    real_init = session.Session.__init__

    def recording_init(self, model, *args, **kwargs):
        seen.append(is_quantized(model))
        real_init(self, model, *args, **kwargs)

    monkeypatch.setattr(session.Session, "__init__", recording_init)
    status, out, err = gen(run_cli, ckpt, "--prompt", "the", "--max_tokens", "5", "--quantize", "int8")
    assert status == 0, err
    assert out.startswith("the") and len(out) == len("the") + 5 + 1
    assert seen == [True]
