"""experiments/retrofit_capacity_probe.py on a tiny model with SmolLM2's vocabulary: every variant trains exactly the
tensors it names (and more steps lower the held-out error), the report holds each layer's numbers, and bad flags
are refused."""
import json

import pytest

import retrofit_capacity_probe as capacity
from oryx_core.config import preset
from model_params import tiny_checkpoint_with_smollm2_vocabulary

torch = pytest.importorskip("torch")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("capacity")
    model = tiny_checkpoint_with_smollm2_vocabulary(root / "tiny")
    heldout = root / "heldout.txt"
    heldout.write_text(" ".join(f"The keeper climbed stair number {i} and counted the gulls." for i in range(200)))
    return model, heldout


def test_variants_train_what_they_name(tiny):
    from oryx_core.spec import RECURRENT, parameter_specs
    from oryx_torch.model import OryxModel

    model = OryxModel.from_checkpoint(tiny[0], dtype="float32").eval()
    mixer = model.layers[1].mixer
    names = {s.name.removeprefix("layers.1.mixer.") for s in parameter_specs(model.cfg)
             if s.mode == RECURRENT and s.name.startswith("layers.1.mixer.")}
    original = {n: p.detach().clone() for n, p in mixer.named_parameters()}
    xn = torch.randn(4, 32, model.cfg.d_model)
    target = torch.randn(4, 32, model.cfg.d_model)
    for variant, prefixes in capacity.VARIANTS.items():
        trained, count, losses = capacity.train_variant(mixer, prefixes, names, (xn, target), 3, 2, 1e-2, seed=0)
        changed = {n for n, p in trained.named_parameters() if not torch.equal(p, mixer.get_parameter(n))}
        allowed = names | {n for n, _ in mixer.named_parameters() if n.startswith(prefixes)}
        assert changed and changed <= allowed, (variant, changed - allowed)
        assert count == sum(p.numel() for n, p in mixer.named_parameters() if n in allowed)
        assert len(losses) == 3
    assert all(torch.equal(p, original[n]) for n, p in mixer.named_parameters())  # the model's mixer is untouched


def test_a_run_writes_every_layer_and_variant(tiny, tmp_path):
    model, heldout = tiny
    out = tmp_path / "capacity.json"
    assert capacity.main(["--model", str(model), "--heldout", str(heldout), "--layers", "0", "1", "--seq-len", "32",
                          "--train-windows", "6", "--eval-windows", "2", "--steps", "24", "--batch", "2", "--lr", "3e-3",
                          "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert set(report["layers"]) == {"0", "1"} and report["settings"]["steps"] == 24
    for row in report["layers"].values():
        assert row["start"] > 0
        for variant in capacity.VARIANTS:
            assert row[variant]["heldout_relative_error"] > 0
            first, last = row[variant]["train_loss_first_last_10"]
            assert last < first  # the fit is learning
        counts = {v: row[v]["trainable_parameters"] for v in capacity.VARIANTS}
        assert counts["recurrent"] < counts["+ kv conv"] < counts["+ kv proj"]
        cfg = preset("tiny", "gdn")  # per query head: a_proj and b_proj rows of D, A_log and dt_bias entries
        assert counts["+ head gates"] - counts["recurrent"] == 2 * (cfg.n_heads - cfg.n_kv_heads) * (cfg.d_model + 1)


def test_head_gates_start_as_the_groups_and_train_per_query_head(tiny):
    """The widened gates compute the same output until trained; training then makes the query heads' gates differ."""
    from oryx_torch.attention import AttentionPlan
    from oryx_torch.model import OryxModel

    model = OryxModel.from_checkpoint(tiny[0], dtype="float32").eval()
    mixer = model.layers[1].mixer
    G = mixer.cfg.group_size
    xn = torch.randn(2, 32, model.cfg.d_model)
    plan = AttentionPlan(torch.zeros(2, 32, dtype=torch.bool), 0, torch.zeros(2, 32, dtype=torch.bool))
    widened = capacity.gates_per_query_head(type(mixer)(mixer.cfg))
    widened.load_state_dict({k: v.repeat_interleave(G, 0) if k.split(".")[0] in ("a_proj", "b_proj", "A_log",
                                                                                  "dt_bias") else v
                             for k, v in mixer.state_dict().items()})
    with torch.no_grad():
        assert torch.allclose(widened(xn, plan, None), mixer(xn, plan, None), rtol=1e-5, atol=1e-6)
    names = {n for n, _ in mixer.named_parameters() if n.split(".")[0] in ("q_rec", "conv_q", "a_proj", "b_proj",
                                                                             "A_log", "dt_bias")}
    trained = capacity.train_variant(mixer, (), names, (xn, torch.randn_like(xn)), 3, 2, 1e-2, seed=0,
                                     per_head_gates=True)[0]
    a = trained.a_proj.weight.detach()
    assert a.shape[0] == mixer.cfg.n_heads and not torch.equal(a[0], a[1])  # heads of one group now differ


@pytest.mark.parametrize("argv", [["--variants", "everything"], ["--steps", "0"], ["--layers", "9"]])
def test_bad_flags_are_refused(tiny, argv):
    model, heldout = tiny
    with pytest.raises(SystemExit) as e:
        capacity.main(["--model", str(model), "--heldout", str(heldout), *argv])
    assert e.value.code == 2
