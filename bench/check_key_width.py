"""GPU check of the chunk kernels at narrow heads, the shapes of the MQAR model (docs/benchmarks.md).

    python3 bench/check_key_width.py [--mixer gdn|mamba2|all]

Each case compares the Triton chunk kernel's output and every input gradient with the chunked torch
form in float64 (relative error, Frobenius norm), on the training path (no state in or out) or with
an initial state. GDN cases also run with chunk.MIN_KEY_WIDTH = 0, the kernels at the model's own key
width 32, which gave a wrong dk and, with an initial state, an illegal memory access in bf16 and fp16
on an H200 with Triton 3.6. Every case runs in its own process, since an illegal access leaves the
CUDA context unusable; a case that fails prints its error's last line.
"""
import argparse
import subprocess
import sys


# mixer, B, T, H, K, V, dtype, initial state, GDN key padding on, GDN decay ("fast": the model at init,
# about 0.5 per token; "slow": long memory)
CASES = [
    ("gdn", 64, 64, 2, 32, 64, "bfloat16", False, False, "fast"),
    ("gdn", 64, 64, 2, 32, 64, "bfloat16", False, True, "fast"),
    ("gdn", 64, 64, 2, 32, 64, "bfloat16", True, False, "fast"),
    ("gdn", 64, 64, 2, 32, 64, "bfloat16", True, True, "fast"),
    ("gdn", 64, 256, 2, 32, 64, "bfloat16", True, True, "slow"),
    ("gdn", 32, 512, 3, 64, 128, "bfloat16", False, True, "fast"),
    ("gdn", 32, 512, 3, 64, 128, "bfloat16", True, True, "slow"),
    ("gdn", 8, 512, 16, 128, 128, "bfloat16", True, True, "fast"),
    ("gdn", 64, 64, 2, 32, 64, "float32", True, False, "fast"),
    ("gdn", 64, 64, 2, 32, 64, "float16", False, False, "fast"),
    ("gdn", 64, 64, 2, 32, 64, "float16", False, True, "fast"),
    ("mamba2", 64, 64, 2, 32, 64, "bfloat16", False, None, None),
    ("mamba2", 64, 64, 2, 32, 64, "bfloat16", True, None, None),
    ("mamba2", 64, 256, 2, 32, 64, "bfloat16", False, None, None),
    ("mamba2", 32, 512, 3, 64, 128, "bfloat16", False, None, None),
    ("mamba2", 64, 64, 2, 32, 64, "float32", False, None, None),
]


def relative_error(got, want):
    got, want = got.detach().double(), want.detach().double()
    return float((got - want).norm() / want.norm().clamp_min(1e-30))


def gradients(fn, inputs, initial_state, grad_o):
    """Output and the gradients of <o, grad_o> for every input (and the initial state, if any)."""
    import torch

    leaves = {name: t.detach().clone().requires_grad_() for name, t in inputs.items()}
    state = None if initial_state is None else initial_state.detach().clone().requires_grad_()
    o, _ = fn(**leaves, initial_state=state)
    torch.autograd.backward(o, grad_o.to(o.dtype))
    return {"o": o, **{f"d{name}": t.grad for name, t in leaves.items()},
            **({"dh0": state.grad} if state is not None else {})}


def run_case(index):
    import torch

    mixer, B, T, H, K, V, dtype_name, with_state, padded, decay = CASES[index]
    dtype = getattr(torch, dtype_name)
    gen = torch.Generator().manual_seed(index)

    def randn(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64)

    v = randn(B, T, H, V)
    if mixer == "gdn":
        from oryx_torch.kernels.gdn import chunk
        from oryx_torch.kernels.gdn.chunk_torch import chunk_gated_delta_rule_torch as reference

        if not padded:
            chunk.MIN_KEY_WIDTH = 0
        kernel = chunk.chunk_gated_delta_rule
        unit = lambda x: torch.nn.functional.normalize(x, dim=-1)  # noqa: E731  (the model's l2-normed q, k)
        inputs = dict(q=unit(randn(B, T, H, K)).to(dtype), k=unit(randn(B, T, H, K)).to(dtype), v=v.to(dtype),
                      g=-torch.nn.functional.softplus(0.5 * randn(B, T, H) - (0 if decay == "fast" else 6)).float(),
                      beta=torch.sigmoid(randn(B, T, H) + 2).float())
    else:
        from oryx_torch.kernels.mamba2 import chunk_ssd as kernel
        from oryx_torch.kernels.mamba2.chunk_torch import chunk_ssd_torch as reference

        inputs = dict(q=randn(B, T, H, K).to(dtype), k=randn(B, T, H, K).to(dtype), v=v.to(dtype),
                      dt=torch.nn.functional.softplus(randn(B, T, H)).float(),
                      A=(-torch.rand(H, generator=gen, dtype=torch.float64) - 0.2).float(), D=randn(H).float())
    inputs = {name: t.cuda() for name, t in inputs.items()}
    initial_state = torch.randn(B, H, K, V, generator=gen).cuda() if with_state else None
    grad_o = torch.randn(B, T, H, V, generator=gen).cuda().to(dtype)
    want = gradients(reference, {n: t.double() for n, t in inputs.items()},
                     None if initial_state is None else initial_state.double(), grad_o)
    got = gradients(kernel, inputs, initial_state, grad_o)
    return " ".join(f"{name}={relative_error(got[name], want[name]):.2e}" for name in want)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mixer", choices=["gdn", "mamba2", "all"], default="all")
    parser.add_argument("--case", type=int, help=argparse.SUPPRESS)  # one case, in a child process
    args = parser.parse_args()
    if args.case is not None:
        print(run_case(args.case), flush=True)
        return
    import torch

    if not torch.cuda.is_available():
        sys.exit("check_key_width.py: needs a CUDA GPU")
    print(f"# {torch.cuda.get_device_name(0)}, torch {torch.__version__}")
    print("# mixer B T H K V dtype state padded decay: relative errors against float64")
    for index, case in enumerate(CASES):
        if args.mixer not in ("all", case[0]):
            continue
        done = subprocess.run([sys.executable, __file__, "--case", str(index)], capture_output=True, text=True)
        if done.returncode == 0:
            result = done.stdout.strip().splitlines()[-1]
        else:  # the exception's own line, not the hints CUDA appends to it
            lines = done.stderr.strip().splitlines() or ["(no output)"]
            result = "FAILED: " + next((line for line in reversed(lines) if "Error" in line), lines[-1])
        print(" ".join(str(c) for c in case if c is not None), "|", result, flush=True)


if __name__ == "__main__":
    main()
