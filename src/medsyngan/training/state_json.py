"""JSON-safe forms of tensors, numpy arrays and the global RNG states, for checkpoint metadata and secrets."""

from __future__ import annotations

import base64
import random
from typing import Any

import numpy as np
import torch
from torch import Tensor


def encode_json(value: Any) -> Any:
    """JSON-safe form of nested dicts/lists holding tensors and numpy arrays (tensors → base64 of raw bytes)."""
    if isinstance(value, Tensor):
        t = value.detach().cpu().contiguous()
        raw = t.view(torch.uint8).numpy().tobytes() if t.numel() else b""
        return {"__tensor__": str(t.dtype).removeprefix("torch."), "shape": list(t.shape),
                "b64": base64.b64encode(raw).decode()}
    if isinstance(value, np.ndarray):
        return {"__ndarray__": value.dtype.str, "shape": list(value.shape),
                "b64": base64.b64encode(np.ascontiguousarray(value).tobytes()).decode()}
    if isinstance(value, dict):
        return {str(k): encode_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [encode_json(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    return value


def decode_json(value: Any) -> Any:
    if isinstance(value, dict):
        if "__tensor__" in value:
            dtype = getattr(torch, value["__tensor__"])
            raw = bytearray(base64.b64decode(value["b64"]))
            flat = torch.frombuffer(raw, dtype=torch.uint8) if raw else torch.empty(0, dtype=torch.uint8)
            return flat.view(dtype).reshape(value["shape"]).clone()
        if "__ndarray__" in value:
            arr = np.frombuffer(base64.b64decode(value["b64"]), dtype=np.dtype(value["__ndarray__"]))
            return arr.reshape(value["shape"]).copy()
        return {k: decode_json(v) for k, v in value.items()}
    if isinstance(value, list):
        return [decode_json(v) for v in value]
    return value


def capture_rng() -> dict[str, Any]:
    """The global RNG states of torch (CPU and CUDA), numpy and python, JSON-safe."""
    state: dict[str, Any] = {
        "torch": encode_json(torch.get_rng_state()),
        "numpy": encode_json(list(np.random.get_state())),
        "python": encode_json(random.getstate()),
    }
    if torch.cuda.is_available():
        state["cuda"] = [encode_json(s) for s in torch.cuda.get_rng_state_all()]
    return state


def restore_rng(state: dict[str, Any]) -> None:
    torch.set_rng_state(decode_json(state["torch"]))
    name, keys, pos, has_gauss, cached = decode_json(state["numpy"])
    np.random.set_state((name, keys, int(pos), int(has_gauss), float(cached)))
    version, internal, gauss = decode_json(state["python"])
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([decode_json(s) for s in state["cuda"]])
