"""tune_cpu_allocator: a step's freed activations are reused instead of page-faulted in again."""

import os
import subprocess
import sys

import pytest

# a "step" that allocates six 40 MB blocks (above glibc's largest mmap threshold) and frees them; the probe
# prints whether the tuning is on and the page faults of the last of four steps
PROBE = r"""
import resource, torch
from idaa.devices import tune_cpu_allocator
print(tune_cpu_allocator())
def step():
    blocks = [torch.ones(40 * 2**20 // 4) for _ in range(6)]
    return sum(float(b[0]) for b in blocks)
for _ in range(4):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    step()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def probe(tuning: str) -> tuple[str, int]:
    env = {**os.environ, "IDAA_MALLOC_TUNING": tuning}
    out = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, env=env, check=True).stdout
    tuned, faults = out.split()
    return tuned, int(faults)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_tuned_allocator_reuses_freed_blocks_instead_of_faulting_them_in():
    tuned, faults_tuned = probe("1")
    if tuned != "True":
        pytest.skip("not glibc")
    untuned, faults_plain = probe("0")
    assert untuned == "False"
    pages = 6 * 40 * 2**20 // 4096
    assert faults_plain > pages // 2, "without tuning every block is mmapped and faulted in afresh each step"
    assert faults_tuned < pages // 10, "with tuning a step reuses the blocks the previous one freed"


# frees 200 MB of 1 KB blocks (every 100th kept, so the heap cannot shrink from its top), then releases them
RELEASE_PROBE = r"""
from idaa.devices import release_free_memory, tune_cpu_allocator
def rss_mb():
    return int(open("/proc/self/status").read().split("VmRSS:")[1].split()[0]) // 1024
print(tune_cpu_allocator())
blocks = [bytes(1024) for _ in range(200_000)]
kept = blocks[::100]
del blocks
before = rss_mb()
print(release_free_memory(), before - rss_mb())
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc_trim")
def test_release_free_memory_hands_freed_heap_pages_back() -> None:
    out = subprocess.run([sys.executable, "-c", RELEASE_PROBE], capture_output=True, text=True, check=True).stdout
    tuned, released, dropped_mb = out.split()
    if tuned != "True":
        pytest.skip("not glibc")
    assert released == "True" and int(dropped_mb) > 100, out


def test_worker_loaders_release_free_memory_before_forking(monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    from idaa.data import crops

    calls = []
    monkeypatch.setattr(crops, "release_free_memory", lambda: calls.append(1) or True)
    crops.image_loader(list(range(4)), [[0, 1], [2, 3]], 0, torch.device("cpu"))
    assert calls == []
    crops.image_loader(list(range(4)), [[0, 1], [2, 3]], 2, torch.device("cpu"))
    assert calls == [1]
