"""The continuous-batching scheduler on its own (no HTTP): token ids in, events out."""

from __future__ import annotations

import queue

import pytest
import torch

from mini_transformer.config import ModelConfig
from mini_transformer.errors import UserError
from mini_transformer.generation import SamplingParams
from mini_transformer.model import Transformer
from mini_transformer.serve.scheduler import Finished, QueueFull, Scheduler, SchedulerStopped, SequenceRequest, Token

GREEDY = SamplingParams(temperature=0.0)


@pytest.fixture
def model():
    torch.manual_seed(0)
    return Transformer(ModelConfig(vocab_size=23, d_model=32, n_heads=4, n_layers=1, block_size=16, dropout=0.0,
                                   init_std=0.3)).eval()


def run(scheduler: Scheduler, request: SequenceRequest, timeout: float = 30) -> tuple[list[int], Finished]:
    events: queue.Queue = queue.Queue()
    scheduler.submit(request, events.put)
    tokens = []
    while True:
        event = events.get(timeout=timeout)
        if isinstance(event, Token):
            tokens.append(event.id)
        else:
            return tokens, event


def test_a_failed_step_fails_its_sequences_and_the_scheduler_goes_on(model, monkeypatch):
    scheduler = Scheduler(model, max_batch=2)
    scheduler.start()
    try:
        expected, _ = run(scheduler, SequenceRequest([1, 2, 3], 6, GREEDY))
        original = model.forward
        calls = {"n": 0}

        def fails_once(*args, **kwargs):
            calls["n"] += 1
            if calls["n"] == 2:  # the first decode step after the prefill
                raise RuntimeError("out of memory")
            return original(*args, **kwargs)

        monkeypatch.setattr(model, "forward", fails_once)
        tokens, finished = run(scheduler, SequenceRequest([1, 2, 3], 6, GREEDY))
        assert finished.reason == "error" and "out of memory" in finished.message and len(tokens) == 1
        monkeypatch.setattr(model, "forward", original)
        assert run(scheduler, SequenceRequest([1, 2, 3], 6, GREEDY)) == (expected, Finished("length"))
    finally:
        scheduler.stop()


def test_stop_ids_end_a_sequence_without_being_sent(model):
    scheduler = Scheduler(model, max_batch=2)
    scheduler.start()
    try:
        tokens, _ = run(scheduler, SequenceRequest([4, 5], 8, GREEDY))
        stop = tokens[3]
        cut, finished = run(scheduler, SequenceRequest([4, 5], 8, GREEDY, stop_ids=frozenset({stop})))
        assert cut == tokens[:tokens.index(stop)] and finished.reason == "stop"
    finally:
        scheduler.stop()


def test_the_queue_limit_bad_prompts_and_a_stopped_scheduler_are_refused(model):
    scheduler = Scheduler(model, max_batch=1, max_queue=1)  # not started: nothing leaves the queue
    scheduler.submit(SequenceRequest([1], 3, GREEDY), lambda event: None)
    scheduler.submit(SequenceRequest([1], 3, GREEDY), lambda event: None)
    with pytest.raises(QueueFull):
        scheduler.submit(SequenceRequest([1], 3, GREEDY), lambda event: None)
    with pytest.raises(UserError, match="outside the model's vocabulary"):
        scheduler.submit(SequenceRequest([99], 3, GREEDY), lambda event: None)
    events: list = []
    scheduler.start()
    scheduler.stop()
    with pytest.raises(SchedulerStopped):
        scheduler.submit(SequenceRequest([1], 3, GREEDY), events.append)
