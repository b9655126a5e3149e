"""Oryx in transformers: `AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)`.

An exported checkpoint (`export_hf`, `oryx convert SRC DST --to hf`, or `save_pretrained`) is an
ordinary Oryx checkpoint (Oryx loads it unchanged) whose config.json also carries the HF spellings
of the shape fields, `auto_map` and the default mode plan (`oryx_plan`), next to two small files,
configuration_oryx.py and modeling_oryx.py, that import the classes below. So a transformers user
needs `pip install oryx[cuda]` and nothing else:

    model = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)
    out = model(input_ids, labels=input_ids)              # out.loss: next-token cross-entropy
    ids = model.generate(input_ids, max_new_tokens=20, plan="prefill-attention")

The weights are loaded and saved by Oryx's own checkpoint code (bit-exact in both directions);
transformers' loader is bypassed. Generation keeps an Oryx cache (KV cache, conv windows and
recurrent state) that the HF loop hands back at every step; `use_cache=False` recomputes instead.
"""
from __future__ import annotations

import json
from dataclasses import fields
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from transformers import GenerationMixin, PretrainedConfig, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

from oryx_core.atomic import atomic_write_bytes
from oryx_core.chat import read_tokenizer_config, stop_token_ids
from oryx_core.config import OryxConfig
from oryx_core.plan import ModePlan
from oryx_core.tokenizer import TOKENIZER_FILE, tokenizer_for
from oryx_core.weights import (CONFIG_FILE, FORMAT_KEYS, HF_CONFIG_KEYS, TOKENIZER_CONFIG_FILE, load_checkpoint,
                               save_checkpoint)

from .model import DTYPES, OryxModel, resolve_dtype

CONFIG_MODULE, MODELING_MODULE = "configuration_oryx", "modeling_oryx"
AUTO_MAP = {"AutoConfig": f"{CONFIG_MODULE}.OryxHFConfig", "AutoModelForCausalLM": f"{MODELING_MODULE}.OryxForCausalLM"}
# HF spelling -> Oryx field, for the fields both have under different names
HF_NAMES = {"hidden_size": "d_model", "num_hidden_layers": "n_layers", "num_attention_heads": "n_heads",
            "num_key_value_heads": "n_kv_heads", "intermediate_size": "mlp_hidden", "rms_norm_eps": "norm_eps",
            "max_position_embeddings": "max_context", "tie_word_embeddings": "tie_embeddings"}
ORYX_FIELDS = tuple(f.name for f in fields(OryxConfig))
MODULE_SOURCES = {
    CONFIG_MODULE: '"""Oryx configuration for transformers (trust_remote_code); the class lives in the oryx package."""\n'
                   "from oryx_torch.hf import OryxHFConfig\n\n__all__ = [\"OryxHFConfig\"]\n",
    MODELING_MODULE: '"""Oryx model for transformers (trust_remote_code); the class lives in the oryx package '
                     '(pip install oryx[cuda])."""\n'
                     "from oryx_torch.hf import OryxForCausalLM\n\n__all__ = [\"OryxForCausalLM\"]\n",
}
IGNORE_INDEX = -100


class OryxHFConfig(PretrainedConfig):
    """The Oryx config (`oryx_config()`) with its HF-named mirror fields and the default mode plan."""

    model_type = "oryx"

    def __init__(self, oryx_plan: str = "attention", **kwargs):
        oryx = {name: kwargs.pop(name) for name in ORYX_FIELDS if name in kwargs}
        for hf_name, name in HF_NAMES.items():
            value = kwargs.pop(hf_name, None)
            if value is not None:
                oryx.setdefault(name, value)
        for key in FORMAT_KEYS + HF_CONFIG_KEYS:
            if key not in ("architectures", "transformers_version", "dtype", "torch_dtype", "auto_map", "bos_token_id",
                           "eos_token_id"):
                kwargs.pop(key, None)
        ModePlan.parse(oryx_plan)  # a bad plan fails here, naming itself
        self.oryx_plan = oryx_plan
        self.oryx = oryx
        known = {"transformers_version", "architectures", "output_hidden_states", "return_dict", "dtype",
                 "chunk_size_feed_forward", "is_encoder_decoder", "id2label", "label2id", "problem_type"}
        if "torch_dtype" in kwargs:
            kwargs.setdefault("dtype", kwargs.pop("torch_dtype"))
        super().__init__(**{k: v for k, v in kwargs.items() if k in known})
        for key, value in kwargs.items():
            if key not in known:
                setattr(self, key, value)
        if oryx:
            cfg = self.oryx_config()
            for hf_name, name in HF_NAMES.items():
                setattr(self, hf_name, getattr(cfg, name))
            self.vocab_size, self.head_dim = cfg.vocab_size, cfg.head_dim
        self.use_cache = True

    def oryx_config(self) -> OryxConfig:
        return OryxConfig.from_dict(dict(self.oryx), "OryxHFConfig")


