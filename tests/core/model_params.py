"""Model parameters for tests, shared by the backends' test modules."""
import numpy as np

from oryx_core.init import init_params


def lively_params(cfg, seed):
    """Fresh random parameters with projections large enough that every part changes the logits."""
    rng = np.random.default_rng(seed)
    params = init_params(cfg, seed)
    for name, p in params.items():
        if p.ndim == 2 and "conv" not in name:
            params[name] = rng.normal(0.0, 0.6 / np.sqrt(p.shape[1]), p.shape).astype(np.float32)
        elif name.endswith(("norm.weight", "D_skip")) or name.endswith(".bias"):
            params[name] = rng.uniform(0.5, 1.5, p.shape).astype(np.float32)
    return params


def tiny_checkpoint_with_smollm2_vocabulary(folder, seed: int = 3):
    """The tiny GDN preset widened to SmolLM2's 49,152-token vocabulary, lively parameters, saved at `folder` with the
    default model's tokenizer (what the retrofit experiments' tests run at toy size); its path."""
    from oryx_core.config import preset
    from oryx_core.default import DEFAULT_ADAPTER
    from oryx_core.weights import save_checkpoint

    cfg = preset("tiny", "gdn").replace(vocab_size=49152)
    return save_checkpoint(folder, cfg, lively_params(cfg, seed),
                           tokenizer_json=(DEFAULT_ADAPTER / "tokenizer.json").read_text())
