"""`idaa bench step`: the per-step cost of SimCLR with each adversary, measured side by side in one process.

Modes are interleaved (one step of each per round, warm-up rounds dropped, median over rounds), so a busy
machine slows them alike and the ratios to `none` stay meaningful. Memory is the CUDA allocator's peak on
GPUs; on CPU it is the size of the tensors autograd saves for the backward pass (the activation memory that
grows with the step's structure), since CPU allocations are not tracked by torch.
"""

from __future__ import annotations

import copy
import statistics
import time
import weakref
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch

from idaa.adversaries import build_adversary
from idaa.data.views import build_view_policy
from idaa.devices import resolve_device, tune_cpu_allocator
from idaa.errors import IdaaError
from idaa.methods import build_method
from idaa.nets import VAE, build_backbone
from idaa.train.step import apply_speedups, forward_backward, to_memory_format


class Mode(NamedTuple):
    """One benchmarked step: the adversary and how its attack is computed."""

    adversary: str
    graph: str = "separate"
    fraction: float = 1.0
    anchor: str = "live"
    vae_precision: str = "fp32"


MODES: dict[str, Mode] = {
    "none": Mode("none"),
    "idaa": Mode("idaa"),
    "idaa-clean": Mode("idaa", "clean"),
    "idaa-clean-frac0.25": Mode("idaa", "clean", 0.25),
    "idaa-frac0.25": Mode("idaa", "separate", 0.25),
    "idaa-shared": Mode("idaa", "shared"),
    "idaa-shared-frac0.25": Mode("idaa", "shared", 0.25),
    "idaa-shared-detached": Mode("idaa", "shared", 1.0, "detached"),
    "idaa-shared-detached-frac0.25": Mode("idaa", "shared", 0.25, "detached"),
    "idaa-shared-detached-vaebf16": Mode("idaa", "shared", 1.0, "detached", "bf16"),
    "idaa-shared-detached-frac0.25-vaebf16": Mode("idaa", "shared", 0.25, "detached", "bf16"),
    "clae": Mode("clae"),
    "clae-shared": Mode("clae", "shared"),
}


@dataclass
class BenchConfig:
    """What `idaa bench step` measures; the defaults are the speed issue's CPU setting."""

    backbone: str = "resnet18-cifar"
    width: int | None = None
    batch_size: int = 64
    image_size: int = 32
    latent_dim: int = 512
    modes: tuple[str, ...] = ("none", "idaa", "idaa-clean", "idaa-clean-frac0.25", "clae")
    rounds: int = 10
    warmup: int = 2
    device: str = "auto"
    precision: str = "fp32"
    channels_last: bool = False
    compile: bool = False
    seed: int = 0

    def validate(self) -> BenchConfig:
        unknown = [m for m in self.modes if m not in MODES]
        if unknown or not self.modes:
            raise IdaaError(f"unknown bench mode(s) {', '.join(unknown) or '(none given)'}; choose from "
                            f"{', '.join(MODES)}")
        for key in ("batch_size", "rounds", "latent_dim"):
            if getattr(self, key) < 1:
                raise IdaaError(f"--{key.replace('_', '-')} must be >= 1, got {getattr(self, key)}")
        if self.warmup < 0:
            raise IdaaError(f"--warmup must be >= 0, got {self.warmup}")
        if self.precision not in ("fp32", "bf16"):
            raise IdaaError(f"--precision must be fp32 or bf16, got {self.precision!r}")
        return self


def _saved_bytes(step: Callable[[], None]) -> int:
    """Peak bytes of the tensors autograd holds for backward during `step` (CPU's activation memory).

    Each saved storage is counted once while any graph holds it; a graph freed early (the attack's, after its
    input gradient) gives its memory back, as the allocator would.
    """
    holders: dict[int, int] = {}
    sizes: dict[int, int] = {}
    live, peak = 0, 0

    def release(key: int) -> None:
        nonlocal live
        holders[key] -= 1
        if holders[key] == 0:
            live -= sizes.pop(key)
            del holders[key]

    def pack(t: torch.Tensor) -> torch.Tensor:
        nonlocal live, peak
        try:
            key = t.untyped_storage().data_ptr()
            nbytes = t.untyped_storage().nbytes()
        except (RuntimeError, NotImplementedError):
            return t
        box = _Box(t)
        if key not in holders:
            holders[key], sizes[key] = 0, nbytes
            live += nbytes
            peak = max(peak, live)
        holders[key] += 1
        weakref.finalize(box, release, key)
        return box

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda box: box.tensor if isinstance(box, _Box) else box):
        step()
    return peak


class _Box:
    """Holds a saved tensor; its finalizer tells `_saved_bytes` when autograd lets go of it."""

    __slots__ = ("tensor", "__weakref__")

    def __init__(self, tensor: torch.Tensor) -> None:
        self.tensor = tensor


def benchmark_vae(cfg: BenchConfig, device: torch.device) -> VAE:
    """The protocol-sized VAE, frozen, with BN statistics warmed on noise so its outputs have a realistic scale."""
    torch.manual_seed(cfg.seed)
    vae = VAE(image_size=cfg.image_size, channels=3, latent_dim=cfg.latent_dim).to(device)
    vae.train()
    with torch.no_grad():
        vae(torch.randn(32, 3, cfg.image_size, cfg.image_size, device=device))
    return vae.freeze()


