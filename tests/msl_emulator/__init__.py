"""Run MLX custom Metal kernels on a CPU: the exact source MLX generates, compiled as
C++ against msl_shim.h, with every GPU thread a fiber and threadgroups in random order.

    emulator = MslEmulator(seed=0)
    outputs = emulator(launch)     # a KernelLaunch from oryx_mlx.kernels, like metal_launcher

How the source is obtained: calling an `mx.fast.metal_kernel` with verbose=True and
stream=mx.gpu while `mx.export_function` traces it makes MLX print the complete
kernel source (header, generated signature, body, explicit instantiation) to the
C++ stdout, even on a machine without Metal; we capture it at the file-descriptor
level. The source is compiled unchanged; a generated harness after it only maps
the signature's parameters (buffers and thread-position built-ins) to arguments.
"""
from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
import numpy as np

SHIM_DIR = Path(__file__).resolve().parent
SHIM_HEADER = SHIM_DIR / "msl_shim.h"
POISON_BYTE = 0xFF  # every float format reads all-ones bytes as NaN
# -O1 compiles about twice as fast as -O2; the emulated kernels are small.
COMPILE_FLAGS = ("-std=c++17", "-O1", "-w")


class EmulatorError(RuntimeError):
    pass


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:24]


def compiler() -> str | None:
    return shutil.which(os.environ.get("CXX", "g++"))


def available() -> bool:
    """The emulator needs a C++17 compiler and binutils' nm."""
    return compiler() is not None and shutil.which("nm") is not None


# ------------------------------------------------------------------ source capture
def capture_source(launch) -> str:
    """The complete Metal source MLX would compile for `launch`."""

    def traced(*inputs):
        return launch.kernel.compiled(
            **{**launch.call_kwargs(), "inputs": list(inputs)}, verbose=True, stream=mx.gpu
        )

    with tempfile.TemporaryDirectory() as tmp, tempfile.TemporaryFile(mode="w+b") as captured:
        sys.stdout.flush()
        saved_stdout = os.dup(1)
        os.dup2(captured.fileno(), 1)
        try:
            mx.export_function(os.path.join(tmp, "trace.mlxfn"), traced, *launch.inputs)
        finally:
            sys.stdout.flush()
            os.dup2(saved_stdout, 1)
            os.close(saved_stdout)
        captured.seek(0)
        text = captured.read().decode()
    match = re.search(r"```\n(.*?)```", text, re.S)
    if match is None:
        raise EmulatorError(f"MLX printed no kernel source for {launch.kernel.name!r}: {text[:200]!r}")
    return match.group(1)


# ------------------------------------------------------------------ signature parsing
@dataclass(frozen=True)
class Parameter:
    ctype: str
    name: str
    attribute: str
    buffer_index: int | None


_PARAM = re.compile(r"^\s*(?P<ctype>.+?)\s*(?P<name>\w+)\s*\[\[(?P<attr>\w+)(?:\((?P<index>\d+)\))?\]\]")


def parse_kernel(source: str) -> tuple[str, list[Parameter]]:
    """(the instantiated kernel's call name, its parameters in order)."""
    signature = re.search(r"\[\[kernel\]\]\s+void\s+\w+\((.*?)\)\s*\{", source, re.S)
    instance = re.search(r"decltype\((\w+(?:<.*?>)?)\)", source)
    if signature is None:
        raise EmulatorError("no [[kernel]] signature in the captured source")
    call_name = instance.group(1) if instance else re.search(r"void\s+(\w+)\(", signature.group(0)).group(1)
    parameters = []
    for line in signature.group(1).split(",\n"):
        m = _PARAM.match(line)
        if m is None:
            raise EmulatorError(f"cannot parse kernel parameter {line.strip()!r}")
        index = int(m["index"]) if m["index"] is not None else None
        parameters.append(Parameter(m["ctype"].strip(), m["name"], m["attr"], index))
    return call_name, parameters


