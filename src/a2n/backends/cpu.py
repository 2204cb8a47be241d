"""What this CPU computes in hardware, read once from the machine (or set, to test the other kind).

bf16 pays only where the CPU has it natively (AVX512-BF16 or AMX on x86, ARM's bf16 extension);
elsewhere torch emulates it about 100x slower than fp32. The environment variable A2N_NATIVE_BF16=1
or 0 overrides the detection: the test suite uses it to run the bf16 logic on every CPU, and a user
whose CPU is misread can set it.
"""

from __future__ import annotations

import os
import platform
from pathlib import Path


def cpu_flags() -> set[str]:
    """The feature flags of the first CPU in /proc/cpuinfo (x86 'flags', ARM 'Features'); empty without it."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return set(line.partition(":")[2].split())
    except OSError:
        pass
    return set()


def native_bf16() -> bool:
    """Whether this CPU computes bf16 in hardware (A2N_NATIVE_BF16=1/0 overrides the detection)."""
    forced = os.environ.get("A2N_NATIVE_BF16")
    if forced in ("0", "1"):
        return forced == "1"
    flags = cpu_flags()
    if not flags:
        return platform.machine() == "arm64"  # Apple silicon: no /proc/cpuinfo, bf16 from M2 on
    return bool(flags & {"avx512_bf16", "amx_bf16", "bf16"})

