"""The random number generators a training run draws from, captured and restored as plain data.

An exact continuation needs every generator back where it was: Python's ``random``, NumPy's
global generator, torch's CPU generator and each CUDA device's, and the generators a data
loader draws its shuffle order and worker seeds from. Each state is held as a tensor or
plain Python values, so a checkpoint holding it loads with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch

try:  # NumPy is optional: torch does not need it
    import numpy as np
except ImportError:  # pragma: no cover - numpy is installed with the dev extras
    np = None  # type: ignore[assignment]


def capture() -> dict[str, Any]:
    """The global generators' states: Python, NumPy (when installed), torch CPU, every CUDA device."""
    state: dict[str, Any] = {"python": _python_state(), "torch": torch.get_rng_state()}
    if np is not None:
        name, keys, pos, has_gauss, gauss = np.random.get_state(legacy=True)
        state["numpy"] = {
            "name": str(name),
            "keys": torch.from_numpy(np.asarray(keys).astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "gauss": float(gauss),
        }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore(state: Mapping[str, Any]) -> None:
    """Put the global generators back to a ``capture()``; a KeyError or ValueError if it is malformed."""
    version, internal, gauss = state["python"]
    random.setstate((int(version), tuple(int(v) for v in internal), gauss))
    torch.set_rng_state(state["torch"])
    saved_np = state.get("numpy")
    if np is not None and saved_np is not None:
        keys = saved_np["keys"].numpy().astype(np.uint32)
        np.random.set_state(
            (saved_np["name"], keys, saved_np["pos"], saved_np["has_gauss"], saved_np["gauss"])
        )
    cuda = state.get("cuda")
    if cuda is not None and torch.cuda.is_available():
        if len(cuda) != torch.cuda.device_count():
            seen = torch.cuda.device_count()
            msg = f"the checkpoint holds {len(cuda)} CUDA generator states, this process sees {seen} devices"
            raise ValueError(msg)
        torch.cuda.set_rng_state_all(cuda)


def _python_state() -> tuple[int, list[int], float | None]:
    version, internal, gauss = random.getstate()
    return int(version), list(internal), gauss


def loader_generators(loader: object) -> list[torch.Generator]:
    """The ``torch.Generator`` objects a loader draws from when a pass over it starts.

    A ``DataLoader`` draws its workers' base seed from its ``generator`` and a shuffling
    sampler its order from the sampler's (often the same object); samplers nested in a batch
    sampler count too. Loaders without generators (a list, a sampler seeded per epoch such as
    ``DistributedSampler``) draw from torch's global generator or from nothing.
    """
    found: list[torch.Generator] = []
    candidates: Iterable[object] = (
        getattr(loader, "generator", None),
        getattr(getattr(loader, "sampler", None), "generator", None),
        getattr(getattr(getattr(loader, "batch_sampler", None), "sampler", None), "generator", None),
    )
    for g in candidates:
        if isinstance(g, torch.Generator) and not any(g is f for f in found):
            found.append(g)
    return found


def capture_loader(loader: object) -> dict[str, Any]:
    """What a pass over ``loader`` will draw from, taken just before the pass starts: torch's global
    generator (the base seed and order of a loader without its own generator) and the loader's own."""
    return {
        "torch": torch.get_rng_state(),
        "generators": [g.get_state() for g in loader_generators(loader)],
    }


def set_loader_generators(loader: object, states: Sequence[torch.Tensor]) -> None:
    """Put the loader's own generators (``loader_generators``) back to ``states``; a ValueError when
    the loader draws from another number of them."""
    generators = loader_generators(loader)
    if len(states) != len(generators):
        msg = f"the loader draws from {len(generators)} generators, the checkpoint holds {len(states)}"
        raise ValueError(msg)
    for g, s in zip(generators, states, strict=True):
        g.set_state(s)


def restore_loader(loader: object, state: Mapping[str, Any]) -> None:
    """Put a ``capture_loader`` back, so that the next pass draws the same order and worker seeds."""
    set_loader_generators(loader, list(state["generators"]))
    torch.set_rng_state(state["torch"])
