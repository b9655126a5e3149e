"""How far a numerical result is from the one it should equal, as every parity test measures it."""
import numpy as np


def as_float64(x) -> np.ndarray:
    """A NumPy, PyTorch or MLX array as a float64 NumPy array."""
    if hasattr(x, "detach"):  # torch
        return x.detach().cpu().double().numpy()
    return np.asarray(x, dtype=np.float64)


def relative_error(got, want) -> float:
    """The larger of the relative Frobenius error ||got - want|| / ||want|| and the worst element's error
    max |got - want| / max |want|. A bound on it bounds the error over all elements and at every single one, so a
    few wrong positions (a chunk edge, a mode switch, a padded tail) cannot hide in a norm over many right ones."""
    got, want = as_float64(got), as_float64(want)
    if got.shape != want.shape:
        raise AssertionError(f"shape {got.shape} is not the expected {want.shape}")
    diff = np.abs(got - want)
    frobenius = np.linalg.norm(diff) / np.linalg.norm(want)
    worst = diff.max(initial=0.0) / np.abs(want).max(initial=0.0)
    return float(max(frobenius, worst))
