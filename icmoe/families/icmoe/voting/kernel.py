"""PPAV voting and fusion as one fused Triton kernel (the method: docs/icmoe.md).

Details: docs/icmoe.md.
"""

from __future__ import annotations

import functools
from typing import Any, Dict, Optional

import torch
import triton.language as tl  # this module IS the Triton kernel; icmoe.families.icmoe.voting.op imports it lazily

from icmoe.families.icmoe.voting.reference import Vote

DEFAULT_BLOCK = 1024  # pixels per tile on a GPU: 4 warps x 32 lanes x 8 elements
DEFAULT_NUM_WARPS = 4
KERNEL_NAME = "ppav_kernel"
# Scalar signature of the kernel for triton.compile (AOT): pointers then int32 scalars.
AOT_SIGNATURE = {
    "z0_ptr": "*fp32",
    "z1_ptr": "*fp32",
    "z2_ptr": "*fp32",
    "B": "i32",
    "HW": "i32",
    "logits_ptr": "*fp32",
    "mask_ptr": "*u8",
    "expert_ptr": "*i32",
}


# One function, longer than the usual screen: a Triton kernel is a single JIT-compiled body (helpers would
# have to be @triton.jit functions too, and the AOT plugin needs one entry point with this exact signature).
def ppav_kernel(
    z0_ptr,
    z1_ptr,
    z2_ptr,
    B,
    HW,
    logits_ptr,
    mask_ptr,
    expert_ptr,
    ALPHA: tl.constexpr,
    BALANCE: tl.constexpr,
    THRESHOLD: tl.constexpr,
    BLOCK: tl.constexpr,
):
    pid = tl.program_id(0)
    if BALANCE:
        first = 0
        last = B
    else:
        first = pid
        last = pid + 1
    if THRESHOLD < 0:
        thr = (B + 2) // 3  # ceil(B / 3)
    else:
        thr = THRESHOLD
    big = tl.cast(HW, tl.int64) + 1  # larger than any distance
    cnt0 = tl.zeros((), dtype=tl.int32)
    cnt1 = tl.zeros((), dtype=tl.int32)
    cnt2 = tl.zeros((), dtype=tl.int32)
    lanes = tl.arange(0, BLOCK)
    for b in range(first, last):
        base = tl.cast(b, tl.int64) * HW  # 64-bit offsets: B*H*W may pass 2**31
        # Pass 1: L1 distances of the three candidate masks to the majority target.
        acc0 = tl.zeros((BLOCK,), dtype=tl.int32)
        acc1 = tl.zeros((BLOCK,), dtype=tl.int32)
        acc2 = tl.zeros((BLOCK,), dtype=tl.int32)
        for start in range(0, HW, BLOCK):
            offs = start + lanes
            valid = offs < HW
            z0 = tl.load(z0_ptr + base + offs, mask=valid, other=0.0)
            z1 = tl.load(z1_ptr + base + offs, mask=valid, other=0.0)
            z2 = tl.load(z2_ptr + base + offs, mask=valid, other=0.0)
            z3 = tl.math.div_rn(z0 + z1 + z2, 3.0)  # IEEE division, as PyTorch (plain / is div.full, 2 ulp)
            m0 = ((z0 > 0) & valid).to(tl.int32)
            m1 = ((z1 > 0) & valid).to(tl.int32)
            m3 = ((z3 > 0) & valid).to(tl.int32)
            t = ((m0 + m1 + m3) >= 2).to(tl.int32)
            acc0 += tl.abs(m0 - t)
            acc1 += tl.abs(m1 - t)
            acc2 += tl.abs(m3 - t)
        d0 = tl.sum(acc0, axis=0)
        d1 = tl.sum(acc1, axis=0)
        d2 = tl.sum(acc2, axis=0)
        if BALANCE:
            # Sort key per candidate (int64): allowed ones by distance; a candidate already chosen
            # more than `thr` times goes behind all allowed ones, ordered by its count, then distance.
            d0 = d0.to(tl.int64) + big * (cnt0 > thr).to(tl.int64) * (cnt0.to(tl.int64) + 1)
            d1 = d1.to(tl.int64) + big * (cnt1 > thr).to(tl.int64) * (cnt1.to(tl.int64) + 1)
            d2 = d2.to(tl.int64) + big * (cnt2 > thr).to(tl.int64) * (cnt2.to(tl.int64) + 1)
        # argmin with ties to the lowest position
        pick = tl.where((d0 <= d1) & (d0 <= d2), 0, tl.where(d1 <= d2, 1, 2)).to(tl.int32)
        cnt0 += (pick == 0).to(tl.int32)
        cnt1 += (pick == 1).to(tl.int32)
        cnt2 += (pick == 2).to(tl.int32)
        tl.store(expert_ptr + b, pick)
        # Pass 2: fuse the chosen candidate with the main (adaptive) expert.
        for start in range(0, HW, BLOCK):
            offs = start + lanes
            valid = offs < HW
            z0 = tl.load(z0_ptr + base + offs, mask=valid, other=0.0)
            z1 = tl.load(z1_ptr + base + offs, mask=valid, other=0.0)
            z2 = tl.load(z2_ptr + base + offs, mask=valid, other=0.0)
            z3 = tl.math.div_rn(z0 + z1 + z2, 3.0)  # IEEE division, as PyTorch (plain / is div.full, 2 ulp)
            chosen = tl.where(pick == 0, z0, tl.where(pick == 1, z1, z3))
            out = z2 + ALPHA * chosen
            tl.store(logits_ptr + base + offs, out, mask=valid)
            tl.store(mask_ptr + base + offs, (out > 0).to(tl.uint8), mask=valid)


