"""Registers, spill bytes and shared memory of the GDN Triton kernels on sm_90a, with no GPU.

    python3 bench/gdn_registers.py [--chunk-py FILE] [--card H100] [--few-pairs] [--dtype bf16|fp16|fp32]
                                   [--head-dims K V] [KERNEL ...]

Compiles each kernel of chunk.py (or of another version of it, --chunk-py) ahead of time for
sm_90a with Triton's own ptxas, at the launch shape chunk._launch_args gives it, the flags of a
training forward and backward, and the 16-byte pointer alignment a real launch sees; prints what
ptxas reports. Spills slow the backward kernels down, so this is the check between GPU runs
(docs/benchmarks.md, "GDN launch shapes"); only a GPU can say whether a change is faster.
"""
import argparse
import importlib.util
import re
import subprocess
import tempfile
from pathlib import Path

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from oryx_torch.kernels.gdn import chunk as chunk_module

PTXAS = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
# pointer arguments that are fp32 whatever the input dtype (the rest have the input dtype)
FP32_POINTERS = {"g", "beta", "gcum", "h0", "ht", "dht", "dh0", "dg", "dbeta"}
INT32_POINTERS = {"cu_seqlens", "chunk_indices", "chunk_offsets"}
# constexpr flags as a training step sets them (intermediates kept, no initial or final state)
TRAINING_FLAGS = {"STORE_X": True, "HAS_H0": False, "STORE_FINAL": False, "STORE_CHUNKS": True,
                  "HAS_DHT": False, "STORE_DH0": False}
KERNELS = ("wy_fwd", "state_fwd", "state_bwd", "chunk_bwd")


def load_chunk(path):
    if path is None:
        return chunk_module
    spec = importlib.util.spec_from_file_location("oryx_torch.kernels.gdn._registers_of", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def resources(module, name, dtype, K, V, card=None, few_pairs=False):
    """(registers, spill-store bytes, shared memory bytes, launch) of one kernel; `card` takes that
    card's CARD_LAUNCH row where it has one, as a launch on that card would; `few_pairs` the rows for
    fewer (sequence, head) pairs than SMs, where the kernel has them (every sequence whole chunks)."""
    kernel = getattr(module, f"_{name}_kernel")
    launch = module._launch_args(name, K, V, dtype, card=card, few_pairs=few_pairs)
    values = {**TRAINING_FLAGS, "TMA": False, **launch, "K": K, "V": V, "C": module.CHUNK,
              "PREC": module._dot_precision(dtype)}
    element = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}[dtype]
    # with TMA these arguments are descriptors of the tiles the kernel moves (chunk._launch)
    tiles = module._tma_tiles(name, K, V, launch) if launch.get("TMA") else {}
    signature, constants = {}, {}
    for index, arg in enumerate(kernel.arg_names):
        if arg in kernel.constexprs or index in kernel.constexprs:
            signature[arg] = "constexpr"
            constants[(index,)] = values[arg]
        elif arg == "H":
            signature[arg] = "i32"
        elif arg == "scale":
            signature[arg] = "fp32"
        elif arg in tiles:
            signature[arg] = f"tensordesc<{element}{tiles[arg]}>"
        else:
            signature[arg] = "*i32" if arg in INT32_POINTERS else "*fp32" if arg in FP32_POINTERS else f"*{element}"
    aligned = {(i,): [["tt.divisibility", 16]] for i, arg in enumerate(kernel.arg_names)
               if signature[arg].startswith("*") or arg == "H"}
    compiled = triton.compile(ASTSource(fn=kernel, signature=signature, constexprs=constants, attrs=aligned),
                              target=GPUTarget("cuda", 90, 32),
                              options={key: launch[key] for key in ("num_warps", "num_stages", "maxnreg") if key in launch})
    with tempfile.NamedTemporaryFile("w", suffix=".ptx") as ptx:
        ptx.write(compiled.asm["ptx"])
        ptx.flush()
        report = subprocess.run([str(PTXAS), "-v", "--gpu-name", "sm_90a", ptx.name, "-o", "/dev/null"],
                                capture_output=True, text=True, check=True).stderr
    registers = int(re.search(r"Used (\d+) registers", report).group(1))
    spills = int(re.search(r"(\d+) bytes spill stores", report).group(1))
    return registers, spills, compiled.metadata.shared, launch


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("kernels", nargs="*", metavar="KERNEL",
                        help=f"kernels to compile (default all: {', '.join(KERNELS)})")
    parser.add_argument("--chunk-py", help="another version of chunk.py (default: the package's)")
    parser.add_argument("--dtype", choices=list(DTYPES), default="bf16")
    parser.add_argument("--head-dims", nargs=2, type=int, default=[128, 128], metavar=("K", "V"))
    parser.add_argument("--card", help="launch shapes of this CARD_LAUNCH row (e.g. H100) where it has one")
    parser.add_argument("--few-pairs", action="store_true",
                        help="the launch shapes for fewer (sequence, head) pairs than SMs (sequential kernels)")
    args = parser.parse_args(argv)
    unknown = [name for name in args.kernels if name not in KERNELS]
    if unknown:
        parser.error(f"unknown kernel {unknown[0]!r}: choose from {', '.join(KERNELS)}")
    if not PTXAS.exists():
        parser.error(f"{PTXAS}: Triton's ptxas is missing (a Linux x86_64 triton wheel ships it)")
    module = load_chunk(args.chunk_py)
    if args.card is not None and args.card not in module.CARD_LAUNCH:
        parser.error(f"--card: no CARD_LAUNCH row {args.card!r} (rows: {', '.join(module.CARD_LAUNCH) or 'none'})")
    K, V = args.head_dims
    try:
        module._check_triton_shapes(K, V)
    except ValueError as error:
        parser.error(f"--head-dims: {error}")
    for name in args.kernels or KERNELS:
        registers, spills, shared, launch = resources(module, name, DTYPES[args.dtype], K, V, args.card, args.few_pairs)
        print(f"{name:10s} {launch}: registers {registers}, spill stores {spills} B, shared memory {shared} B")


if __name__ == "__main__":
    main()
