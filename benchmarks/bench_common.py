"""Helpers shared by the serving and accuracy benchmarks: budgets, the server to talk to, the
machine description, synthetic images, percentiles and plotting set-up."""

from __future__ import annotations

import base64
import io
import os
import platform
import shlex
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import numpy as np

ROOT = Path(__file__).resolve().parents[1]

DEFAULT_BUDGETS: tuple[int | None, ...] = (None, 192, 128, 64, 32, 16)


# ------------------------------------------------------------------------------------ budgets


def parse_budgets(text: str) -> list[int | None]:
    """'full,192,64' -> [None, 192, 64]; 'full' (or 'none') is the unpruned baseline."""
    budgets: list[int | None] = []
    for part in text.replace(" ", ",").split(","):
        if not part:
            continue
        if part.lower() in ("full", "none"):
            value = None
        else:
            value = int(part)
            if value < 1:
                raise ValueError(f"budgets must be >= 1 or 'full', got {value}")
        if value not in budgets:
            budgets.append(value)
    if not budgets:
        raise ValueError("no budgets given")
    return budgets


def budget_label(budget: int | None) -> str:
    return "full" if budget is None else str(budget)


def budget_body(budget: int | None) -> dict:
    """The request field; full budget sends nothing (the server's default must then be full)."""
    return {} if budget is None else {"visual_token_budget": budget}


# ------------------------------------------------------------------------------------- server


@dataclass
class Target:
    """The server a benchmark talks to."""

    base_url: str
    model: str  # served model name
    model_root: str | None  # what /v1/models calls the model's root (a local path, usually)
    started: bool = False
    server_args: list[str] = field(default_factory=list)
    log_path: str | None = None

    def config_path(self) -> Path | None:
        """The served model's config.json when the server runs a local directory."""
        for candidate in (self.model_root, self.model):
            if candidate and (Path(candidate) / "config.json").is_file():
                return Path(candidate) / "config.json"
        return None


def default_server_args(model_dir: Path) -> list[str]:
    """vLLM options for the models this repository writes (chosen from their marker files)."""
    from devtools.launch import TINY_MODEL_ARGS

    if (model_dir / "idselect_realistic_spec.json").exists():
        from benchmarks.realistic_model import SERVE_ARGS

        return list(SERVE_ARGS)
    if (model_dir / "idselect_tiny_spec.json").exists():
        return list(TINY_MODEL_ARGS)
    return []


def resolve_start_model(spec: str) -> Path:
    """`tiny` / `realistic` write those models under models/; anything else is a directory."""
    if spec == "tiny":
        from idselect.tiny_checkpoint import write_tiny_llava

        return write_tiny_llava(ROOT / "models" / "tiny-llava")
    if spec == "realistic":
        from benchmarks.realistic_model import write_realistic_llava

        return write_realistic_llava(ROOT / "models" / "realistic-llava")
    return Path(spec)


def _describe(base_url: str, api_key: str | None) -> tuple[str, str | None]:
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    models = httpx.get(base_url + "/v1/models", headers=headers, timeout=30).json()["data"]
    return models[0]["id"], models[0].get("root")


@contextmanager
def connect(
    base_url: str | None,
    start: str | None,
    server_args: str | None,
    out_dir: Path,
    api_key: str | None = None,
    startup_timeout: float = 900,
) -> Iterator[Target]:
    """Use the server at `base_url`, or start `idselect serve` on 127.0.0.1 for `start`."""
    if start is None:
        url = (base_url or "http://127.0.0.1:8000").rstrip("/")
        model, root = _describe(url, api_key)
        yield Target(url, model, root)
        return

    from devtools.launch import running_server

    model_dir = resolve_start_model(start)
    args = shlex.split(server_args) if server_args is not None else default_server_args(model_dir)
    log_path = out_dir / "server.log"
    print(f"starting idselect serve {model_dir} {' '.join(args)} (log: {log_path}) ...",
          file=sys.stderr, flush=True)
    with running_server(model_dir, log_path, *args, startup_timeout=startup_timeout) as server:
        model, root = _describe(server.base_url, api_key)
        yield Target(server.base_url, model, root, True, args, str(log_path))