@functools.lru_cache(maxsize=1)
def get_kernel() -> Any:
    """The kernel wrapped by `triton.jit`: compiled, or interpreted when TRITON_INTERPRET=1.

    Triton 3.x reads TRITON_INTERPRET when `triton.jit` runs, and its standard
    library (tl.sum, tl.zeros, ...) is wrapped when triton is first imported:
    the interpreter therefore needs TRITON_INTERPRET=1 in the environment
    BEFORE triton is imported (the tests run it in a fresh subprocess).
    """
    import triton

    return triton.jit(ppav_kernel)


def interpreting() -> bool:
    """True when Triton runs kernels in its CPU interpreter (TRITON_INTERPRET=1)."""
    from triton import knobs

    return bool(knobs.runtime.interpret)


def launch_grid(batch: int, balance: bool) -> tuple:
    """One program per sample, or a single program walking the batch in order when balancing."""
    return (1,) if balance else (batch,)


def _check(z0: torch.Tensor, z1: torch.Tensor, z2: torch.Tensor) -> None:
    if not (z0.shape == z1.shape == z2.shape) or z0.dim() != 4 or z0.shape[1] != 1:
        raise ValueError(
            f"expert logits must share one (B, 1, H, W) shape, got {tuple(z0.shape)}, "
            f"{tuple(z1.shape)}, {tuple(z2.shape)}"
        )
    if not (z0.dtype == z1.dtype == z2.dtype == torch.float32):
        raise ValueError(f"expert logits must be float32, got {z0.dtype}, {z1.dtype}, {z2.dtype}")
    if not (z0.device == z1.device == z2.device):
        raise ValueError(f"expert logits must be on one device, got {z0.device}, {z1.device}, {z2.device}")
    if z0[0].numel() >= 2**30:
        raise ValueError(f"H*W = {z0[0].numel()} is too large for the kernel's int32 pixel counts")


def ppav_triton(
    z0: torch.Tensor,
    z1: torch.Tensor,
    z2: torch.Tensor,
    *,
    alpha: float = 0.5,
    balance: bool = False,
    threshold: Optional[int] = None,
    block: Optional[int] = None,
    num_warps: int = DEFAULT_NUM_WARPS,
) -> Vote:
    """Inference voting and fusion with the fused kernel; same results as `icmoe.families.icmoe.voting.ppav` (target=None).

    Arguments:
      z0, z1, z2: float32 logits of the basic, semantic and adaptive experts, (B, 1, H, W),
        on one device (CUDA: compiled kernel; CPU: Triton's interpreter).
      alpha: fusion weight.
      balance: load balancing over the batch (off at inference).
      threshold: balancing threshold, default ceil(B / 3).
      block: pixels per tile (power of two); default 1024.
      num_warps: warps per program (compiled path only).

    Returns:
      Vote(logits (B,1,H,W) float32, mask (B,1,H,W) uint8, expert (B,) int32).
    """
    _check(z0, z1, z2)
    block = DEFAULT_BLOCK if block is None else int(block)
    if block <= 0 or block & (block - 1):
        raise ValueError(f"block must be a positive power of two, got {block}")
    if threshold is not None and threshold < 0:
        raise ValueError(f"threshold must be >= 0, got {threshold}")
    b = z0.shape[0]
    hw = z0.shape[2] * z0.shape[3]
    z0, z1, z2 = (z.contiguous() for z in (z0, z1, z2))
    logits = torch.empty_like(z0)
    mask = torch.empty(z0.shape, dtype=torch.uint8, device=z0.device)
    expert = torch.empty((b,), dtype=torch.int32, device=z0.device)
    if b == 0 or hw == 0:
        return Vote(logits, mask, expert)
    interpret = interpreting()
    if z0.device.type != "cuda" and not interpret:
        raise ValueError(
            f"the Triton voting kernel needs CUDA tensors, got {z0.device}; on a CPU it runs only under "
            "Triton's interpreter (TRITON_INTERPRET=1 set before triton is imported)"
        )
    kernel = get_kernel()
    consts: Dict[str, Any] = dict(
        ALPHA=float(alpha), BALANCE=bool(balance), THRESHOLD=-1 if threshold is None else int(threshold), BLOCK=block
    )
    launch: Dict[str, Any] = {} if interpret else dict(num_warps=num_warps, enable_fp_fusion=False)
    kernel[launch_grid(b, balance)](z0, z1, z2, b, hw, logits, mask, expert, **consts, **launch)
    return Vote(logits, mask, expert)


