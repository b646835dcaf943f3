"""Server counters for ``GET /metrics`` (Prometheus text format)."""

from __future__ import annotations

import threading
from collections import Counter, deque

LATENCY_WINDOW = 2000  # requests kept for the latency percentiles


class Stats:
    def __init__(self):
        self.lock = threading.Lock()
        self.requests: Counter[tuple[str, int]] = Counter()
        self.prompt_tokens = 0
        self.completion_tokens = 0
        self.cancelled = 0
        self.latencies: deque[float] = deque(maxlen=LATENCY_WINDOW)

    def request(self, path: str, status: int, seconds: float) -> None:
        with self.lock:
            self.requests[(path, status)] += 1
            if path.startswith("/v1/") and status == 200:
                self.latencies.append(seconds)

    def cancel(self, n: int) -> None:
        with self.lock:
            self.cancelled += n

    def tokens(self, prompt: int, completion: int) -> None:
        with self.lock:
            self.prompt_tokens += prompt
            self.completion_tokens += completion

    def percentile(self, q: float) -> float:
        values = sorted(self.latencies)
        if not values:
            return 0.0
        return values[min(len(values) - 1, int(q * len(values)))]

    def render(self, active: int, queued: int, steps: int) -> str:
        with self.lock:
            lines = ["# TYPE slmkit_requests_total counter"]
            for (path, status), n in sorted(self.requests.items()):
                lines.append(f'slmkit_requests_total{{path="{path}",status="{status}"}} {n}')
            lines += [
                "# TYPE slmkit_prompt_tokens_total counter", f"slmkit_prompt_tokens_total {self.prompt_tokens}",
                "# TYPE slmkit_completion_tokens_total counter",
                f"slmkit_completion_tokens_total {self.completion_tokens}",
                "# TYPE slmkit_cancelled_sequences_total counter", f"slmkit_cancelled_sequences_total {self.cancelled}",
                "# TYPE slmkit_active_sequences gauge", f"slmkit_active_sequences {active}",
                "# TYPE slmkit_queue_depth gauge", f"slmkit_queue_depth {queued}",
                "# TYPE slmkit_decode_steps_total counter", f"slmkit_decode_steps_total {steps}",
                "# TYPE slmkit_request_latency_seconds summary",
            ]
            for q in (0.5, 0.9, 0.99):
                lines.append(f'slmkit_request_latency_seconds{{quantile="{q}"}} {self.percentile(q):.4f}')
            lines.append(f"slmkit_request_latency_seconds_count {len(self.latencies)}")
        return "\n".join(lines) + "\n"
