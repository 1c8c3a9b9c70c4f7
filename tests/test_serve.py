"""``mini-transformer serve`` against the official ``openai`` client: one server on a free port of
127.0.0.1 for the whole module (uvicorn in a background thread), over a tiny random checkpoint.

Covers completions and chat (streaming and not), continuous batching's promise (a sequence's
tokens are the ones it gets alone), seeds, a client leaving mid-stream, every error status, the
metrics, and the playground page in a real browser (Chromium driven by Playwright)."""

from __future__ import annotations

import json
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace

import pytest
import torch

openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")
uvicorn = pytest.importorskip("uvicorn")

from mini_transformer.checkpoint import load_for_inference, save_checkpoint  # noqa: E402
from mini_transformer.config import Config, ModelConfig  # noqa: E402
from mini_transformer.model import Transformer  # noqa: E402
from mini_transformer.serve.app import ServerLimits, create_app  # noqa: E402
from mini_transformer.serve.scheduler import Scheduler  # noqa: E402
from mini_transformer.session import Session, Settings  # noqa: E402
from mini_transformer.tokenizer import CharTokenizer  # noqa: E402

TEXT = "hello world\nthe quick brown fox jumps over the lazy dog\nuser: assistant: system:\n"
KEY = "test-key-0123"
MODEL = "tiny"
MAX_BATCH = 4
MAX_QUEUE = 12
LIMITS = ServerLimits(max_body_bytes=20_000, max_prompt_tokens=400, max_tokens=1024)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    tokenizer = CharTokenizer.from_text(TEXT)
    config = Config()
    config.model = ModelConfig(vocab_size=tokenizer.vocab_size, d_model=32, n_heads=4, n_layers=2, block_size=16,
                               dropout=0.0, init_std=0.3)
    torch.manual_seed(0)
    directory = save_checkpoint(tmp_path_factory.mktemp("run"), 1, Transformer(config.model), config, tokenizer)
    model, saved, tokenizer = load_for_inference(directory, "cpu")
    session = Session(model, tokenizer, Settings.from_config(saved.generation))
    scheduler = Scheduler(model, max_batch=MAX_BATCH, max_queue=MAX_QUEUE)
    app = create_app(session, scheduler, model_name=MODEL, api_key=KEY, limits=LIMITS)
    uv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning", access_log=False))
    thread = threading.Thread(target=uv.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not uv.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the server did not start"
        time.sleep(0.02)
    port = uv.servers[0].sockets[0].getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    yield SimpleNamespace(url=url, scheduler=scheduler, session=session,
                          client=openai.OpenAI(base_url=url + "/v1", api_key=KEY, max_retries=0, timeout=60))
    uv.should_exit = True
    thread.join(30)
    assert not thread.is_alive()


def complete(server, prompt, **kwargs):
    kwargs.setdefault("temperature", 0.0)
    return server.client.completions.create(model=MODEL, prompt=prompt, **kwargs)


def stream_text(server, prompt, **kwargs) -> tuple[str, str]:
    """The streamed text and the last finish_reason."""
    kwargs.setdefault("temperature", 0.0)
    text, finish = "", None
    for chunk in server.client.completions.create(model=MODEL, prompt=prompt, stream=True, **kwargs):
        text += chunk.choices[0].text
        finish = chunk.choices[0].finish_reason or finish
    return text, finish


class AdmissionGate:
    """Holds the scheduler's admission of new sequences until opened: lets a test queue many
    requests first, so that they are then certainly batched together."""

    def __init__(self, scheduler, monkeypatch):
        self.open_event = threading.Event()
        admit = scheduler._admit

        def gated():
            self.open_event.wait(30)
            admit()

        monkeypatch.setattr(scheduler, "_admit", gated)
        self.scheduler = scheduler

    def wait_for_waiting(self, n: int) -> None:
        deadline = time.monotonic() + 30
        while self.scheduler.waiting < n:
            assert time.monotonic() < deadline, f"only {self.scheduler.waiting} of {n} requests arrived"
            time.sleep(0.01)

    def open(self) -> None:
        self.open_event.set()


# -- the endpoints ----------------------------------------------------------------------------

def test_models_lists_the_served_model(server):
    models = server.client.models.list()
    assert [m.id for m in models.data] == [MODEL]
    assert server.client.models.retrieve(MODEL).id == MODEL


def test_completion_has_the_openai_fields_and_matches_the_engine(server):
    from mini_transformer.generation import generate

    response = complete(server, "the quick", max_tokens=7)
    assert response.object == "text_completion" and response.id.startswith("cmpl-")
    assert response.model == MODEL and abs(response.created - time.time()) < 60
    choice = response.choices[0]
    assert choice.index == 0 and choice.finish_reason == "length"
    assert response.usage.prompt_tokens == len("the quick") and response.usage.completion_tokens == 7
    assert response.usage.total_tokens == len("the quick") + 7
    # The same greedy tokens as the engine alone, as text.
    session = server.session
    ids = generate(session.model, session.encode("the quick").ids, max_new_tokens=7, temperature=0.0)
    assert choice.text == session.tokenizer.decode(ids)


def test_streamed_completion_equals_the_whole_one(server):
    whole = complete(server, "hello", max_tokens=20)
    text, finish = stream_text(server, "hello", max_tokens=20)
    assert text == whole.choices[0].text and finish == "length"


def test_a_list_of_prompts_gives_a_choice_each_and_stop_strings_cut(server):
    alone = [complete(server, p, max_tokens=12).choices[0].text for p in ("hello", "the lazy")]
    both = complete(server, ["hello", "the lazy"], max_tokens=12)
    assert [c.text for c in sorted(both.choices, key=lambda c: c.index)] == alone
    stop = alone[0][3:5]
    cut = complete(server, "hello", max_tokens=12, stop=[stop]).choices[0]
    assert cut.text == alone[0][:alone[0].index(stop)] and cut.finish_reason == "stop"


def test_chat_renders_the_plain_template_streaming_and_not(server):
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello"}]
    response = server.client.chat.completions.create(model=MODEL, messages=messages, max_tokens=10, temperature=0)
    assert response.object == "chat.completion" and response.id.startswith("chatcmpl-")
    message = response.choices[0].message
    assert message.role == "assistant" and response.choices[0].finish_reason in ("length", "stop")
    prompt = "system: be brief\nuser: hello\nassistant:"
    assert response.usage.prompt_tokens == len(prompt)
    # The plain template's prompt, continued: what /v1/completions gives for it (up to "\nuser:").
    expected = complete(server, prompt, max_tokens=10, stop=["\nuser:"]).choices[0].text
    assert message.content == expected

    chunks = list(server.client.chat.completions.create(model=MODEL, messages=messages, max_tokens=10,
                                                        temperature=0, stream=True,
                                                        stream_options={"include_usage": True}))
    assert all(c.object == "chat.completion.chunk" and c.id == chunks[0].id for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == message.content
    assert chunks[-1].usage.completion_tokens == response.usage.completion_tokens


def test_chat_stream_ends_with_done_on_the_wire(server):
    body = {"model": MODEL, "messages": [{"role": "user", "content": "hello"}], "max_tokens": 5, "stream": True}
    with httpx.stream("POST", server.url + "/v1/chat/completions", json=body,
                      headers={"Authorization": f"Bearer {KEY}"}, timeout=60) as response:
        assert response.status_code == 200 and response.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in response.iter_lines() if line]
    assert lines[-1] == "data: [DONE]"
    last = json.loads(lines[-2][len("data: "):])
    assert last["choices"][0]["finish_reason"] == "length"


# -- continuous batching ----------------------------------------------------------------------

def test_sixteen_concurrent_greedy_requests_get_what_each_gets_alone(server, monkeypatch):
    # Prompt lengths 1..31 (some longer than the 16-token context) and max_tokens 2..24 (some
    # running past the context, so that their windows slide while others decode).
    prompts = [TEXT[i: i + 1 + 2 * i] for i in range(16)]
    max_tokens = [2 + (5 * i) % 23 for i in range(16)]
    alone = [complete(server, p, max_tokens=n).choices[0].text for p, n in zip(prompts, max_tokens)]
    gate = AdmissionGate(server.scheduler, monkeypatch)
    with ThreadPoolExecutor(16) as pool:
        futures = [pool.submit(complete, server, p, max_tokens=n) for p, n in zip(prompts, max_tokens)]
        gate.wait_for_waiting(16)  # all queued: they join the batch 4 at a time, as rows free up
        gate.open()
        together = [f.result().choices[0].text for f in futures]
    assert together == alone


def test_a_seed_reproduces_a_sample_whatever_runs_beside_it(server, monkeypatch):
    sampled = dict(max_tokens=20, temperature=1.0, seed=1234, extra_body={"top_k": 20})
    alone = complete(server, "the quick", **sampled).choices[0].text
    gate = AdmissionGate(server.scheduler, monkeypatch)
    with ThreadPoolExecutor(6) as pool:
        others = [pool.submit(complete, server, "hello", max_tokens=30, temperature=1.0) for _ in range(5)]
        mine = pool.submit(complete, server, "the quick", **sampled)
        gate.wait_for_waiting(6)
        gate.open()
        assert mine.result().choices[0].text == alone
        [f.result() for f in others]
    other_seed = complete(server, "the quick", **{**sampled, "seed": 99}).choices[0].text
    assert other_seed != alone


def test_a_client_that_closes_its_stream_frees_its_row(server):
    scheduler = server.scheduler
    before = scheduler.generated
    streams = [server.client.completions.create(model=MODEL, prompt="hello", max_tokens=1024, temperature=1.0,
                                                stream=True) for _ in range(MAX_BATCH)]
    for stream in streams:
        next(iter(stream))  # each is running
        stream.close()
    deadline = time.monotonic() + 10
    while scheduler.running or scheduler.waiting:
        assert time.monotonic() < deadline, "closed streams kept their rows"
        time.sleep(0.01)
    assert scheduler.generated - before < MAX_BATCH * 1024  # they stopped early
    assert complete(server, "hello", max_tokens=3).usage.completion_tokens == 3  # the next one is served


# -- errors -----------------------------------------------------------------------------------

def error_of(response: httpx.Response) -> dict:
    body = response.json()
    assert set(body["error"]) >= {"message", "type", "code"}, body
    assert "\n" not in body["error"]["message"]
    return body["error"]


@pytest.mark.parametrize("kwargs, param", [
    (dict(temperature=-0.5), "temperature"),
    (dict(top_p=0.0), "top_p"),
    (dict(top_p=1.5), "top_p"),
    (dict(max_tokens=0), "max_tokens"),
    (dict(max_tokens=LIMITS.max_tokens + 1), "max_tokens"),
    (dict(extra_body={"top_k": 0}), "top_k"),
    (dict(extra_body={"repetition_penalty": -1}), "repetition_penalty"),
    (dict(extra_body={"temperature": "hot"}), "temperature"),
    (dict(extra_body={"temprature": 0.5}), "temprature"),
])
def test_bad_values_are_400_naming_the_field(server, kwargs, param):
    with pytest.raises(openai.BadRequestError) as caught:
        server.client.completions.create(model=MODEL, prompt="hello", **kwargs)
    assert caught.value.status_code == 400
    assert caught.value.body["param"] == param and caught.value.body["type"] == "invalid_request_error"


def test_malformed_json_and_a_prompt_over_the_limit_are_400(server):
    headers = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
    response = httpx.post(server.url + "/v1/completions", content=b'{"model": "tiny", "prompt": ', headers=headers)
    assert response.status_code == 400 and "not valid JSON" in error_of(response)["message"]
    response = httpx.post(server.url + "/v1/completions", content=b'[1, 2]', headers=headers)
    assert response.status_code == 400
    with pytest.raises(openai.BadRequestError) as caught:
        complete(server, "hello " * 100)
    assert caught.value.body["code"] == "context_length_exceeded"


def test_a_missing_or_wrong_key_is_401(server):
    response = httpx.post(server.url + "/v1/completions", json={"model": MODEL, "prompt": "hi"})
    assert response.status_code == 401 and error_of(response)["code"] == "invalid_api_key"
    wrong = openai.OpenAI(base_url=server.url + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        wrong.models.list()
    assert httpx.get(server.url + "/health").status_code == 200  # health and metrics need no key


def test_an_unknown_model_or_path_is_404(server):
    with pytest.raises(openai.NotFoundError) as caught:
        server.client.completions.create(model="gpt-9", prompt="hello")
    assert caught.value.body["code"] == "model_not_found"
    response = httpx.get(server.url + "/v2/anything", headers={"Authorization": f"Bearer {KEY}"})
    assert response.status_code == 404 and error_of(response)["code"] == "not_found"


def test_a_body_over_the_limit_is_413(server):
    with pytest.raises(openai.APIStatusError) as caught:
        complete(server, "x" * (LIMITS.max_body_bytes + 1))
    assert caught.value.status_code == 413
    # A body without a Content-Length (chunked) is counted as it arrives.
    chunks = iter([b'{"model": "tiny", "prompt": "', b"a" * LIMITS.max_body_bytes, b'"}'])
    response = httpx.post(server.url + "/v1/completions", content=chunks,
                          headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"})
    assert response.status_code == 413 and error_of(response)["code"] == "body_too_large"


def test_a_full_queue_is_503_and_the_queued_requests_are_still_served(server, monkeypatch):
    gate = AdmissionGate(server.scheduler, monkeypatch)
    capacity = MAX_BATCH + MAX_QUEUE
    with ThreadPoolExecutor(capacity) as pool:
        futures = [pool.submit(complete, server, "hello", max_tokens=2) for _ in range(capacity)]
        gate.wait_for_waiting(capacity)
        with pytest.raises(openai.InternalServerError) as caught:
            complete(server, "hello", max_tokens=2)
        assert caught.value.status_code == 503 and caught.value.body["code"] == "queue_full"
        assert caught.value.response.headers["retry-after"] == "1"
        gate.open()
        assert all(f.result().usage.completion_tokens == 2 for f in futures)


def test_metrics_count_requests_tokens_and_time_to_first_token(server):
    complete(server, "hello", max_tokens=4)
    text = httpx.get(server.url + "/metrics").text
    values = {line.split(" ")[0]: float(line.split(" ")[1]) for line in text.splitlines()
              if line and not line.startswith("#")}
    assert values['mini_transformer_requests_total{method="POST",path="/v1/completions",status="200"}'] >= 1
    assert values["mini_transformer_completion_tokens_total"] >= 4
    assert values["mini_transformer_time_to_first_token_seconds_count"] >= 1
    assert values["mini_transformer_queue_length"] == 0 and values["mini_transformer_max_batch"] == MAX_BATCH


# -- the playground, in a real browser --------------------------------------------------------

CHROMIUM = "/usr/bin/chromium"


@pytest.mark.slow  # starts a browser: 2-10 s on a busy 2-core machine
def test_playground_streams_a_completion_in_a_browser(server):
    if not os.path.exists(CHROMIUM):
        pytest.skip(f"no Chromium at {CHROMIUM} (apt-get install chromium)")
    sync_api = pytest.importorskip("playwright.sync_api")
    expected = complete(server, "the quick", max_tokens=15).choices[0].text
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True)
        try:
            page = browser.new_page()
            page.goto(server.url + "/")
            page.fill("#api_key", KEY)
            page.fill("#prompt", "the quick")
            page.fill("#max_tokens", "15")
            page.fill("#temperature", "0")
            page.click("#generate")
            page.wait_for_function("document.querySelector('#stats').textContent.includes('finished')",
                                   timeout=20_000)
            assert page.text_content("#generated") == expected
            stats = page.inner_text("#stats")
            assert stats.startswith("15 tokens, ") and "tokens/s" in stats and page.inner_text("#error") == ""
        finally:
            browser.close()


def test_the_server_still_answers_health_after_everything(server):
    health = httpx.get(server.url + "/health").json()
    assert health == {"status": "ok", "model": MODEL, "running": 0, "waiting": 0}
