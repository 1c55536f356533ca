"""Test helpers around a real `idselect serve` subprocess (see devtools/launch.py)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from devtools.launch import TINY_MODEL_ARGS, RunningServer, image_message, running_server

__all__ = ["EAGER", "image_message", "metric_value", "tiny_server"]


# For servers whose tests are about HTTP behaviour: no compile at start-up (~8 s less per server
# on 2 cores). The compiled path is what test_server.py, the engine tests and the capped LLaVA
# servers run.
EAGER = ("--enforce-eager",)


@contextmanager
def tiny_server(model_dir: Path, log_dir: Path, *extra: str, **kwargs) -> Iterator[RunningServer]:
    with running_server(model_dir, log_dir / "server.log", *TINY_MODEL_ARGS, *extra,
                        **kwargs) as server:
        yield server


def metric_value(text: str, name: str, labels: dict[str, str] | None = None) -> float:
    """Read one sample from a Prometheus text page (0 if absent)."""
    from prometheus_client.parser import text_string_to_metric_families

    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(
                sample.labels.get(k) == v for k, v in (labels or {}).items()
            ):
                return sample.value
    return 0.0
