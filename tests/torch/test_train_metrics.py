"""oryx train's optional metric sinks: TensorBoard event files hold the log's values; bad sinks are named."""
import json
import math

import pytest

pytest.importorskip("torch")

from test_train import one_cpu_thread, shards, tiny_config  # noqa: E402,F401  (fixtures)

from oryx_torch.metrics import check_sinks, scalars  # noqa: E402
from oryx_torch.train import train  # noqa: E402


def test_tensorboard_gets_every_logged_loss_and_eval(shards, tmp_path):  # noqa: F811
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "run"
    train(tiny_config(shards, out, steps=4, eval_every=2, save_every=0, log_to=["tensorboard"]))
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    losses = {e.step: e.value for e in events.Scalars("loss")}
    logged = {r["step"]: r["loss"] for r in log if "loss" in r}
    assert sorted(losses) == sorted(logged) == [1, 2, 3, 4]
    assert all(math.isclose(losses[s], logged[s], rel_tol=1e-6) for s in logged)
    evals = {e.step: e.value for e in events.Scalars("eval/recurrent")}
    assert sorted(evals) == [2, 4]
    assert math.isclose(evals[4], [r for r in log if "eval" in r][-1]["eval"]["recurrent"], rel_tol=1e-6)


def test_sinks_are_checked_before_training():
    with pytest.raises(ValueError, match="unknown sink 'mlflow'"):
        check_sinks(["mlflow"])
    with pytest.raises(ValueError, match="must be a list"):
        check_sinks("tensorboard")
    assert scalars({"step": 3, "loss": 2.5, "eval": {"attention": 1.0}, "skipped": "x"}) == {"loss": 2.5, "eval/attention": 1.0}