def _runner(spec: Mode, cfg: BenchConfig, device: torch.device, vae: VAE, v1: torch.Tensor, v2: torch.Tensor,
            autocast: Any) -> Callable[[], None]:
    """One training step of SimCLR in this mode (forward, backward, optimiser), on fixed views."""
    torch.manual_seed(cfg.seed)
    method = build_method("simclr", build_backbone(cfg.backbone, width=cfg.width)).to(device).train()
    apply_speedups(method, cfg.channels_last, cfg.compile)
    method.attack_graph, method.attack_fraction, method.adversarial_anchor = spec.graph, spec.fraction, spec.anchor
    mode_vae = copy.copy(vae).set_precision(spec.vae_precision)  # shares the weights, not the setting
    adversary = None if spec.adversary == "none" else build_adversary(spec.adversary, vae=mode_vae)
    optimizer = torch.optim.Adam(method.parameters(), lr=1e-4)

    def run() -> None:
        optimizer.zero_grad(set_to_none=True)
        forward_backward(method, adversary, v1, v2, autocast=autocast)
        optimizer.step()

    return run


def timer(device: torch.device) -> Callable[[Callable[[], Any]], float]:
    """Seconds one call takes, the device synchronised on both sides."""
    def timed(fn: Callable[[], Any]) -> float:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter() - start
    return timed


def _peak_memory_mb(run: Callable[[], None], device: torch.device) -> float:
    """The CUDA allocator's peak over one step, or on CPU the activations autograd saves."""
    if device.type != "cuda":
        return _saved_bytes(run) / 2**20
    torch.cuda.reset_peak_memory_stats(device)
    run()
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) / 2**20


def bench_step(cfg: BenchConfig) -> dict[str, Any]:
    """Per-mode median step time, images/s and memory, plus the time to make two SimCLR views of the batch."""
    cfg.validate()
    device = resolve_device(cfg.device)
    allocator_tuned = tune_cpu_allocator()
    vae = benchmark_vae(cfg, device)
    source = torch.randint(0, 256, (cfg.batch_size, 3, cfg.image_size, cfg.image_size), dtype=torch.uint8,
                           device=device)
    views = build_view_policy("simclr", cfg.image_size, (0.5,) * 3, (0.25,) * 3).to(device)
    v1, v2 = (to_memory_format(views(source), cfg.channels_last) for _ in range(2))
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if cfg.precision == "bf16" else nullcontext()
    runners = {mode: _runner(MODES[mode], cfg, device, vae, v1, v2, autocast) for mode in cfg.modes}
    runners["views"] = lambda: (views(source), views(source))
    timed, times = timer(device), {name: [] for name in runners}
    for round_ in range(cfg.warmup + cfg.rounds):  # one step of each mode per round: load slows them alike
        for name, run in runners.items():
            elapsed = timed(run)
            if round_ >= cfg.warmup:
                times[name].append(elapsed)
    rows = [{"mode": mode, "ms_per_step": 1000 * statistics.median(times[mode]),
             "memory_mb": _peak_memory_mb(runners[mode], device)} for mode in cfg.modes]
    base = rows[0]
    for r in rows:
        r["images_per_s"] = cfg.batch_size / (r["ms_per_step"] / 1000)
        r["time_ratio"] = r["ms_per_step"] / base["ms_per_step"]
        r["memory_ratio"] = r["memory_mb"] / base["memory_mb"] if base["memory_mb"] else None
    views_ms = 1000 * statistics.median(times["views"])
    return {"config": {**cfg.__dict__, "modes": list(cfg.modes), "device": str(device),
                       "threads": torch.get_num_threads(), "allocator_tuned": allocator_tuned},
            "baseline": base["mode"], "rows": rows, "views_ms": views_ms,
            "views_share_of_baseline_step": views_ms / (views_ms + base["ms_per_step"])}


def format_table(result: dict[str, Any]) -> str:
    """The markdown table `idaa bench step` prints (and docs/results.md shows)."""
    c = result["config"]
    memory_kind = "peak MB" if c["device"].startswith("cuda") else "saved activations MB"
    lines = [f"{c['backbone']} width {c['width'] or 'full'}, batch {c['batch_size']}, {c['image_size']} px, "
             f"{c['device']} ({c['threads']} threads), {c['precision']}"
             f"{', channels_last' if c.get('channels_last') else ''}{', compiled' if c.get('compile') else ''}"
             f"{', heap reuse (IDAA_MALLOC_TUNING)' if c.get('allocator_tuned') else ''}, "
             f"median of {c['rounds']} interleaved rounds",
             "", f"| mode | ms/step | x {result['baseline']} | images/s | {memory_kind} | x {result['baseline']} |",
             "| --- | ---: | ---: | ---: | ---: | ---: |"]
    for r in result["rows"]:
        mem_ratio = f"{r['memory_ratio']:.2f}" if r["memory_ratio"] is not None else "-"
        lines.append(f"| {r['mode']} | {r['ms_per_step']:.1f} | {r['time_ratio']:.2f} | {r['images_per_s']:.1f} | "
                     f"{r['memory_mb']:.0f} | {mem_ratio} |")
    lines += ["", f"two SimCLR views of the batch: {result['views_ms']:.1f} ms "
              f"({100 * result['views_share_of_baseline_step']:.1f}% of a {result['baseline']} step with views)"]
    return "\n".join(lines)
