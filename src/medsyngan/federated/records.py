"""Tensors and nested state as Flower records and bytes: the building blocks of messages and hospital state."""

from __future__ import annotations

import io
import json
from collections.abc import Mapping
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, RecordDict


def state_to_record(state: Mapping[str, torch.Tensor]) -> ArrayRecord:
    return ArrayRecord({k: v.detach().cpu().contiguous() for k, v in state.items()})


def record_to_state(record: ArrayRecord) -> dict[str, torch.Tensor]:
    return record.to_torch_state_dict()


def record_bytes(content: RecordDict) -> int:
    """Payload bytes of a message: array bytes plus bytes/str config values (what dominates the wire)."""
    total = 0
    for record in content.values():
        if isinstance(record, ArrayRecord):
            total += record.count_bytes()
        elif isinstance(record, ConfigRecord):
            total += sum(len(v) for v in record.values() if isinstance(v, (bytes, str)))
    return total


def split_state(obj: Any) -> tuple[dict[str, torch.Tensor], str]:
    """A nested state (dicts, lists, tensors, numbers) as flat tensors plus a JSON skeleton.

    Flower chunks the arrays of an ArrayRecord but sends a ConfigRecord value in one piece, so a hospital's state
    (weights and Adam moments: tens of MB at DCGAN-64) must travel as arrays to fit a deployment's messages.
    """
    tensors: dict[str, torch.Tensor] = {}

    def walk(node: Any, path: str) -> Any:
        if isinstance(node, torch.Tensor):
            tensors[path] = node.detach().cpu().contiguous()
            return {"__tensor__": path}
        if isinstance(node, dict):
            return {"__dict__": [[walk(k, f"{path}/k{i}"), walk(v, f"{path}/{i}")] for i, (k, v) in enumerate(node.items())]}
        if isinstance(node, (list, tuple)):
            return {"__list__": [walk(v, f"{path}/{i}") for i, v in enumerate(node)], "tuple": isinstance(node, tuple)}
        return node

    skeleton = walk(obj, "s")
    return tensors, json.dumps(skeleton)


def join_state(tensors: Mapping[str, torch.Tensor], skeleton: str) -> Any:
    def build(node: Any) -> Any:
        if isinstance(node, dict) and "__tensor__" in node:
            return tensors[node["__tensor__"]]
        if isinstance(node, dict) and "__dict__" in node:
            return {build(k): build(v) for k, v in node["__dict__"]}
        if isinstance(node, dict) and "__list__" in node:
            items = [build(v) for v in node["__list__"]]
            return tuple(items) if node["tuple"] else items
        return node

    return build(json.loads(skeleton))


def pack_blob(obj: Any) -> bytes:
    """torch.save into bytes: a hospital's full state (optimizer moments, RNG) as one file on its disk."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def unpack_blob(blob: bytes) -> Any:
    return torch.load(io.BytesIO(blob), map_location="cpu", weights_only=True)
