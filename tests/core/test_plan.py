import numpy as np
import pytest

from oryx_core.plan import ModePlan, PlanError, sample_training_modes


def modes_text(modes):
    return "".join("A" if m else "R" for m in modes)


def test_named_policies():
    assert modes_text(ModePlan.parse("attention").resolve(4)) == "AAAA"
    assert modes_text(ModePlan.parse("R").resolve(4)) == "RRRR"
    assert modes_text(ModePlan.parse("prefill-attention").resolve(6, prompt_length=4)) == "AAAARR"
    assert modes_text(ModePlan.parse("last:25%").resolve(8)) == "RRRRRRAA"
    assert modes_text(ModePlan.parse("last:3").resolve(5)) == "RRAAA"
    assert modes_text(ModePlan.parse("every:3:2").resolve(14)) == "AARRRRAARRRRAA"


def test_spans_switch_back_and_forth():
    plan = ModePlan.parse("A:0-2, R:2-5,A:5-")
    assert modes_text(plan.resolve(8)) == "AARRRAAA"
    assert str(ModePlan.parse(str(plan))) == str(plan)
    assert plan.attention_after(3) and not ModePlan.parse("A:0-4,R:4-").attention_after(4)


def test_text_form_round_trips():
    for text in ["attention", "recurrent", "prefill-attention", "last:10%", "last:64", "every:4:64", "A:0-512,R:512-"]:
        assert str(ModePlan.parse(text)) == text


@pytest.mark.parametrize("text, message", [
    ("A:0-10,R:5-", "overlap"),
    ("A:0-10,R:12-", "gap"),
    ("A:4-10", "gap"),
    ("A:0-,R:10-", "only the last span may be open"),
    ("A:0-0", "empty or negative"),
    ("A:0-10,R:10-3", "empty or negative"),
    ("A:-3-5", "cannot read"),
    ("sometimes", "cannot read"),
    ("last:150%", "percentage"),
    ("every:0:64", "every:K:CHUNK"),
    ("", "non-empty"),
])
def test_invalid_plans_are_clear(text, message):
    with pytest.raises(PlanError, match=message):
        ModePlan.parse(text)


def test_closed_plan_shorter_than_sequence_and_missing_prompt():
    with pytest.raises(PlanError, match="covers tokens 0-10 but the sequence has 12"):
        ModePlan.parse("A:0-4,R:4-10").resolve(12)
    with pytest.raises(PlanError, match="needs a prompt length"):
        ModePlan.parse("prefill-attention").resolve(12)


def test_mixed_training_sampler():
    rng = np.random.default_rng(0)
    modes = sample_training_modes(rng, batch=400, length=510, chunk=8, pure_share=0.2)
    assert modes.shape == (400, 510) and modes.dtype == bool
    # constant within chunks
    for c in range(0, 510, 8):
        block = modes[:, c:c + 8]
        assert (block == block[:, :1]).all()
    fraction = modes.mean(1)
    pure = (fraction == 0) | (fraction == 1)
    assert 0.15 < pure.mean() < 0.30  # 20% pure, plus ~2/65 of the mixed ones by chance
    assert 0.4 < fraction.mean() < 0.6  # r ~ U[0,1]
    mixed = fraction[~pure]
    assert mixed.std() > 0.15  # the attention share varies across sequences
    again = sample_training_modes(np.random.default_rng(0), 400, 510, 8, 0.2)
    assert (again == modes).all()


@pytest.mark.parametrize("text", ["attention", "recurrent", "prefill-attention", "every:1:4", "every:3:4",
                                  "last:25%", "A:0-7,R:7-13,A:13-", "R:0-9,A:9-"])
def test_mode_after_never_misses_a_mode_the_plan_resolves(text):
    """attention_after / recurrent_after (which the drop policies trust) are True wherever the resolved plan
    still has a token of that mode, and exact for plans decided by position (the tail is long enough)."""
    plan, prompt_length = ModePlan.parse(text), 6
    for length in (8, 40):
        modes = plan.resolve(length, prompt_length=prompt_length)
        for position in range(length):
            ahead = {True: plan.attention_after(position, prompt_length),
                     False: plan.recurrent_after(position, prompt_length)}
            for attention in (True, False):
                present = bool((modes[position:] == attention).any())
                assert ahead[attention] or not present
                if length == 40 and position < 20 and plan.kind != "last":
                    assert ahead[attention] == present


@pytest.mark.parametrize("text", ["attention", "recurrent", "last:25%", "last:7", "every:3:5",
                                  "A:0-4,R:4-13,A:13-", "R:0-9,A:9-40", "A:0-40"])
def test_a_window_resolves_as_the_same_slice_of_the_whole_sequence(text):
    plan, length = ModePlan.parse(text), 40
    whole = plan.resolve(length)
    for start, stop in [(0, 0), (0, 40), (0, 7), (3, 16), (13, 14), (16, 40), (39, 40), (40, 40)]:
        assert modes_text(plan.resolve_window(start, stop, length)) == modes_text(whole[start:stop])
        if not plan.needs_length:
            assert modes_text(plan.resolve_window(start, stop, None)) == modes_text(whole[start:stop])


def test_window_errors_name_the_plan():
    with pytest.raises(PlanError, match="last:10%.*needs the sequence's length"):
        ModePlan.parse("last:10%").resolve_window(0, 4, None)
    with pytest.raises(PlanError, match="tokens 5-9 are not a window of a sequence of 8 tokens"):
        ModePlan.parse("attention").resolve_window(5, 9, 8)
    with pytest.raises(PlanError, match="covers tokens 0-8 but the sequence has 12"):
        ModePlan.parse("A:0-4,R:4-8").resolve_window(0, 4, 12)
    with pytest.raises(PlanError, match="covers tokens 0-8 but the sequence has 9"):
        ModePlan.parse("A:0-4,R:4-8").resolve_window(6, 9, None)