def harness_source(source: str) -> str:
    call_name, parameters = parse_kernel(source)
    arguments = []
    for p in parameters:
        if p.attribute == "buffer":
            if p.ctype.endswith("&"):
                arguments.append(f"*({p.ctype[:-1].strip()}*)msl_emu::buffer({p.buffer_index})")
            else:
                arguments.append(f"({p.ctype})msl_emu::buffer({p.buffer_index})")
        else:
            arguments.append(f"t.{p.attribute}")
    joined = ",\n      ".join(arguments)
    return (
        '#include "msl_shim.h"\n'
        f"{source}\n"
        "static void run_thread(const msl_emu::ThreadInfo& t) {\n"
        f"  {call_name}(\n      {joined});\n"
        "}\n"
        "int main(int argc, char** argv) { return msl_emu::run_main(argc, argv, run_thread); }\n"
    )


# ------------------------------------------------------------------ buffers
def _to_bytes(array: mx.array) -> bytes:
    if array.dtype == mx.bfloat16:
        array = array.view(mx.uint16)
    return np.ascontiguousarray(np.array(array)).tobytes()


def _from_bytes(data: bytes, shape, dtype: mx.Dtype) -> mx.array:
    if dtype == mx.bfloat16:
        return mx.array(np.frombuffer(data, np.uint16).reshape(shape)).view(mx.bfloat16)
    numpy_dtype = {mx.float32: np.float32, mx.float16: np.float16, mx.int32: np.int32, mx.uint32: np.uint32}[dtype]
    return mx.array(np.frombuffer(data, numpy_dtype).reshape(shape))


def _buffer_contents(parameter: Parameter, launch) -> bytes:
    inputs = dict(zip(launch.kernel.input_names, launch.inputs))
    outputs = dict(zip(launch.kernel.output_names, zip(launch.output_shapes, launch.output_dtypes)))
    name = parameter.name
    if name in inputs:
        return _to_bytes(inputs[name])
    if name in outputs:
        shape, dtype = outputs[name]
        return bytes([POISON_BYTE]) * (int(np.prod(shape, dtype=np.int64)) * dtype.size)
    base, _, field = name.rpartition("_")
    if base in inputs and field == "shape":
        return np.asarray(inputs[base].shape, np.int32).tobytes()
    if base in inputs and field == "strides":
        shape = inputs[base].shape
        strides = [int(np.prod(shape[i + 1:], dtype=np.int64)) for i in range(len(shape))]
        return np.asarray(strides, np.int64).tobytes()
    if base in inputs and field == "ndim":
        return np.asarray([inputs[base].ndim], np.int32).tobytes()
    raise EmulatorError(f"kernel parameter {name!r} matches no input or output")


