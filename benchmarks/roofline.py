"""The CPU's peak arithmetic rate and the FLOPs an engine runs, for the benchmark's roofline columns.

Details: docs/measurements.md.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import torch
from torch import nn

from export.rewrite import PADDING_FREE_WINDOWS, padding_free_windows
from icmoe.core.manifest import read_manifest

VECTOR_EXTENSIONS = ("avx512f", "avx512_vnni", "avx512_bf16", "amx_int8", "amx_bf16", "avx_vnni", "avx2", "fma",
                     "avx", "sse4_2")
REWRITE_CONTEXTS = {PADDING_FREE_WINDOWS: padding_free_windows}


CLOCK_PROBE = r"""
#include <stdio.h>
#include <time.h>
int main(void) {
  struct timespec a, b;
  unsigned long x = 0, n = 2000000000UL;
  clock_gettime(CLOCK_MONOTONIC, &a);
  for (unsigned long i = 0; i < n; i += 10)  /* 10 dependent adds: 10 cycles per iteration */
    __asm__ volatile("add $1,%0\n add $1,%0\n add $1,%0\n add $1,%0\n add $1,%0\n"
                     "add $1,%0\n add $1,%0\n add $1,%0\n add $1,%0\n add $1,%0\n" : "+r"(x));
  clock_gettime(CLOCK_MONOTONIC, &b);
  printf("%f\n", n / ((b.tv_sec - a.tv_sec) + (b.tv_nsec - a.tv_nsec) * 1e-9) / 1e9);
  return x != n;
}
"""


def measure_clock_ghz() -> Optional[float]:
    """The core clock under load in GHz (see the module docstring), or None without an x86 C compiler."""
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None or os.uname().machine not in ("x86_64", "AMD64"):
        return None
    with tempfile.TemporaryDirectory(prefix="icmoe-clock-") as tmp:
        src, exe = Path(tmp) / "clock.c", Path(tmp) / "clock"
        src.write_text(CLOCK_PROBE)
        try:
            subprocess.run([cc, "-O2", str(src), "-o", str(exe)], check=True, capture_output=True, timeout=60)
            runs = [float(subprocess.run([str(exe)], check=True, capture_output=True, text=True, timeout=60).stdout)
                    for _ in range(2)]
        except (subprocess.SubprocessError, OSError, ValueError):
            return None
    return max(runs)  # the less disturbed run


@dataclass
class CpuPeak:
    """What the roofline columns divide by (see the module docstring for the formula)."""

    model: str
    cores: int
    clock_ghz: float
    extensions: List[str] = field(default_factory=list)
    vector_bits: int = 128
    fma_units: int = 2
    vnni: bool = False
    clock_source: str = "/proc/cpuinfo"
    bf16: bool = False  # AVX512-BF16: a dot product of two BF16 pairs per FP32 lane and FMA

    @property
    def fp32_gflops(self) -> float:
        return self.cores * self.clock_ghz * (self.vector_bits // 32) * 2 * self.fma_units

    @property
    def int8_gops(self) -> float:
        lanes = self.vector_bits // 8 if self.vnni else self.vector_bits // 16
        return self.cores * self.clock_ghz * lanes * 2 * self.fma_units

    @property
    def bf16_gflops(self) -> float:
        """vdpbf16ps: two BF16 products per FP32 lane, so twice FP32's rate where the CPU has AVX512-BF16."""
        return self.fp32_gflops * (2 if self.bf16 else 1)

    def peak(self, precision: str) -> float:
        """GFLOP/s (GOP/s for int8) of the precision an engine computes in (FP16 on a CPU runs as FP32; INT8
        with a BF16 remainder counts at the INT8 peak)."""
        if precision.startswith("int8"):
            return self.int8_gops
        return self.bf16_gflops if precision == "bf16" else self.fp32_gflops

    def describe(self) -> str:
        return (f"{self.model}, {self.cores} cores at {self.clock_ghz:.2f} GHz ({self.clock_source}), "
                f"{self.vector_bits}-bit vectors "
                f"({', '.join(self.extensions) or 'none'}), {self.fma_units} FMA units: peak "
                f"{self.fp32_gflops:.0f} GFLOP/s FP32, {self.bf16_gflops:.0f} BF16, {self.int8_gops:.0f} GOP/s INT8")

    def to_dict(self) -> Dict:
        return {**asdict(self), "fp32_gflops": self.fp32_gflops, "bf16_gflops": self.bf16_gflops,
                "int8_gops": self.int8_gops}


def _cpuinfo() -> Dict[str, str]:
    """The first processor's fields of /proc/cpuinfo (empty elsewhere)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return {}
    fields: Dict[str, str] = {}
    for line in text.split("\n\n")[0].splitlines():
        key, _, value = line.partition(":")
        fields[key.strip()] = value.strip()
    return fields


def cpu_peak(cores: Optional[int] = None, *, clock_ghz: Optional[float] = None, fma_units: int = 2) -> CpuPeak:
    """This machine's CPU: model, vector extensions and peak rates.

    Arguments:
      cores: cores the engines use (default: the usable cores).
      clock_ghz: the clock in GHz (default: measured, else /proc/cpuinfo's).
      fma_units: FMA units per core (not visible to software; 2 on current server cores).
    """
    info = _cpuinfo()
    flags = set(info.get("flags", "").split())
    extensions = [e for e in VECTOR_EXTENSIONS if e in flags]
    bits = 512 if "avx512f" in flags else 256 if "avx2" in flags else 128
    if clock_ghz:
        source = "--clock-ghz"
    else:
        clock_ghz = measure_clock_ghz()
        source = "measured"
        if clock_ghz is None:
            clock_ghz, source = float(info.get("cpu MHz", "0") or 0) / 1000.0, "/proc/cpuinfo, nominal"
    return CpuPeak(model=info.get("model name", "unknown CPU"), cores=cores or len(os.sched_getaffinity(0)),
                   clock_ghz=clock_ghz, extensions=extensions, vector_bits=bits, fma_units=fma_units,
                   vnni=bool(flags & {"avx512_vnni", "avx_vnni"}), clock_source=source, bf16="avx512_bf16" in flags)


def gflops_per_image(model: nn.Module, image_size: int, *, rewrites: Sequence[str] = (),
                     patches: Optional[contextlib.AbstractContextManager] = None) -> float:
    """GFLOPs (2 per multiply-add) of one image through `model`, optionally as the ONNX graph computes it.

    Arguments:
      model: a family's model (eval mode).
      image_size: the input side S.
      rewrites: names of the export-time rewrites the graph has (`manifest["rewrites"]`).
      patches: the family's export patches for `model` (attention in chunks: the same FLOPs, counted
        on matmuls the counter sees), or None.
    """
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with contextlib.ExitStack() as stack, torch.no_grad():
        if patches is not None:
            stack.enter_context(patches)
        for name in rewrites:
            stack.enter_context(REWRITE_CONTEXTS[name](model))
        with counter:
            model(torch.rand(1, 3, image_size, image_size) * 255)
    return counter.get_total_flops() / 1e9


def build_rewrites(build_dir: Path) -> List[str]:
    """The export-time rewrites a build's graphs carry."""
    return list(read_manifest(build_dir).get("rewrites") or [])