class OryxForCausalLM(PreTrainedModel, GenerationMixin):
    """transformers' view of an OryxModel (`.model`); every token's mode comes from a plan
    (`plan=` in forward/generate, else `config.oryx_plan`)."""

    config_class = OryxHFConfig
    base_model_prefix = "model"
    main_input_name = "input_ids"
    _no_split_modules = ["OryxLayer"]
    _supports_cache_class = False

    def __init__(self, config: OryxHFConfig, model: OryxModel | None = None):
        super().__init__(config)
        self.model = model if model is not None else OryxModel(config.oryx_config(), seed=0)
        self.post_init()

    def _init_weights(self, module):
        """Weights come from the checkpoint (or OryxModel's own init); transformers' init must not touch them."""

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        return False  # the model brings its own cache (forward makes it at the first step)

    # -- loading and saving through Oryx's checkpoint code --
    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, config=None, dtype=None, torch_dtype=None,
                        device_map=None, **kwargs):
        path = Path(pretrained_model_name_or_path)
        if not path.is_dir():
            from huggingface_hub import snapshot_download

            path = Path(snapshot_download(str(pretrained_model_name_or_path),
                                          revision=kwargs.get("revision"), token=kwargs.get("token")))
        dtype = dtype if dtype is not None else torch_dtype
        ckpt = load_checkpoint(path)
        if ckpt.quantization is not None:
            raise ValueError(f"{path}: quantized checkpoints are MLX-only; convert to float first")
        if dtype in (None, "auto"):
            dtype = DTYPES.get(ckpt.dtype, torch.float32)
        inner = OryxModel(ckpt.config, seed=None).to(resolve_dtype(dtype))
        inner.load_params(ckpt.params)
        if config is None:
            config = OryxHFConfig.from_dict(json.loads((path / CONFIG_FILE).read_text()))
        model = cls(config, model=inner).eval()
        if device_map not in (None, "cpu"):
            model = model.to(device_map if isinstance(device_map, (str, torch.device)) else "cuda")
        return model

    def save_pretrained(self, save_directory, *args, **kwargs):
        """An Oryx checkpoint (bit-exact weights) that transformers loads again; HF's extra arguments are ignored."""
        return export_hf_model(self.model, save_directory, plan=self.config.oryx_plan)

    # -- transformers' hooks --
    def get_input_embeddings(self):
        return self.model.embed

    def set_input_embeddings(self, value):
        self.model.embed = value

    def get_output_embeddings(self):
        return self.model.lm_head

    def generate(self, inputs=None, *args, **kwargs):
        """transformers' generate; the prompt's length is kept so that plans such as prefill-attention
        know it also when use_cache=False hands forward the whole sequence at every step."""
        ids = inputs if inputs is not None else kwargs.get("input_ids")
        self._prompt_length = None if ids is None else int(ids.shape[-1])
        try:
            return super().generate(inputs, *args, **kwargs)
        finally:
            self._prompt_length = None

    def prepare_inputs_for_generation(self, input_ids, next_sequence_length=None, cache=None, attention_mask=None,
                                      past_key_values=None, use_cache=True, plan=None, **kwargs):
        cache = cache if cache is not None else past_key_values
        if cache is not None:
            input_ids = input_ids[:, cache.length:]
        return {"input_ids": input_ids, "cache": cache, "attention_mask": attention_mask, "use_cache": use_cache,
                "plan": plan}

    def forward(self, input_ids=None, attention_mask=None, labels=None, cache=None, past_key_values=None,
                use_cache=None, plan=None, num_items_in_batch=None, return_dict=None, **kwargs):
        """Logits [B, T, V] (and the shifted next-token loss when labels are given: labels[:, t+1] scores
        logits[:, t], IGNORE_INDEX skipped). With use_cache, the returned `cache` continues the sequence."""
        if input_ids is None:
            raise ValueError("input_ids: required (inputs_embeds are not supported)")
        if attention_mask is not None:
            mask = torch.as_tensor(attention_mask).bool()
            if mask.shape[-1] > 1 and bool((~mask[:, :-1] & mask[:, 1:]).any()):
                raise ValueError("attention_mask: left padding is not supported (pad on the right)")
        cache = cache if cache is not None else past_key_values
        plan = ModePlan.parse(plan if plan is not None else self.config.oryx_plan)
        B, T = input_ids.shape
        generating = getattr(self, "_prompt_length", None)  # set by generate: the prompt's length
        if cache is None and use_cache and not self.training:
            cache = self.model.make_cache(batch=B, capacity=self.model.cfg.max_context)
            cache.prompt_length = generating or T
        offset = 0 if cache is None else cache.length
        prompt_length = getattr(cache, "prompt_length", None) or generating or T
        modes = torch.from_numpy(plan.resolve(offset + T, prompt_length)[offset:].copy())
        if cache is not None and T == 1:
            logits = self.model.step(input_ids[:, 0], modes.expand(B), cache)[:, None]
        else:
            logits = self.model(input_ids, modes, cache=cache)
        loss = None
        if labels is not None:
            shifted = labels[:, 1:].to(logits.device)
            flat = logits[:, :-1].float().reshape(-1, logits.shape[-1])
            if num_items_in_batch is not None:
                loss = F.cross_entropy(flat, shifted.reshape(-1), ignore_index=IGNORE_INDEX, reduction="sum")
                loss = loss / num_items_in_batch
            else:
                loss = F.cross_entropy(flat, shifted.reshape(-1), ignore_index=IGNORE_INDEX)
        return CausalLMOutputWithPast(loss=loss, logits=logits, cache=cache)


