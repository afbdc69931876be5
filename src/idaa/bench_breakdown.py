"""`idaa bench step --breakdown`: milliseconds per component of an IDAA step, to see where its extra cost goes.

Each component runs on its own on the benchmark's batch (SimCLR's backbone + projector, the protocol's VAE),
interleaved over rounds like the step benchmark, median kept. A step is a sum of these parts: SimCLR is the
views plus two clean forwards and backwards; the shared-graph attack with a detached anchor adds one
adversarial forward and backward plus the VAE's encode, decode (kept for the VJP), VJP and second decode.
"""

from __future__ import annotations

import copy
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch

from idaa.bench import BenchConfig, benchmark_vae
from idaa.data.views import build_view_policy
from idaa.devices import resolve_device, tune_cpu_allocator
from idaa.methods import build_method
from idaa.nets import VAE, build_backbone

Parts = dict[str, Callable[[], Any]]


def _backbone_parts(method: Any, v1: torch.Tensor) -> Parts:
    """Forward and backward of one view through backbone + projector, clean (main BN) and adversarial."""
    weight = torch.randn(method.embed(v1).shape, device=v1.device)

    def forward(adv: bool) -> Callable[[], Any]:
        return lambda: method.embed(v1, adv=adv)

    def backward(adv: bool) -> Callable[[], Any]:
        def run() -> Callable[[], Any]:  # the forward is set up untimed; the returned closure is the timed part
            z = method.embed(v1, adv=adv)
            return lambda: (z * weight).sum().backward()
        return run

    def input_gradient() -> Callable[[], Any]:
        x = v1.detach().requires_grad_(True)
        z = method.embed(x)
        return lambda: torch.autograd.grad((z * weight).sum(), x)

    return {"backbone forward, clean view": forward(False), "backbone backward, clean view": backward(False),
            "backbone forward, adversarial view": forward(True),
            "backbone backward, adversarial view": backward(True),
            "attack gradient alone (clean-graph mode)": input_gradient}


def _vae_parts(vae: VAE, v1: torch.Tensor, label: str) -> Parts:
    """The frozen VAE's four passes in an FGSM IDAA attack."""
    with torch.no_grad():
        mu = vae.encode_mean(v1)
    upstream = torch.randn_like(v1)

    def encode() -> Any:
        with torch.no_grad():
            return vae.encode_mean(v1)

    def decode_kept() -> Any:
        delta = torch.zeros_like(mu, requires_grad=True)
        return vae.decode(mu + delta)

    def vjp() -> Callable[[], Any]:
        delta = torch.zeros_like(mu, requires_grad=True)
        out = vae.decode(mu + delta)
        return lambda: torch.autograd.grad(out, delta, grad_outputs=upstream)

    def decode_again() -> Any:
        with torch.no_grad():
            return vae.decode(mu + 0.1)

    return {f"VAE encode (mu), {label}": encode, f"VAE decode kept for the VJP, {label}": decode_kept,
            f"VAE VJP, {label}": vjp, f"VAE second decode, {label}": decode_again}


def _median_ms(parts: Parts, views: Callable[[], Any], rounds: int, warmup: int, sync: Callable[[], None]) -> dict:
    """Each part timed once per round, interleaved; a part that returns a callable times only that callable."""
    times: dict[str, list[float]] = {name: [] for name in [*parts, "two SimCLR views"]}
    for round_ in range(warmup + rounds):
        for name, part in [*parts.items(), ("two SimCLR views", views)]:
            sync()
            start = time.perf_counter()
            result = part()
            if callable(result):
                sync()
                start = time.perf_counter()
                result()
            sync()
            if round_ >= warmup:
                times[name].append(time.perf_counter() - start)
    return {name: 1000 * statistics.median(values) for name, values in times.items()}


def bench_breakdown(cfg: BenchConfig) -> dict[str, Any]:
    """Milliseconds per step component for `cfg` (a BenchConfig), with the VAE in fp32 and in bf16."""
    device = resolve_device(cfg.device)
    tune_cpu_allocator()  # the same heap reuse as the step benchmark
    vae = benchmark_vae(cfg, device)
    method = build_method("simclr", build_backbone(cfg.backbone, width=cfg.width)).to(device).train()
    source = torch.randint(0, 256, (cfg.batch_size, 3, cfg.image_size, cfg.image_size), dtype=torch.uint8,
                           device=device)
    policy = build_view_policy("simclr", cfg.image_size, (0.5,) * 3, (0.25,) * 3).to(device)
    v1 = policy(source)
    parts = _backbone_parts(method, v1)
    parts |= _vae_parts(vae, v1, "fp32")
    parts |= _vae_parts(copy.copy(vae).set_precision("bf16"), v1, "bf16")

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    ms = _median_ms(parts, lambda: (policy(source), policy(source)), cfg.rounds, cfg.warmup, sync)
    return {"config": {**cfg.__dict__, "modes": list(cfg.modes), "device": str(device),
                       "threads": torch.get_num_threads()}, "ms": ms, "estimates": _estimates(ms)}


def _estimates(ms: dict[str, float]) -> dict[str, float]:
    """Step times as sums of parts: SimCLR, and the shared-graph detached-anchor attack with each VAE precision."""
    view = ms["backbone forward, clean view"] + ms["backbone backward, clean view"]
    adversarial = ms["backbone forward, adversarial view"] + ms["backbone backward, adversarial view"]
    none = ms["two SimCLR views"] + 2 * view
    out = {"simclr (none)": none}
    for label in ("fp32", "bf16"):
        vae = sum(v for k, v in ms.items() if k.startswith("VAE") and k.endswith(label))
        out[f"VAE, {label}"] = vae
        out[f"idaa-shared-detached, VAE {label}"] = none + adversarial + vae
    return out


def format_breakdown(result: dict[str, Any]) -> str:
    """The markdown tables `idaa bench step --breakdown` prints: parts, then step estimates as ratios to SimCLR."""
    c, ms, est = result["config"], result["ms"], result["estimates"]
    none = est["simclr (none)"]
    lines = [f"{c['backbone']} width {c['width'] or 'full'}, batch {c['batch_size']}, {c['image_size']} px, "
             f"{c['device']} ({c['threads']} threads), VAE latent {c['latent_dim']}, median of {c['rounds']} rounds",
             "", "| component | ms | x one clean view (fwd+bwd) |", "| --- | ---: | ---: |"]
    view = ms["backbone forward, clean view"] + ms["backbone backward, clean view"]
    for name, value in ms.items():
        lines.append(f"| {name} | {value:.1f} | {value / view:.2f} |")
    lines += ["", "| step, as a sum of parts | ms | x simclr | VAE share |", "| --- | ---: | ---: | ---: |"]
    for name, value in est.items():
        if name.startswith("VAE,"):
            continue
        label = name.rsplit(" ", 1)[-1]
        share = est.get(f"VAE, {label}", 0.0) / value if name.startswith("idaa") else 0.0
        lines.append(f"| {name} | {value:.1f} | {value / none:.2f} | {100 * share:.0f}% |")
    return "\n".join(lines)
