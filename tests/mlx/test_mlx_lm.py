"""mlx-lm compatibility: an exported directory loads with mlx_lm.load and decodes like our generate."""
import json

import pytest

mx = pytest.importorskip("mlx.core")
mlx_lm = pytest.importorskip("mlx_lm")

from oryx_core import cli  # noqa: E402
from oryx_core.config import preset  # noqa: E402
from oryx_core.init import init_params  # noqa: E402
from oryx_core.tokenizer import byte_level_tokenizer  # noqa: E402
from oryx_core.weights import save_checkpoint  # noqa: E402
from oryx_mlx.export import MODEL_FILE, export_mlx_lm  # noqa: E402
from oryx_mlx.generate import load, stream_generate  # noqa: E402

PROMPT = "Hello from Oryx"


def write_checkpoint(path, mixer):
    """Matrices 8x their init scale, so greedy decoding does not just repeat one token."""
    cfg = preset("tiny", mixer)
    params = {k: v * 8 if v.ndim == 2 else v for k, v in init_params(cfg, seed=5).items()}
    return save_checkpoint(path, cfg, params, tokenizer_json=byte_level_tokenizer().to_str())


def oryx_tokens(path, plan, n):
    model, tokenizer = load(path)
    return [r.token for r in stream_generate(model, tokenizer, PROMPT, max_tokens=n, plan=plan,
                                             stop_at_end_of_text=False)]


def mlx_lm_tokens(path, n):
    model, tokenizer = mlx_lm.load(str(path), trust_remote_code=True)
    return [r.token for r in mlx_lm.stream_generate(model, tokenizer, PROMPT, max_tokens=n)]


@pytest.mark.parametrize("mixer, plan, bits", [("gdn", "every:2:4", None), ("mamba2", "A:0-6,R:6-", None),
                                               ("gdn", "recurrent", 4)])
def test_mlx_lm_generates_our_greedy_tokens(tmp_path, mixer, plan, bits):
    src, out = write_checkpoint(tmp_path / "ckpt", mixer), tmp_path / "mlx-lm"
    export_mlx_lm(src, out, plan=plan, bits=bits)
    config = json.loads((out / "config.json").read_text())
    assert config["model_file"] == MODEL_FILE and config["oryx_plan"] == plan
    if bits:  # compare with our own model loaded from the same quantised weights
        assert config["quantization"] == {"bits": bits, "group_size": 64}
        assert cli.main(["quantize", str(src), str(tmp_path / "q"), "--bits", str(bits)]) == 0
        src = tmp_path / "q"
    expected = oryx_tokens(src, plan, 10)
    got = mlx_lm_tokens(out, 10)
    assert got == expected and len(set(got)) > 3


def test_kv_proj_checkpoint_and_adapter_export(tmp_path):
    """Sharing kv-proj (the recurrence's own key and value convs) exports, and so does an adapter on its base (the
    default model's form): mlx-lm decodes our greedy tokens from both."""
    import numpy as np

    from oryx_core.adapter import save_adapter
    from oryx_core.spec import RECURRENT, parameter_specs

    base = write_checkpoint(tmp_path / "base", "gdn")
    cfg = preset("tiny", "gdn", sharing="kv-proj")
    rng = np.random.default_rng(7)
    params = {k: v * 8 if v.ndim == 2 else v for k, v in init_params(preset("tiny", "gdn"), seed=5).items()}
    for spec in parameter_specs(cfg):
        if spec.mode == RECURRENT:  # the recurrent tensors (the new convs included) moved away from the base's
            shape = spec.shape
            params[spec.name] = (params.get(spec.name, np.zeros(shape, np.float32))
                                 + rng.normal(0, 0.3, shape).astype(np.float32))
    full = save_checkpoint(tmp_path / "full", cfg, params, tokenizer_json=byte_level_tokenizer().to_str())
    adapter = save_adapter(tmp_path / "adapter", base, cfg, params)
    for src in (full, adapter):
        out = tmp_path / f"mlx-lm-{src.name}"
        export_mlx_lm(src, out, plan="every:2:4")
        assert json.loads((out / "config.json").read_text())["sharing"] == "kv-proj"
        got, expected = mlx_lm_tokens(out, 10), oryx_tokens(src, "every:2:4", 10)
        assert got == expected and len(set(got)) > 3, src.name


def test_export_refuses_plans_that_need_lengths(tmp_path):
    src = tmp_path / "ckpt"
    assert cli.main(["init", str(src), "--preset", "tiny"]) == 0
    for plan in ("prefill-attention", "last:10%"):
        assert cli.main(["export-mlx-lm", str(src), str(tmp_path / "out"), "--plan", plan]) == 2
    assert not (tmp_path / "out").exists()


def test_mlx_lm_needs_trust_remote_code(tmp_path):
    src, out = tmp_path / "ckpt", tmp_path / "out"
    assert cli.main(["init", str(src), "--preset", "tiny"]) == 0
    assert cli.main(["export-mlx-lm", str(src), str(out)]) == 0
    with pytest.raises(ValueError, match="trust_remote_code"):
        mlx_lm.load(str(out))
