"""bench/profile_model.py: the CPU smoke run reports every plan it was given, attention time only where a plan
attends; kernel names fall into the categories the report sums."""
import json

import pytest
from bench_scripts import load_bench_script

pytest.importorskip("torch")
pytest.importorskip("transformers")


def profile_module():
    return load_bench_script("profile_model")


def test_tiny_run_reports_each_plan(tmp_path, capsys):
    profile = profile_module()
    out = tmp_path / "profile.json"
    assert profile.main(["--tiny", "--compile", "off", "--layers", "1", "--length", "32", "--plans",
                         "llama,attention,recurrent,mixed-dense", "--warmup", "0", "--repeat", "1",
                         "--profile-steps", "1", "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    results = report["results"]
    assert list(results) == ["llama", "attention", "recurrent", "mixed-dense"] and report["layers"] == 1
    for plan, r in results.items():
        assert r["step_ms"] > 0 and r["kernel_ms"] > 0 and r["kernels_per_step"] > 10, plan
        assert abs(sum(r["categories"].values()) - r["kernel_ms"]) < 1e-6 * r["kernel_ms"] + 1e-9, plan
        assert r["categories"].get("matmul", 0) > 0, plan
    assert results["attention"]["categories"].get("attention", 0) > 0
    assert results["recurrent"]["categories"].get("attention", 0) == 0
    assert "| attention ms (per layer) |" in capsys.readouterr().out


def test_kernel_categories():
    category = profile_module().category
    assert category("flash_fwd_kernel<Flash_fwd_kernel_traits<64, 128>>") == "attention"
    assert category("triton_tem_fused_flex_attention_backward_0") == "attention"
    assert category("_chunk_bwd_kernel") == "recurrence"
    assert category("nvjet_hsh_128x256_64x4_2x1_v_bz_coopA_NTN") == "matmul"
    assert category("sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x128x64") == "matmul"
    assert category("aten::mm") == "matmul"
    assert category("sm90_xmma_dgrad_implicit_gemm_indexed_bf16bf16_bf16f32_f32_nhwckrsc_nchw") == "convolution"
    assert category("void at::native::conv_depthwise2d_forward_kernel<1, float, int>") == "convolution"
    assert category("triton_poi_fused_add_mul_silu_3") == "elementwise (inductor)"
    assert category("triton_red_fused_pow_mean_rsqrt_1") == "reduction (inductor)"
    assert category("void at::native::vectorized_elementwise_kernel<4, at::native::FillFunctor<float>>") == \
        "copy / fill"
    assert category("void multi_tensor_apply_kernel<FusedAdamMathFunctor>") == "optimizer"
