"""The workers' figures, summed, for the supervisor's metrics port (``serve --workers N``).

Pure: figures in, figures out (the port itself is
:mod:`plasma_trio.transports.supervisor_metrics`).

Each worker serves its own metrics on 127.0.0.1 (an ephemeral port it tells
the supervisor); at every scrape the supervisor reads them all and answers
on ``PLASMA_METRICS_PORT``:

* ``/metrics/plasma`` and ``/metrics/python``: amounts summed over workers
  (connections, events delivered, memory...); the worst worker's lag
  quantiles and deepest queue (a quantile or a maximum cannot be added);
  ``redis_connected`` true only while every worker's source is connected;
  descriptions of one process (``pid``, ``time``, ``last_event_id``...) from
  worker 0; plus ``workers``: each worker's index, pid and own figures;
* ``/metrics``: Prometheus samples merged by name and labels the same way:
  summed (a sum over processes is what a dashboard of the machine wants),
  except ``plasma_redis_connected`` (the minimum), ``process_start_time_seconds``
  (the earliest) and ``process_max_fds`` / ``python_info`` (the maximum);
  plus ``plasma_workers``.

Counters stay monotonic (:class:`CounterMemory`): a worker that misses a
scrape counts with its last figures, a restarted one's last figures are
carried over. That holds for the cumulative histogram
``plasma_delivery_lag_seconds`` too (its buckets, count and sum only grow);
``plasma_subscriber_queue_depth`` describes the queues at the scrape and is
summed like a gauge.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Hashable
from typing import Any, Generic, TypeVar

from prometheus_client.parser import text_string_to_metric_families

__all__ = ["CounterMemory", "Sample", "sum_figures", "sum_prometheus"]


# JSON numbers that describe a process or an instant, not an amount: from worker 0.
_FROM_FIRST = frozenset({"time", "pid", "uptime_s", "cpu_num"})
# JSON figures where the worst worker speaks for all (None: no samples yet).
_WORST = frozenset(
    {
        "delivery_lag_p50_s",
        "delivery_lag_p99_s",
        "subscriber_queue_depth_max",
        "gc_pause_last_s",
        "gc_pause_max_recent_s",
    }
)
# JSON figures that only grow (counters): kept monotonic over restarts.
_COUNTER_PREFIXES = (
    "events_",
    "subscribers_cut_off",
    "source_losses",
    "connection_errors",
    "connections_dropped",
    "delivery_lag_samples",
    "cpu_user_s",
    "cpu_system_s",
    "gc_num",
    "gc_pause_total_s",
)
# Prometheus samples that are not amounts: how several workers' values merge.
_PROMETHEUS_MERGE: dict[str, Callable[[float, float], float]] = {
    "plasma_redis_connected": min,  # 1 only while every worker is connected
    "process_start_time_seconds": min,  # the oldest worker's start
    "process_max_fds": max,
    # Each worker's own open-file budget: the limit per worker, not a sum.
    "plasma_descriptors_limit": max,
    "plasma_descriptors_reserved": max,
    "python_info": max,  # 1: the same interpreter in every worker
}
# Histograms of the moment (not cumulative): summed like gauges.
_SNAPSHOT_HISTOGRAMS = frozenset({"plasma_subscriber_queue_depth"})

Key = TypeVar("Key", bound=Hashable)


class CounterMemory(Generic[Key]):
    """Keeps summed counters from going backwards (a dashboard's rate() reads
    a drop as a reset): a worker that does not answer a scrape counts with
    its last figures, and a restarted worker's last figures are carried over
    (what the old process counted stays counted)."""

    def __init__(self) -> None:
        self._last: dict[int, tuple[int, dict[Key, float]]] = {}
        self._carry: dict[Key, float] = defaultdict(float)

    def update(self, index: int, pid: int, counters: dict[Key, float]) -> None:
        previous = self._last.get(index)
        if previous is not None and previous[0] != pid:
            for key, value in previous[1].items():
                self._carry[key] += value
        self._last[index] = (pid, counters)

    def totals(self) -> dict[Key, float]:
        out: dict[Key, float] = defaultdict(float, self._carry)
        for _, counters in self._last.values():
            for key, value in counters.items():
                out[key] += value
        return dict(out)


def sum_figures(
    parts: list[tuple[int, int, dict[str, Any]]], memory: CounterMemory[str]
) -> dict[str, Any]:
    """JSON figures of several workers -> one: amounts summed (counters kept
    monotonic, see :class:`CounterMemory`), quantiles and maxima the worst
    worker's, ``redis_connected`` true only if every worker's is, the rest
    from the first."""
    total: dict[str, Any] = {}
    for index, pid, figures in parts:
        counters: dict[str, float] = {}
        for key, value in figures.items():
            if key == "redis_connected":
                seen = total.get(key)
                total[key] = value if seen is None else (seen and value is not False)
            elif key in _WORST:
                total[key] = _worst(total.get(key), value)
            elif key in _FROM_FIRST or not _is_amount(value):
                total.setdefault(key, value)
            elif key.startswith(_COUNTER_PREFIXES):
                counters[key] = value
            else:
                total[key] = total.get(key, 0) + value
        memory.update(index, pid, counters)
    for key, value in memory.totals().items():
        total[key] = int(value) if float(value).is_integer() else value
    total["workers"] = [{"index": index, "pid": pid, **figures} for index, pid, figures in parts]
    return total


def _worst(seen: float | None, value: float | None) -> float | None:
    if seen is None:
        return value
    return seen if value is None else max(seen, value)


def _add(a: float, b: float) -> float:
    return a + b


def _is_amount(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


Sample = tuple[str, tuple[tuple[str, str], ...]]


def sum_prometheus(
    parts: list[tuple[int, int, str]], workers: int, memory: CounterMemory[Sample]
) -> str:
    """Prometheus text of several workers -> one, samples merged by name and
    labels (see the module's docstring; counters and cumulative histograms
    kept monotonic, see :class:`CounterMemory`)."""
    helps: dict[str, tuple[str, str]] = {}
    gauges: dict[Sample, float] = {}
    families: dict[str, list[Sample]] = {}
    for index, pid, text in parts:
        counters: dict[Sample, float] = {}
        for family in text_string_to_metric_families(text):
            helps.setdefault(family.name, (family.documentation, family.type))
            cumulative = family.type == "counter" or (
                family.type == "histogram" and family.name not in _SNAPSHOT_HISTOGRAMS
            )
            merge = _PROMETHEUS_MERGE.get(family.name, _add)
            for sample in family.samples:
                key = (sample.name, tuple(sorted(sample.labels.items())))
                keys = families.setdefault(family.name, [])
                if key not in keys:
                    keys.append(key)
                if cumulative:
                    counters[key] = sample.value
                elif key in gauges:
                    gauges[key] = merge(gauges[key], float(sample.value))
                else:
                    gauges[key] = float(sample.value)
        memory.update(index, pid, counters)
    values = {**gauges, **memory.totals()}
    lines = [
        "# HELP plasma_workers Worker processes serving.",
        "# TYPE plasma_workers gauge",
        f"plasma_workers {workers}",
    ]
    for name, keys in families.items():
        documentation, kind = helps[name]
        # Text format 0.0.4 as prometheus-client writes it: a counter's
        # HELP/TYPE name carries the _total its samples have.
        shown = f"{name}_total" if kind == "counter" else name
        lines.append(f"# HELP {shown} {documentation}")
        lines.append(f"# TYPE {shown} {kind if kind != 'unknown' else 'untyped'}")
        for sample_name, labels in keys:
            label_text = ",".join(f'{k}="{_escape(v)}"' for k, v in labels)
            suffix = f"{{{label_text}}}" if label_text else ""
            lines.append(f"{sample_name}{suffix} {_number(values.get((sample_name, labels), 0.0))}")
    return "\n".join(lines) + "\n"


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _number(value: float) -> str:
    return str(int(value)) if value.is_integer() else repr(value)
