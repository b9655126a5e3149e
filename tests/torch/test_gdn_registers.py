"""bench/gdn_registers.py: the GDN kernels compile ahead of time for sm_90a here (no GPU) and ptxas reports them."""
import re
import subprocess
import sys
from pathlib import Path

import pytest

triton = pytest.importorskip("triton")
ROOT = Path(__file__).resolve().parents[2]
PTXAS = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"


@pytest.mark.skipif(not PTXAS.exists(), reason="this triton wheel ships no ptxas")
def test_every_gdn_kernel_compiles_for_sm90_and_reports_its_registers():
    done = subprocess.run([sys.executable, str(ROOT / "bench" / "gdn_registers.py"), "--dtype", "fp32",
                           "--head-dims", "64", "128"], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-2000:]
    rows = re.findall(r"^(\w+) .*: registers (\d+), spill stores (\d+) B, shared memory (\d+) B$", done.stdout, re.M)
    assert [r[0] for r in rows] == ["wy_fwd", "state_fwd", "state_bwd", "chunk_bwd"]
    assert all(0 < int(r[1]) <= 255 and int(r[3]) > 0 for r in rows)
    bad = subprocess.run([sys.executable, str(ROOT / "bench" / "gdn_registers.py"), "--head-dims", "48", "128"],
                         capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert bad.returncode == 2 and "--head-dims: " in bad.stderr and "head size K a power of two" in bad.stderr


@pytest.mark.skipif(not PTXAS.exists(), reason="this triton wheel ships no ptxas")
def test_card_rows_tma_and_register_caps_reach_the_compiler(tmp_path):
    source = (ROOT / "backends" / "cuda" / "oryx_torch" / "kernels" / "gdn" / "chunk.py").read_text()
    launch = '"state_bwd": dict(BV=128, num_warps=8, num_stages=2),'
    assert launch in source
    capped = tmp_path / "chunk_capped.py"
    capped.write_text(source.replace(launch, '"state_bwd": dict(BV=128, num_warps=8, num_stages=1, maxnreg=128),'))
    done = subprocess.run([sys.executable, str(ROOT / "bench" / "gdn_registers.py"), "--chunk-py", str(capped),
                           "state_bwd"], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-2000:]
    shape, regs = re.search(r"^state_bwd +(\{.*\}): registers (\d+),", done.stdout, re.M).groups()
    assert "'maxnreg': 128" in shape and int(regs) <= 128
    # the H100 rows move their tiles with TMA: the kernels compile with descriptor arguments, within the
    # H100's 227 KiB of shared memory per block, for many (sequence, head) pairs and for few
    for few in ([], ["--few-pairs"]):
        h100 = subprocess.run([sys.executable, str(ROOT / "bench" / "gdn_registers.py"), "--card", "H100", *few],
                              capture_output=True, text=True, timeout=300, cwd=ROOT)
        assert h100.returncode == 0, h100.stderr[-2000:]
        rows = {name: (shape, int(shared)) for name, shape, shared in
                re.findall(r"^(\w+) +(\{.*\}): registers \d+, .*shared memory (\d+) B$", h100.stdout, re.M)}
        tma = {"state_bwd", "chunk_bwd"} | ({"state_fwd"} if few else set())
        assert {name for name, (shape, _) in rows.items() if "'TMA': True" in shape} == tma, few
        assert all(shared <= 227 * 1024 for _, shared in rows.values()), rows
    # 256-wide heads (the widest the kernels take) fit too, for either card's rows and pair count
    for extra in ([], ["--few-pairs"], ["--card", "H100"], ["--card", "H100", "--few-pairs"]):
        wide = subprocess.run([sys.executable, str(ROOT / "bench" / "gdn_registers.py"), "--head-dims", "256", "256",
                               *extra], capture_output=True, text=True, timeout=300, cwd=ROOT)
        assert wide.returncode == 0, wide.stderr[-2000:]
        shared = [int(b) for b in re.findall(r"shared memory (\d+) B$", wide.stdout, re.M)]
        assert len(shared) == 4 and max(shared) <= 227 * 1024, (extra, wide.stdout)
    narrow = subprocess.run([sys.executable, str(ROOT / "bench" / "gdn_registers.py"), "--card", "H100",
                             "--head-dims", "32", "32", "chunk_bwd"],
                            capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert narrow.returncode == 0, narrow.stderr[-2000:]
    assert "'BK': 32, 'BV': 32" in narrow.stdout              # a card's row is fitted to the head size too
    bad = subprocess.run([sys.executable, str(ROOT / "bench" / "gdn_registers.py"), "--card", "Z80"],
                         capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert bad.returncode == 2 and "--card: no CARD_LAUNCH row 'Z80'" in bad.stderr
