"""The CLI's allocator policy: freed large blocks are reused instead of being faulted in again."""

import os
import platform
import subprocess
import sys

import pytest

from come.engine import allocator

GLIBC = sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc"

# Allocate, touch and free a 64 MB block 21 times; print the minor page faults of the last nine (glibc needs
# a few rounds to coalesce the freed blocks into one that fits a 64-byte aligned request).
CHILD = """
import resource, sys, torch
from come.engine.allocator import keep_freed_memory
print(keep_freed_memory())
for _ in range(12):
    torch.empty(2**24).fill_(1.0)
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(9):
    torch.empty(2**24).fill_(1.0)
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def _faults(env_value: str) -> tuple[bool, int]:
    env = {**os.environ, allocator.ENV: env_value, "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-c", CHILD], capture_output=True, text=True, env=env, check=True).stdout.split()
    return out[0] == "True", int(out[1])


@pytest.mark.skipif(not GLIBC, reason="the policy is glibc's mallopt")
def test_freed_blocks_are_reused_instead_of_faulted_in_again():
    kept, faults_kept = _faults("1")
    default, faults_default = _faults("0")
    assert kept and not default
    block_pages = 2**26 // 4096
    assert faults_default >= 9 * block_pages * 0.9  # each new block faulted in page by page
    assert faults_kept < block_pages  # the first block's pages, reused


def test_the_cli_sets_the_policy_before_running(monkeypatch):
    from come import cli

    calls = []
    monkeypatch.setattr(allocator, "keep_freed_memory", lambda: calls.append("policy"))
    monkeypatch.setattr(cli, "app", lambda: calls.append("app"))
    cli.main()
    assert calls == ["policy", "app"]
