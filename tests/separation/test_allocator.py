"""demix.separation.allocator: a process running the model reuses the memory its forwards free."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

pytestmark = pytest.mark.processes

# The same small network run over and over, as a worker runs one window after another:
# prints the page faults of one pass once the passes are in a steady state.
FAULTS_PER_PASS = """
import json, resource, sys, torch
from demix.separation.allocator import keep_freed_memory_for_reuse
if sys.argv[1] == "tuned":
    assert keep_freed_memory_for_reuse() and keep_freed_memory_for_reuse()  # and again: idempotent
torch.set_num_threads(1)
faults = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_minflt
x = torch.randn(64, 256, 1024)  # 64 MiB activations: above glibc's largest mmap threshold
conv = torch.nn.Conv1d(256, 256, 3, padding=1)
with torch.inference_mode():
    for _ in range(3):
        conv(torch.relu(conv(x)) + x)
    before = faults()
    for _ in range(5):
        conv(torch.relu(conv(x)) + x)
print(json.dumps((faults() - before) // 5))
"""
ACTIVATION_PAGES = 64 * 1024 * 1024 // 4096


def faults_per_pass(mode: str) -> int:
    out = subprocess.run([sys.executable, "-c", FAULTS_PER_PASS, mode], capture_output=True, text=True,
                         check=True, timeout=300)
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the tuning is glibc's")
def test_each_pass_reuses_the_memory_the_last_one_freed():
    # glibc's default: every activation is a fresh mmap, each of its pages faulted in.
    assert faults_per_pass("default") > 3 * ACTIVATION_PAGES
    assert faults_per_pass("tuned") < ACTIVATION_PAGES // 10