def scrape_metrics(base_url: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of /metrics, keyed by (name, sorted labels)."""
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(base_url + "/metrics", timeout=30).text
    samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return samples


def metric(samples: dict, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def metric_total(samples: dict, name: str) -> float:
    """A metric summed over all its label values."""
    return sum(value for (n, _), value in samples.items() if n == name)


# ------------------------------------------------------------------------------------ machine


def machine_info() -> dict:
    """What the figures were measured on: cores, CPU model, RAM, load, Python."""
    cpu = platform.processor() or "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    ram_gib = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                ram_gib = round(int(line.split()[1]) / 1024**2, 1)
    except OSError:
        pass
    try:
        load = list(os.getloadavg())
    except OSError:
        load = None
    return {
        "nproc": os.cpu_count(),
        "cpu_model": cpu,
        "ram_gib": ram_gib,
        "load_average": load,
        "platform": platform.platform(),
        "python": platform.python_version(),
    }


def describe_machine(info: dict) -> str:
    load = info.get("load_average")
    load_text = f", load average {load[0]:.1f}" if load else ""
    return (f"{info['nproc']} CPU cores ({info['cpu_model']}), {info['ram_gib']} GiB RAM"
            f"{load_text}")


# ------------------------------------------------------------------------------------- images


def synthetic_image(seed: int, size: int = 336):
    """A reproducible picture with structure (colour blocks, a disc, noise): unique per seed."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    blocks = rng.integers(0, 256, size=(6, 6, 3), dtype=np.uint8)
    img = np.kron(blocks, np.ones((size // 6 + 1, size // 6 + 1, 1), dtype=np.uint8))[:size, :size]
    img = img.astype(np.int16)
    y, x = np.mgrid[0:size, 0:size]
    cy, cx, r = rng.integers(size // 4, 3 * size // 4, size=3)
    img[(x - cx) ** 2 + (y - cy) ** 2 < (r // 2) ** 2] = rng.integers(0, 256, size=3)
    img += rng.integers(-20, 21, size=img.shape, dtype=np.int16)
    return Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))


def data_url(image, fmt: str = "PNG") -> str:
    buf = io.BytesIO()
    image.save(buf, format=fmt)
    mime = "jpeg" if fmt.upper() in ("JPG", "JPEG") else fmt.lower()
    return f"data:image/{mime};base64," + base64.b64encode(buf.getvalue()).decode()


def image_url_for(path_or_url: str, base_dir: Path | None = None) -> str:
    """Data URLs and http(s) URLs pass through; file paths become data URLs."""
    if path_or_url.startswith(("data:", "http://", "https://")):
        return path_or_url
    path = Path(path_or_url)
    if not path.is_absolute() and base_dir is not None:
        path = base_dir / path
    suffix = path.suffix.lower().lstrip(".") or "png"
    mime = "jpeg" if suffix in ("jpg", "jpeg") else suffix
    return f"data:image/{mime};base64," + base64.b64encode(path.read_bytes()).decode()


# --------------------------------------------------------------------------------------- stats


def percentile(values: Sequence[float], q: float) -> float | None:
    return float(np.percentile(values, q)) if len(values) else None


def summary(values: Sequence[float]) -> dict:
    if not values:
        return {"p50": None, "p99": None, "mean": None, "min": None, "max": None}
    return {
        "p50": percentile(values, 50),
        "p99": percentile(values, 99),
        "mean": float(np.mean(values)),
        "min": float(np.min(values)),
        "max": float(np.max(values)),
    }


def pyplot():
    """matplotlib's pyplot on the Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def fmt(value: float | None, spec: str, missing: str = "-") -> str:
    return missing if value is None else format(value, spec)


def server_args_hint(args: Sequence[str]) -> str:
    return " ".join(shlex.quote(a) for a in args)
