"""Oryx through transformers: AutoModelForCausalLM on an exported checkpoint, logits, loss, generate, Trainer, save_pretrained."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from oryx_core.config import OryxConfig  # noqa: E402
from oryx_core.weights import load_checkpoint  # noqa: E402
from oryx_torch.hf import export_hf_model  # noqa: E402
from oryx_torch.model import OryxModel  # noqa: E402

TINY = dict(vocab_size=97, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=8, mlp_hidden=64, max_context=64)


def export_tiny(mixer: str, tmp_path_factory):
    """Matrices at 8x their init scale, so that greedy tokens depend on the plan and do not just repeat."""
    model = OryxModel(OryxConfig(**TINY, mixer=mixer), seed=3).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 2:
                p.mul_(8)
    path = tmp_path_factory.mktemp(f"hf-{mixer}") / "ckpt"
    export_hf_model(model, path, plan="prefill-attention")
    return model, path


@pytest.fixture(scope="module", params=["gdn", "mamba2"])
def exported_each_mixer(request, tmp_path_factory):
    return export_tiny(request.param, tmp_path_factory)


@pytest.fixture(scope="module", params=["gdn", pytest.param("mamba2", marks=pytest.mark.slow)])
def exported(request, tmp_path_factory):
    """The tests that generate or train run on Mamba-2 only with --runslow (they pass the mixer through unchanged)."""
    return export_tiny(request.param, tmp_path_factory)


def load_hf(path, **kwargs):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True, **kwargs)


@pytest.mark.parametrize("plan, modes", [("attention", [True] * 11), ("recurrent", [False] * 11),
                                         ("A:0-4,R:4-8,A:8-", [True] * 4 + [False] * 4 + [True] * 3)])
def test_transformers_logits_equal_oryx(exported_each_mixer, plan, modes):
    from transformers import AutoConfig

    model, path = exported_each_mixer
    config = AutoConfig.from_pretrained(path, trust_remote_code=True)
    assert (config.hidden_size, config.num_hidden_layers, config.oryx_plan) == (32, 2, "prefill-attention")
    hf = load_hf(path)
    assert type(hf).__name__ == "OryxForCausalLM"
    tokens = torch.from_numpy(np.random.default_rng(0).integers(0, 97, size=(2, 11)))
    with torch.no_grad():
        ours = model(tokens, torch.tensor(modes))
        theirs = hf(tokens, plan=plan).logits
    assert theirs.shape == (2, 11, 97)
    assert (theirs - ours).abs().max().item() <= 1e-5
    assert (hf(tokens, plan="recurrent").logits - hf(tokens, plan="attention").logits).abs().max() > 1e-3


def test_labels_give_the_shifted_next_token_loss(exported_each_mixer):
    _, path = exported_each_mixer
    hf = load_hf(path)
    tokens = torch.from_numpy(np.random.default_rng(1).integers(0, 97, size=(2, 9)))
    labels = tokens.clone()
    labels[1, 5:] = -100
    out = hf(tokens, labels=labels, plan="attention")
    logits = out.logits.double()
    picked = [(b, t) for b in range(2) for t in range(8) if labels[b, t + 1] != -100]
    expected = -np.mean([torch.log_softmax(logits[b, t], -1)[labels[b, t + 1]].item() for b, t in picked])
    assert abs(out.loss.item() - expected) < 1e-5


def oryx_greedy(model, prompt: list[int], new_tokens: int, plan: str) -> list[int]:
    """Greedy decoding by hand on the Oryx model, the whole sequence recomputed at every step."""
    tokens = list(prompt)
    for _ in range(new_tokens):
        modes = {"attention": True, "recurrent": False}.get(plan)
        modes = torch.arange(len(tokens)) < len(prompt) if modes is None else modes
        with torch.no_grad():
            tokens.append(int(model(torch.tensor([tokens]), modes)[0, -1].argmax()))
    return tokens


def test_generate_with_cache_and_without_equals_oryx_greedy(exported):
    model, path = exported
    hf = load_hf(path)
    prompt = [5, 17, 42, 8, 61, 3]
    expected = {plan: oryx_greedy(model, prompt, 5, plan) for plan in ("attention", "prefill-attention")}
    assert expected["attention"] != expected["prefill-attention"]  # the plan shows in the tokens
    for plan, tokens in expected.items():
        for use_cache in (True, False):
            out = hf.generate(torch.tensor([prompt]), max_new_tokens=5, do_sample=False, plan=plan, use_cache=use_cache)
            assert out[0].tolist() == tokens, (plan, use_cache)


def test_save_pretrained_round_trips_bit_exactly_and_oryx_loads_it(exported, tmp_path):
    _, path = exported
    hf = load_hf(path, dtype=torch.bfloat16)
    hf.save_pretrained(tmp_path / "again")
    again = load_checkpoint(tmp_path / "again")  # Oryx reads an exported checkpoint like any other
    assert again.dtype == "bfloat16"
    for name, p in hf.model.named_parameters():
        np.testing.assert_array_equal(again.params[name].view(np.uint16), p.detach().view(torch.int16).numpy().view(np.uint16))
    config = json.loads((tmp_path / "again" / "config.json").read_text())
    assert config["auto_map"]["AutoModelForCausalLM"] == "modeling_oryx.OryxForCausalLM"
    reloaded = load_hf(tmp_path / "again")
    assert reloaded.model.embed.weight.dtype == torch.bfloat16
    assert torch.equal(reloaded.model.embed.weight, hf.model.embed.weight)


def test_trainer_runs_two_steps(exported, tmp_path):
    from transformers import Trainer, TrainingArguments

    _, path = exported
    hf = load_hf(path)
    hf.config.oryx_plan = "A:0-8,R:8-"  # both modes train (the plan also applies without a cache)
    hf.train()
    before = {n: p.detach().clone() for n, p in hf.named_parameters()}
    rng = np.random.default_rng(2)
    data = [{"input_ids": torch.from_numpy(ids), "labels": torch.from_numpy(ids)}
            for ids in rng.integers(0, 97, size=(8, 16))]
    args = TrainingArguments(output_dir=str(tmp_path / "out"), max_steps=2, per_device_train_batch_size=2,
                             learning_rate=1e-2, report_to=[], save_strategy="no", use_cpu=True, logging_steps=1,
                             disable_tqdm=True)
    trainer = Trainer(model=hf, args=args, train_dataset=data)
    result = trainer.train()
    assert result.global_step == 2 and np.isfinite(result.training_loss) and result.training_loss > 3.0
    changed = [n for n, p in hf.named_parameters() if not torch.equal(p.detach(), before[n])]
    assert "model.embed.weight" in changed and len(changed) == len(before)
    trainer.save_model(str(tmp_path / "trained"))
    saved = load_checkpoint(tmp_path / "trained")
    np.testing.assert_array_equal(saved.params["embed.weight"], hf.model.embed.weight.detach().numpy())


def test_oryx_convert_to_hf_writes_a_checkpoint_both_load(exported, tmp_path):
    from oryx_convert.api import convert

    model, path = exported
    out = convert(path, tmp_path / "hf", to_kind="hf", plan="recurrent")
    assert {"configuration_oryx.py", "modeling_oryx.py"} <= {f.name for f in out.iterdir()}
    hf = load_hf(out)
    assert hf.config.oryx_plan == "recurrent"
    assert hf.generation_config.eos_token_id is None  # the exported checkpoint had no tokenizer
    from oryx_core.tokenizer import byte_level_tokenizer, end_of_text_id

    shutil.copytree(path, tmp_path / "with-tokenizer")
    (tmp_path / "with-tokenizer" / "tokenizer.json").write_text(byte_level_tokenizer().to_str())
    with_tokenizer = load_hf(convert(tmp_path / "with-tokenizer", tmp_path / "hf-tok", to_kind="hf"))
    assert with_tokenizer.generation_config.eos_token_id == end_of_text_id(byte_level_tokenizer())
    from transformers import AutoTokenizer  # without trust_remote_code: the tokenizer needs none of the model's code

    hf_tokenizer = AutoTokenizer.from_pretrained(tmp_path / "hf-tok")
    assert hf_tokenizer("hello").input_ids == byte_level_tokenizer().encode("hello").ids
    assert load_checkpoint(tmp_path / "hf-tok").config == model.cfg  # and Oryx still reads the directory
    tokens = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        assert (hf(tokens).logits - model(tokens, False)).abs().max().item() <= 1e-5
    assert load_checkpoint(out).config == model.cfg


def test_peft_lora_trains_generates_and_merges(exported):
    peft = pytest.importorskip("peft")

    model, path = exported
    lora = peft.get_peft_model(load_hf(path), peft.LoraConfig(r=4, target_modules=["q_attn", "k_proj", "o_proj"],
                                                              task_type="CAUSAL_LM"))
    tokens = torch.from_numpy(np.random.default_rng(3).integers(0, 97, size=(2, 10)))
    lora(input_ids=tokens, labels=tokens, plan="attention").loss.backward()
    trained = [n for n, p in lora.named_parameters() if p.grad is not None]
    assert trained and all("lora_" in n for n in trained)
    assert lora.generate(input_ids=tokens[:1, :4], max_new_tokens=3, do_sample=False).shape == (1, 7)
    merged = lora.merge_and_unload()  # LoRA B starts at zero: merging gives back the original model
    with torch.no_grad():
        assert (merged(tokens, plan="attention").logits - model(tokens, True)).abs().max().item() <= 1e-5


def test_cli_to_hf_refuses_quantisation_in_one_line(exported, tmp_path, capsys):
    from oryx_core import cli

    _, path = exported
    assert cli.main(["convert", str(path), str(tmp_path / "q"), "--to", "hf", "--quantize", "4"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--quantize" in err[0] and "hf" in err[0]
    assert not (tmp_path / "q").exists()
