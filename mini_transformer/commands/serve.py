"""``mini-transformer serve``: an OpenAI-compatible HTTP server for a checkpoint.

This module reads the flags, loads the model and runs uvicorn; the application and its
continuous-batching scheduler are :mod:`mini_transformer.serve`'s. FastAPI, uvicorn and torch
are imported when the command runs, so ``--help`` stays fast and works without the extra.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ipaddress
import logging
import signal
import sys
from pathlib import Path

from ..errors import UserError
from .common import add_command, add_flag

EXAMPLES = """\
  mini-transformer serve --checkpoint out
  mini-transformer serve --checkpoint out --port 8080 --max_batch 16
  mini-transformer serve --checkpoint out --host 0.0.0.0 --api_key "$KEY"
  mini-transformer serve --checkpoint out --adapter out-finetune/adapter --quantize int8

then open http://127.0.0.1:8000/ (the playground), or:
  curl -N http://127.0.0.1:8000/v1/chat/completions -H 'Content-Type: application/json' \\
    -d '{"model": "out", "messages": [{"role": "user", "content": "Hello"}], "stream": true}'
"""


def register(subparsers) -> None:
    parser = add_command(
        subparsers, "serve", help="serve a checkpoint over HTTP (OpenAI-compatible API and a playground)",
        description="Serve a checkpoint over HTTP: /v1/completions, /v1/chat/completions and /v1/models as "
                    "OpenAI's API has them (streaming as server-sent events), /health, /metrics (Prometheus) "
                    "and a playground page at /. Requests share the model through continuous batching. "
                    "Needs the serve extra: pip install 'mini-transformer[serve]'.",
        examples=EXAMPLES)
    model = parser.add_argument_group("model")
    model.add_argument("--checkpoint", metavar="DIR", required=True, help="a checkpoint directory or a run's out_dir")
    model.add_argument("--adapter", metavar="DIR", help="a LoRA adapter (from finetune) to apply")
    model.add_argument("--quantize", choices=["int8", "int4"], help="quantize the weights on load")
    model.add_argument("--device", default="auto", help="auto (default), cpu, cuda, cuda:N or mps")
    add_flag(model, "--model_name", "--model-name", metavar="NAME",
                       help="the model id clients send (default: the --checkpoint directory's name)")
    net = parser.add_argument_group("network")
    net.add_argument("--host", default="127.0.0.1",
                     help="address to listen on (default 127.0.0.1: this machine only)")
    net.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    add_flag(net, "--api_key", "--api-key", metavar="KEY",
                     help="require 'Authorization: Bearer KEY' on /v1/* (or set MINI_TRANSFORMER_API_KEY)")
    limits = parser.add_argument_group("limits")
    add_flag(limits, "--max_batch", "--max-batch", type=int, default=8, metavar="N",
                        help="sequences decoded together, the rows of every decode step (default 8)")
    add_flag(limits, "--max_queue", "--max-queue", type=int, default=64, metavar="N",
                        help="sequences that may wait for a row; beyond it requests get 503 (default 64)")
    add_flag(limits, "--max_tokens", "--max-tokens", type=int, default=1024, metavar="N",
                        help="the most max_tokens a request may ask for (default 1024)")
    add_flag(limits, "--max_prompt_tokens", "--max-prompt-tokens", type=int, default=4096, metavar="N",
                        help="the longest prompt accepted, in tokens (default 4096; the model sees its last "
                             "block_size tokens)")
    add_flag(limits, "--max_body_bytes", "--max-body-bytes", type=int, default=1_000_000, metavar="N",
                        help="the largest request body (default 1000000)")
    add_flag(limits, "--shutdown_timeout", "--shutdown-timeout", type=float, default=5.0, metavar="S",
                        help="on Ctrl-C or SIGTERM, seconds running requests get to finish before they are "
                             "cancelled (default 5)")
    parser.set_defaults(run=run)


def check_flags(args: argparse.Namespace) -> None:
    for flag, value, low in [("--port", args.port, 0), ("--max_batch", args.max_batch, 1),
                             ("--max_queue", args.max_queue, 0), ("--max_tokens", args.max_tokens, 1),
                             ("--max_prompt_tokens", args.max_prompt_tokens, 1),
                             ("--max_body_bytes", args.max_body_bytes, 1)]:
        if value < low:
            raise UserError(f"{flag} must be >= {low}, got {value}")
    if args.port > 65535:
        raise UserError(f"--port must be at most 65535, got {args.port}")
    if args.shutdown_timeout < 0:
        raise UserError(f"--shutdown_timeout must be >= 0, got {args.shutdown_timeout}")


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def run(args: argparse.Namespace, overrides: list[str]) -> int:
    import os

    check_flags(args)
    api_key = args.api_key or os.environ.get("MINI_TRANSFORMER_API_KEY") or None
    try:
        import fastapi  # noqa: F401
        import uvicorn
    except ImportError:
        raise UserError("serve needs FastAPI and uvicorn; install them with pip install 'mini-transformer[serve]'") \
            from None
    from ..checkpoint import load_for_inference, read_config, resolve_checkpoint
    from ..device import resolve_device
    from ..serve.app import ServerLimits, create_app
    from ..serve.scheduler import Scheduler
    from ..session import Session, Settings

    setup_logging()
    log = logging.getLogger("mini_transformer.serve")
    directory = resolve_checkpoint(args.checkpoint, prefer="best")
    config = read_config(directory)
    device = resolve_device(args.device)
    model, _, tokenizer = load_for_inference(directory, device, adapter=args.adapter, config=config,
                                             quantize=args.quantize or config.advanced.quantize,
                                             group_size=config.advanced.quantize_group_size)
    session = Session(model, tokenizer, Settings.from_config(config.generation))
    scheduler = Scheduler(model, max_batch=args.max_batch, max_queue=args.max_queue,
                          context_keep=config.generation.context_keep)
    name = args.model_name or Path(args.checkpoint).resolve().name
    limits = ServerLimits(max_body_bytes=args.max_body_bytes, max_prompt_tokens=args.max_prompt_tokens,
                          max_tokens=args.max_tokens)
    app = create_app(session, scheduler, model_name=name, api_key=api_key, limits=limits)
    if not is_loopback(args.host) and not api_key:
        log.warning("listening on %s without an API key: anyone who can reach this address can use the model; "
                    "pass --api_key KEY", args.host)
    log.info("serving %s (%s) as %r on http://%s:%d/ with up to %d sequences per step",
             directory, f"{model.num_parameters() / 1e6:.2f}M parameters", name, args.host, args.port, args.max_batch)
    server = graceful_server(uvicorn, uvicorn.Config(app, host=args.host, port=args.port, log_level="warning",
                                                     access_log=False), scheduler, args.shutdown_timeout)
    with stop_signals_end_quietly():
        try:
            server.run()
        except SystemExit:  # uvicorn exits when it cannot bind
            if server.started:
                raise
            raise UserError(f"could not listen on {args.host}:{args.port} (in use, or not an address of this "
                            "machine); choose another --host or --port") from None
    log.info("stopped")
    return 0


def graceful_server(uvicorn, config, scheduler, grace: float):
    """A ``uvicorn.Server`` whose shutdown (Ctrl-C, SIGTERM) gives running requests ``grace``
    seconds to finish, then stops the scheduler, which ends the rest: a stream with an error
    event and ``[DONE]``, a whole response with 503. uvicorn's own deadline, which cancels the
    request tasks mid-response, stays a backstop a little later."""

    class GracefulServer(uvicorn.Server):
        async def shutdown(self, sockets=None):
            loop = asyncio.get_running_loop()
            timer = loop.call_later(grace, lambda: loop.run_in_executor(None, scheduler.stop))
            try:
                await super().shutdown(sockets)
            finally:
                timer.cancel()

    config.timeout_graceful_shutdown = grace + 10
    return GracefulServer(config)


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is at the time (a test may swap it)."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:
        pass


def setup_logging() -> None:
    logger = logging.getLogger("mini_transformer.serve")
    if not any(isinstance(h, _StderrHandler) for h in logger.handlers):
        handler = _StderrHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        logger.propagate = False


@contextlib.contextmanager
def stop_signals_end_quietly():
    """Ctrl-C and SIGTERM stop the server (uvicorn finishes or cancels the requests) and exit 0.

    uvicorn raises the signal again once it has shut down, so that the default action (a
    KeyboardInterrupt, or death by SIGTERM) follows; the handlers installed here receive it
    instead, and do nothing: the shutdown already happened.
    """
    signals = [signal.SIGINT, signal.SIGTERM]
    previous = {sig: signal.signal(sig, lambda *_: None) for sig in signals}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
