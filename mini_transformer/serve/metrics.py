"""The server's counters, in the Prometheus text format (``GET /metrics``).

Written by hand rather than with ``prometheus_client``: a handful of counters, one gauge pair
and one histogram do not justify a dependency.
"""

from __future__ import annotations

import bisect
import threading
from collections import Counter

# Time to first token, in seconds: from the request's arrival to its first token.
TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
PREFIX = "mini_transformer"


class Metrics:
    """Thread-safe counters; :meth:`render` writes them with the scheduler's queue and batch sizes."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.requests: Counter[tuple[str, str, int]] = Counter()  # (method, path, status)
        self.prompt_tokens = 0
        self.completion_tokens = 0
        self._ttft_counts = [0] * (len(TTFT_BUCKETS) + 1)  # the last one: above every bucket
        self._ttft_sum = 0.0

    def request(self, method: str, path: str, status: int) -> None:
        with self._lock:
            self.requests[(method, path, status)] += 1

    def tokens(self, prompt: int, completion: int) -> None:
        with self._lock:
            self.prompt_tokens += prompt
            self.completion_tokens += completion

    def first_token(self, seconds: float) -> None:
        with self._lock:
            self._ttft_counts[bisect.bisect_left(TTFT_BUCKETS, seconds)] += 1
            self._ttft_sum += seconds

    def render(self, waiting: int, running: int, max_batch: int) -> str:
        with self._lock:
            lines = [
                f"# HELP {PREFIX}_requests_total HTTP requests by method, path and status.",
                f"# TYPE {PREFIX}_requests_total counter",
            ]
            for (method, path, status), n in sorted(self.requests.items()):
                lines.append(f'{PREFIX}_requests_total{{method="{method}",path="{_escape(path)}",'
                             f'status="{status}"}} {n}')
            lines += _sample("prompt_tokens_total", "counter", "Prompt tokens of finished requests.",
                             self.prompt_tokens)
            lines += _sample("completion_tokens_total", "counter", "Tokens generated.", self.completion_tokens)
            lines += _sample("queue_length", "gauge", "Sequences waiting for a batch row.", waiting)
            lines += _sample("running_sequences", "gauge", "Sequences in the decode batch.", running)
            lines += _sample("max_batch", "gauge", "Rows of the decode batch.", max_batch)
            name = f"{PREFIX}_time_to_first_token_seconds"
            lines += [f"# HELP {name} Seconds from a request's arrival to its first token.",
                      f"# TYPE {name} histogram"]
            total = 0
            for bound, count in zip((*map(str, TTFT_BUCKETS), "+Inf"), self._ttft_counts):
                total += count
                lines.append(f'{name}_bucket{{le="{bound}"}} {total}')
            lines += [f"{name}_sum {self._ttft_sum:.6f}", f"{name}_count {total}"]
        return "\n".join(lines) + "\n"


def _sample(name: str, kind: str, help: str, value: float) -> list[str]:
    full = f"{PREFIX}_{name}"
    return [f"# HELP {full} {help}", f"# TYPE {full} {kind}", f"{full} {value}"]


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
