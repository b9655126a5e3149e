"""A Metal kernel launch as data, so one orchestration runs on a GPU or in the emulator.

Every Metal path in this package builds `KernelLaunch` objects and hands them to a
launcher: `metal_launcher` runs them through `mx.fast.metal_kernel`; the MSL
emulator under tests/msl_emulator runs the very same launch (same source, template,
grid, threadgroup and inputs) on a CPU.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Callable, Sequence

import mlx.core as mx


@dataclass(frozen=True)
class MetalKernel:
    """The arguments of `mx.fast.metal_kernel`; the compiled object is built once."""

    name: str
    input_names: tuple[str, ...]
    output_names: tuple[str, ...]
    source: str

    @functools.cached_property
    def compiled(self):
        return mx.fast.metal_kernel(
            name=self.name,
            input_names=list(self.input_names),
            output_names=list(self.output_names),
            source=self.source,
        )


@dataclass(frozen=True)
class KernelLaunch:
    kernel: MetalKernel
    inputs: tuple[mx.array, ...]
    template: tuple[tuple[str, object], ...]
    grid: tuple[int, int, int]
    threadgroup: tuple[int, int, int]
    output_shapes: tuple[tuple[int, ...], ...]
    output_dtypes: tuple[mx.Dtype, ...]

    def call_kwargs(self) -> dict:
        return dict(
            inputs=list(self.inputs),
            template=list(self.template),
            grid=self.grid,
            threadgroup=self.threadgroup,
            output_shapes=[list(s) for s in self.output_shapes],
            output_dtypes=list(self.output_dtypes),
        )


Launcher = Callable[[KernelLaunch], Sequence[mx.array]]


def metal_launcher(launch: KernelLaunch) -> Sequence[mx.array]:
    return launch.kernel.compiled(**launch.call_kwargs())
