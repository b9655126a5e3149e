"""The model module mlx-lm runs for an exported Oryx directory.

`oryx export-mlx-lm` copies this file into the directory as `oryx_mlx_lm.py` and names it
in config.json ("model_file"); mlx-lm (checked with 0.32.2) then builds the model from this file's
`Model` and `ModelArgs` when loaded with `mlx_lm.load(path, trust_remote_code=True)`.
The file itself stays small: the model is `oryx_mlx.model.OryxModel`, so the `oryx`
package (with its mlx extra) must be installed where mlx-lm runs.

mlx-lm calls `model(tokens, cache=cache)` without modes, so the export fixes a mode plan
(config.json "oryx_plan", default "attention"), resolved over absolute positions. Only
plans that decide a token's mode from its position alone are accepted (attention,
recurrent, every:K:C, spans); `model.plan = ModePlan.parse(...)` changes it after loading.
"""
# No `from __future__ import annotations`: mlx-lm executes this file without registering it in
# sys.modules, and dataclasses then cannot resolve string annotations.
import dataclasses
from dataclasses import dataclass

from oryx_core.config import OryxConfig
from oryx_core.plan import ModePlan
from oryx_mlx.cache import cache_offset
from oryx_mlx.model import OryxModel

POSITIONAL_PLAN_KINDS = ("attention", "recurrent", "every", "spans")
CONFIG_FIELDS = {f.name for f in dataclasses.fields(OryxConfig)} - {"extra"}


def positional_plan(text) -> ModePlan:
    plan = ModePlan.parse(text)
    if plan.kind not in POSITIONAL_PLAN_KINDS:
        raise ValueError(f"oryx_plan {str(plan)!r}: mlx-lm gives no prompt or final length, so the plan must decide "
                         "each token's mode from its position (attention, recurrent, every:K:C or spans)")
    return plan


@dataclass
class ModelArgs:
    config: OryxConfig
    plan: ModePlan

    @classmethod
    def from_dict(cls, params: dict) -> "ModelArgs":
        config = OryxConfig.from_dict({k: v for k, v in params.items() if k in CONFIG_FIELDS}, "config.json")
        return cls(config, positional_plan(params.get("oryx_plan", "attention")))


class Model(OryxModel):
    def __init__(self, args: ModelArgs):
        super().__init__(args.config)
        self.model_type = "oryx"
        self.plan = args.plan

    def __call__(self, inputs, cache=None, input_embeddings=None):
        if input_embeddings is not None:
            raise ValueError("input_embeddings: an Oryx model takes token ids only")
        offset = cache_offset(cache) if cache is not None else 0
        modes = self.plan.resolve(offset + inputs.shape[1])[offset:]
        return super().__call__(inputs, modes, cache)