# ------------------------------------------------------------------ the emulator
class MslEmulator:
    """A launcher (KernelLaunch -> outputs) that runs kernels on the CPU."""

    def __init__(self, cache_dir: str | os.PathLike | None = None, seed: int = 0, timeout_s: float = 300):
        default_cache = Path(tempfile.gettempdir()) / f"oryx_msl_emulator_{os.getuid()}"
        self.cache_dir = Path(cache_dir or os.environ.get("ORYX_MSL_EMULATOR_CACHE", default_cache))
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        self.seed = seed
        self.timeout_s = timeout_s
        self.launches = []  # (kernel name, captured source) of each launch, in order

    def _compile(self, arguments: list[str], output: Path) -> None:
        """Run g++ into a private file, then move it into place (parallel sessions)."""
        partial = output.with_name(f"{output.name}.{os.getpid()}.tmp")
        result = subprocess.run([compiler(), *COMPILE_FLAGS, *arguments, "-o", str(partial)],
                                capture_output=True, text=True)
        if result.returncode != 0:
            raise EmulatorError(f"g++ failed on {arguments[-1]}:\n{result.stderr[-4000:]}")
        partial.replace(output)

    def _shim_dir(self) -> Path:
        """A copy of the shim with its precompiled header (built with COMPILE_FLAGS,
        which every kernel build must then match)."""
        text = SHIM_HEADER.read_text()
        directory = self.cache_dir / f"shim_{_digest(text + ' '.join(COMPILE_FLAGS))}"
        header = directory / SHIM_HEADER.name
        if not header.with_name(header.name + ".gch").exists():
            directory.mkdir(exist_ok=True)
            header.write_text(text)
            self._compile(["-x", "c++-header", str(header)], header.with_name(header.name + ".gch"))
        return directory

    def build(self, source: str) -> Path:
        """Compile (or reuse) the emulator binary for one captured kernel source."""
        shim_dir = self._shim_dir()
        program = harness_source(source)
        key = _digest(shim_dir.name + program)
        binary = self.cache_dir / f"kernel_{key}"
        if not binary.exists():
            cpp = self.cache_dir / f"kernel_{key}.cpp"
            cpp.write_text(program)
            self._compile([f"-I{shim_dir}", str(cpp)], binary)
        return binary

    @staticmethod
    def threadgroup_arrays(binary: Path) -> list[tuple[int, int]]:
        """(offset from msl_emu_anchor, bytes) of each threadgroup array: Metal
        kernels have no static locals, so the kernel's function-local statics are
        exactly its threadgroup declarations."""
        listing = subprocess.run(["nm", "-S", "-C", "--defined-only", str(binary)],
                                 capture_output=True, text=True, check=True).stdout
        anchor, arrays = None, []
        for line in listing.splitlines():
            fields = line.split(maxsplit=3)
            if len(fields) < 4:  # symbols without a size are not data
                continue
            address, size, _, name = fields
            if name == "msl_emu_anchor":
                anchor = int(address, 16)
            elif name.startswith("custom_kernel_") and ")::" in name:
                arrays.append((int(address, 16), int(size, 16)))
        if anchor is None:
            raise EmulatorError(f"no msl_emu_anchor symbol in {binary}")
        return [(address - anchor, size) for address, size in arrays]

    def _write_launch_file(self, path: Path, launch, binary: Path, buffers: list[Parameter]) -> None:
        """The layout run_main in msl_shim.h reads."""
        arrays = self.threadgroup_arrays(binary)
        with open(path, "wb") as f:
            f.write(np.asarray(launch.grid + launch.threadgroup, np.uint32).tobytes())
            f.write(np.asarray([self.seed], np.uint64).tobytes())
            f.write(np.asarray([len(arrays)], np.uint32).tobytes())
            for offset, size in arrays:
                f.write(np.asarray([offset], np.int64).tobytes() + np.asarray([size], np.uint64).tobytes())
            f.write(np.asarray([len(buffers)], np.uint32).tobytes())
            for p in buffers:
                data = _buffer_contents(p, launch)
                f.write(np.asarray([len(data)], np.uint64).tobytes())
                f.write(data)

    def __call__(self, launch) -> list[mx.array]:
        source = capture_source(launch)
        self.launches.append((launch.kernel.name, source))
        _, parameters = parse_kernel(source)
        buffers = sorted((p for p in parameters if p.attribute == "buffer"), key=lambda p: p.buffer_index)
        binary = self.build(source)
        with tempfile.TemporaryDirectory() as tmp:
            launch_file, result_file = Path(tmp) / "launch.bin", Path(tmp) / "result.bin"
            self._write_launch_file(launch_file, launch, binary, buffers)
            run = subprocess.run([str(binary), str(launch_file), str(result_file)],
                                 capture_output=True, text=True, timeout=self.timeout_s)
            if run.returncode != 0:
                raise EmulatorError(f"{launch.kernel.name}: emulator exited {run.returncode}: {run.stderr[-2000:]}")
            results = {}
            with open(result_file, "rb") as f:
                for p in buffers:
                    size = int(np.frombuffer(f.read(8), np.uint64)[0])
                    results[p.name] = f.read(size)
        return [
            _from_bytes(results[name], shape, dtype)
            for name, shape, dtype in zip(launch.kernel.output_names, launch.output_shapes, launch.output_dtypes)
        ]