def hf_config_dict(cfg: OryxConfig, plan: str = "attention") -> dict:
    """What an exported checkpoint's config.json adds to Oryx's: HF spellings, auto_map, the plan."""
    import transformers

    ModePlan.parse(plan)
    extra = {hf_name: getattr(cfg, name) for hf_name, name in HF_NAMES.items()}
    return {**extra, "auto_map": AUTO_MAP, "oryx_plan": str(plan), "transformers_version": transformers.__version__}


def add_hf_files(path, plan: str = "attention") -> Path:
    """Makes the Oryx checkpoint at `path` loadable by transformers (config keys and the two module files)."""
    path = Path(path)
    config_file = path / CONFIG_FILE
    config = json.loads(config_file.read_text())
    cfg = OryxConfig.from_dict({k: v for k, v in config.items() if k in ORYX_FIELDS}, str(config_file))
    extra = hf_config_dict(cfg, plan)
    if (path / TOKENIZER_FILE).exists():  # generate() stops at the ids that end a reply
        stops = stop_token_ids(path, tokenizer_for(path))
        if stops:
            extra["eos_token_id"] = stops[0] if len(stops) == 1 else stops
        # AutoTokenizer then reads tokenizer.json directly, without the model's remote code
        tokenizer_config = read_tokenizer_config(path) or {}
        tokenizer_config.setdefault("tokenizer_class", "PreTrainedTokenizerFast")
        atomic_write_bytes(path / TOKENIZER_CONFIG_FILE, json.dumps(tokenizer_config, indent=2, ensure_ascii=False).encode())
    for module, source in MODULE_SOURCES.items():
        atomic_write_bytes(path / f"{module}.py", source.encode())
    atomic_write_bytes(config_file, json.dumps({**config, **extra}, indent=2).encode())
    return path


def export_hf_model(model: OryxModel, path, plan: str = "attention", tokenizer_json: str | None = None) -> Path:
    params = {name: np.asarray(value) for name, value in model.params_numpy().items()}
    save_checkpoint(path, model.cfg, params, tokenizer_json=tokenizer_json)
    return add_hf_files(path, plan)