def compile_aot(
    *,
    alpha: float,
    balance: bool,
    threshold: int,
    arch: int,
    block: int = DEFAULT_BLOCK,
    num_warps: int = DEFAULT_NUM_WARPS,
) -> Any:
    """Compile the kernel ahead of time for one CUDA architecture (for the TensorRT AOT plugin).

    Arguments:
      alpha, balance: as in `ppav_triton`; threshold: -1 for ceil(B / 3).
      arch: compute capability as an int (e.g. 80, 89, 90).
      block, num_warps: tile size and warps per program.

    Returns:
      Triton's CompiledKernel: `.asm["ptx"]` holds the PTX, `.metadata.name` the
      entry point, `.metadata.num_warps` and `.metadata.shared` the launch sizes.

    Needs Triton's CUDA backend (the `triton` wheel ships it and ptxas); it
    does not need a GPU to produce PTX when `arch` is given, but the PTX only
    runs on one.
    """
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.runtime.jit import JITFunction

    src = triton.compiler.ASTSource(
        fn=JITFunction(ppav_kernel),  # always the compiler's wrapper, even under TRITON_INTERPRET
        signature=dict(AOT_SIGNATURE, ALPHA="constexpr", BALANCE="constexpr", THRESHOLD="constexpr", BLOCK="constexpr"),
        constexprs={"ALPHA": float(alpha), "BALANCE": bool(balance), "THRESHOLD": int(threshold), "BLOCK": int(block)},
    )
    options = {"num_warps": int(num_warps), "enable_fp_fusion": False}
    return triton.compile(src, target=GPUTarget("cuda", int(arch), 32), options=options)


def aot_ptx(compiled: Any) -> str:
    """PTX of an AOT-compiled kernel with exactly the parameters TensorRT passes.

    Triton 3.3+ appends two pointer parameters (global and profile scratch) to
    every kernel. TensorRT's AOT plugins launch the entry point with the
    plugin's tensors and scalars only (inputs, int32 scalars, outputs), so the
    trailing scratch parameters are removed from the entry signature, which is
    only safe because this kernel needs no scratch memory: that is checked
    (scratch sizes 0, parameters never referenced in the body).

    Raises:
      RuntimeError: the PTX does not have the expected form (a Triton change).
    """
    meta = compiled.metadata
    name = meta.name
    ptx: str = compiled.asm["ptx"]
    n_args = len(AOT_SIGNATURE)
    if getattr(meta, "global_scratch_size", 0) or getattr(meta, "profile_scratch_size", 0):
        raise RuntimeError(f"{name} needs Triton scratch memory, which a TensorRT AOT plugin cannot provide")
    head, sep, body = ptx.partition(f".entry {name}(")
    if not sep:
        raise RuntimeError(f"entry point {name} not found in the PTX")
    params, close, rest = body.partition(")")
    lines = [p.strip().rstrip(",") for p in params.strip().splitlines() if p.strip()]
    keep, extra = lines[:n_args], lines[n_args:]
    for i, line in enumerate(extra, start=n_args):
        pname = f"{name}_param_{i}"
        if not line.endswith(pname) or pname in rest:
            raise RuntimeError(f"unexpected extra kernel parameter {line!r} (referenced or misnamed)")
    if len(keep) != n_args:
        raise RuntimeError(f"{name} has {len(keep)} parameters, expected {n_args}")
    signature = "\n" + ",\n".join("\t" + p for p in keep) + "\n"
    return head + sep + signature + close + rest
