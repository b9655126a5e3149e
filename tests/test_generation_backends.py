"""One generation scenario through the torch and the MLX backend: the same tokens, text, finish reasons,
stats fields and `oryx generate --json` keys, under a mixed plan, a stop string and both drop policies."""
import json

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("mlx.core")

from oryx_core.backend import load_model  # noqa: E402
from oryx_core.cli import main  # noqa: E402
from oryx_core.generation import GenerationStats, generate  # noqa: E402
from oryx_core.reference import OryxReference, Stepper  # noqa: E402
from oryx_core.plan import ModePlan  # noqa: E402
from oryx_core.tokenizer import tokenizer_for  # noqa: E402
from oryx_core.weights import load_checkpoint, save_checkpoint  # noqa: E402

BACKENDS = ("torch", "mlx")
PROMPT = "Oryx: héllo wörld"  # 19 tokens under the byte-level tokenizer
MIXED = "A:0-8,R:8-24,A:24-"


def oryx(argv) -> int:
    try:
        return main(argv)
    except SystemExit as e:
        return e.code


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """`oryx init --preset tiny` (fp32), its matrices then scaled 8x: at init scale the tiny model repeats one
    token, so no comparison would see a difference."""
    path = tmp_path_factory.mktemp("generation") / "tiny"
    assert oryx(["init", str(path), "--preset", "tiny", "--seed", "5"]) == 0
    ckpt = load_checkpoint(path)
    params = {n: (p * 8 if p.ndim == 2 and "embed" not in n else p) for n, p in ckpt.params.items()}
    save_checkpoint(path, ckpt.config, params, tokenizer_json=(path / "tokenizer.json").read_text())
    return path, OryxReference(ckpt.config, params)


@pytest.fixture(scope="module")
def models(checkpoint):
    path, _ = checkpoint
    return {name: load_model(path, name, dtype="float32", device="cpu") for name in BACKENDS}


def reference_greedy(ref, prompt_ids, n, plan):
    modes = ModePlan.parse(plan).resolve(len(prompt_ids) + n, prompt_length=len(prompt_ids))
    stepper, out = Stepper(ref), []
    for position, token in enumerate(prompt_ids):
        logits = stepper.step(np.array([token]), modes[position])
    for position in range(len(prompt_ids), len(prompt_ids) + n):
        out.append(int(np.argmax(logits[0])))
        logits = stepper.step(np.array([out[-1]]), modes[position])
    return out


def run_everywhere(models, tokenizer, **options):
    return {name: generate(model, tokenizer, PROMPT, **options) for name, model in models.items()}


def assert_same(results):
    torch_result, mlx_result = results["torch"], results["mlx"]
    assert torch_result.tokens == mlx_result.tokens
    assert torch_result.text == mlx_result.text
    assert torch_result.finish_reason == mlx_result.finish_reason
    for field in ("prompt_tokens", "generation_tokens"):
        assert getattr(torch_result.stats, field) == getattr(mlx_result.stats, field), field
    assert type(torch_result.stats) is type(mlx_result.stats) is GenerationStats
    assert torch_result.stats.to_dict().keys() == mlx_result.stats.to_dict().keys()


def test_mixed_plan_and_stop_string(checkpoint, models):
    path, ref = checkpoint
    tokenizer = tokenizer_for(path)
    free = run_everywhere(models, tokenizer, max_tokens=24, plan=MIXED, stop_at_end_of_text=False)
    assert_same(free)
    prompt_ids = tokenizer.encode(PROMPT).ids
    assert free["torch"].tokens == reference_greedy(ref, prompt_ids, 24, MIXED)
    assert len(set(free["torch"].tokens)) > 3  # the scenario exercises distinct tokens
    assert free["torch"].finish_reason == "length"
    text = free["torch"].text
    stop = text[10:13]
    cut = run_everywhere(models, tokenizer, max_tokens=24, plan=MIXED, stop_strings=[stop],
                         stop_at_end_of_text=False)
    assert_same(cut)
    assert cut["torch"].finish_reason == "stop_string" and cut["torch"].text == text[:text.find(stop)]


@pytest.mark.parametrize("plan, policy", [("A:0-22,R:22-", dict(kv_policy="drop")),
                                          ("R:0-22,A:22-", dict(state_policy="drop"))])
def test_drop_policies(checkpoint, models, plan, policy):
    """Dropping the KV cache (attention ends mid-generation) or the recurrent state (the recurrence ends) gives
    the tokens of keeping them, on both backends, and leaves the cache smaller."""
    path, _ = checkpoint
    tokenizer = tokenizer_for(path)
    kept = run_everywhere(models, tokenizer, max_tokens=12, plan=plan, stop_at_end_of_text=False,
                          kv_policy="keep", state_policy="keep")
    dropped = run_everywhere(models, tokenizer, max_tokens=12, plan=plan, stop_at_end_of_text=False, **policy)
    assert_same(kept)
    assert_same(dropped)
    assert dropped["torch"].tokens == kept["torch"].tokens
    for name in BACKENDS:
        assert dropped[name].stats.cache_bytes < kept[name].stats.cache_bytes, name


def test_cli_json_and_stream_agree_across_backends(checkpoint, capsys):
    path, _ = checkpoint
    args = ["generate", str(path), "--prompt", PROMPT, "--max-tokens", "10", "--plan", MIXED, "--device", "cpu",
            "--dtype", "float32", "--kv-policy", "drop", "--state-policy", "drop"]
    outputs, streamed, speed_lines = {}, {}, {}
    for name in BACKENDS:
        assert oryx(args + ["--backend", name, "--json"]) == 0
        outputs[name] = json.loads(capsys.readouterr().out)
        assert oryx(args + ["--backend", name]) == 0
        captured = capsys.readouterr()
        streamed[name], speed_lines[name] = captured.out, captured.err
    assert outputs["torch"].keys() == outputs["mlx"].keys()
    for key in ("text", "tokens", "plan", "kv_policy", "state_policy", "prompt_tokens", "generation_tokens",
                "finish_reason", "device", "dtype"):
        assert outputs["torch"][key] == outputs["mlx"][key], key
    assert outputs["torch"]["backend"] == "torch" and outputs["mlx"]["backend"] == "mlx"
    for name in BACKENDS:
        assert streamed[name] == outputs[name]["text"] + "\n"
        line = speed_lines[name].strip()
        assert line.startswith(f"[prompt {outputs[name]['prompt_tokens']} tokens, ") and line.count("\n") == 0
        assert f"generation {outputs[name]['generation_tokens']} tokens, " in line
