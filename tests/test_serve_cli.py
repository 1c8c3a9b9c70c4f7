"""``mini-transformer serve`` as a command: its flags, its mistakes as one-line errors, and a real
process that logs each request and stops cleanly (exit 0) on SIGTERM and Ctrl-C."""

from __future__ import annotations

import json
import os
import signal
import socket
import threading
import time

import pytest

from .test_generate_cli import make_checkpoint


def test_help_lists_the_flags(run_cli, capsys):
    with pytest.raises(SystemExit) as exit_info:
        run_cli("serve", "--help")
    out = capsys.readouterr().out
    assert exit_info.value.code == 0
    for flag in ("--checkpoint", "--adapter", "--quantize", "--host", "--port", "--api_key", "--max_batch",
                 "--max_queue", "--max_tokens", "--max_prompt_tokens", "--max_body_bytes", "curl"):
        assert flag in out


@pytest.mark.parametrize("flags, message", [
    (["--max_batch", "0"], "--max_batch must be >= 1"),
    (["--port", "70000"], "--port must be at most 65535"),
    (["--max_body_bytes", "0"], "--max_body_bytes must be >= 1"),
])
def test_bad_flags_are_one_line_errors(run_cli, flags, message):
    status, _, err = run_cli("serve", "--checkpoint", "nowhere", *flags)
    assert status == 2 and message in err and err.count("\n") == 1


def test_a_missing_checkpoint_is_a_one_line_error(run_cli, tmp_path):
    status, _, err = run_cli("serve", "--checkpoint", str(tmp_path / "nothing"))
    assert status == 2 and "not found" in err and err.count("\n") == 1


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("stop_signal", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "Ctrl-C"])
def test_requests_are_logged_and_a_stop_signal_ends_the_server_with_status_0(run_cli, tmp_path, stop_signal):
    # The command runs in this process's main thread (where signals land), the client in another.
    httpx = pytest.importorskip("httpx")
    pytest.importorskip("uvicorn")
    ckpt = make_checkpoint(tmp_path / "run")
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    body = {"model": "tiny", "prompt": "hello", "max_tokens": 5, "temperature": 0}
    seen: dict = {"lines": []}

    def client() -> None:
        try:
            deadline = time.monotonic() + 60
            while True:
                try:
                    if httpx.get(url + "/health", timeout=1).status_code == 200:
                        break
                except httpx.TransportError:
                    assert time.monotonic() < deadline, "the server did not come up"
                    time.sleep(0.05)
            seen["status"] = httpx.post(url + "/v1/completions", json=body, timeout=30).status_code
            # A stream that can't finish within the grace period is running when the signal comes.
            with httpx.stream("POST", url + "/v1/completions", timeout=30,
                              json={**body, "max_tokens": 1000, "stream": True}) as response:
                for line in response.iter_lines():
                    seen["lines"].append(line)
                    if len(seen["lines"]) == 2:
                        os.kill(os.getpid(), stop_signal)
        except BaseException as exc:  # noqa: BLE001 - reported by the test's thread below
            seen["error"] = exc
            os.kill(os.getpid(), signal.SIGTERM)  # let the server go, so that the test can fail

    thread = threading.Thread(target=client)
    thread.start()
    status, _, err = run_cli("serve", "--checkpoint", ckpt, "--port", str(port), "--model_name", "tiny",
                             "--max_batch", "2", "--shutdown_timeout", "0.5")
    thread.join(30)
    assert "error" not in seen, seen.get("error")
    assert status == 0 and seen["status"] == 200
    request_lines = [line for line in err.splitlines() if "POST /v1/completions 200" in line]
    assert len(request_lines) == 2, err
    assert "tokens=5" in request_lines[0] and request_lines[0].endswith("s")
    assert "Traceback" not in err and "Cancel" not in err, err
    # The stream was ended by the server: an error event saying why, then [DONE].
    events = [line for line in seen["lines"] if line.startswith("data: ")]
    assert events[-1] == "data: [DONE]"
    assert json.loads(events[-2][len("data: "):])["error"]["message"] == "the server is shutting down"


def test_only_loopback_addresses_count_as_private():
    from mini_transformer.commands.serve import is_loopback

    assert all(is_loopback(host) for host in ("127.0.0.1", "localhost", "::1", "127.0.0.2"))
    assert not any(is_loopback(host) for host in ("0.0.0.0", "::", "192.168.1.5", "example.com"))
