"""Agent checkpoints: LoRA adapter + optimizer state as safetensors, counters as JSON.

Layout of a checkpoint directory::

    adapter.safetensors    LoRA weights (peft state dict, base excluded: it is frozen
                           and rebuilt from the model spec / cache)
    optimizer.safetensors  AdamW moment tensors, keyed "<param index>.<state name>"
    state.json             {"format": 1, "spec", "family", "step", "round", ...}

Files are written to a temporary name and renamed, so a crash mid-save leaves the
previous checkpoint intact. No pickle: safetensors and JSON only.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import structlog
import torch
from safetensors.torch import load_file, save_file

log = structlog.get_logger(__name__)

FORMAT = 1
ADAPTER = "adapter.safetensors"
OPTIMIZER = "optimizer.safetensors"
STATE = "state.json"


def _atomic(path: Path, write) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    write(tmp)
    os.replace(tmp, path)


def _optimizer_tensors(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor],
                                                                   dict[str, Any]]:
    sd = optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, Any] = {}
    for idx, state in sd["state"].items():
        for name, value in state.items():
            key = f"{idx}.{name}"
            if torch.is_tensor(value):
                tensors[key] = value.detach().cpu().contiguous()
            else:
                scalars[key] = value
    return tensors, {"scalars": scalars, "param_groups": sd["param_groups"]}


def save_checkpoint(directory: Path, model, optimizer: torch.optim.Optimizer | None,
                    state: dict[str, Any]) -> None:
    """Write adapter, optimizer and ``state`` (must be JSON-serialisable) to ``directory``."""
    from peft import get_peft_model_state_dict

    directory.mkdir(parents=True, exist_ok=True)
    adapter = {k: v.detach().cpu().contiguous() for k, v in get_peft_model_state_dict(model).items()}
    _atomic(directory / ADAPTER, lambda p: save_file(adapter, str(p)))
    payload = {"format": FORMAT, **state}
    if optimizer is not None:
        tensors, meta = _optimizer_tensors(optimizer)
        if tensors:
            _atomic(directory / OPTIMIZER, lambda p: save_file(tensors, str(p)))
        payload["optimizer"] = meta
    _atomic(directory / STATE, lambda p: p.write_text(json.dumps(payload, indent=2)))
    log.info("agent.checkpoint.saved", path=str(directory), tensors=len(adapter),
             step=state.get("step"), round=state.get("round"))


def load_checkpoint(directory: Path, model, optimizer: torch.optim.Optimizer | None
                    ) -> dict[str, Any] | None:
    """Restore into ``model``/``optimizer``; returns the saved state, or None if absent."""
    from peft import set_peft_model_state_dict

    state_path = directory / STATE
    if not state_path.exists() or not (directory / ADAPTER).exists():
        return None
    payload = json.loads(state_path.read_text())
    if payload.get("format") != FORMAT:
        raise ValueError(f"unsupported checkpoint format {payload.get('format')!r}")
    device = next(model.parameters()).device
    adapter = load_file(str(directory / ADAPTER), device=str(device))
    result = set_peft_model_state_dict(model, adapter)
    unexpected = getattr(result, "unexpected_keys", [])
    if unexpected:
        raise ValueError(f"checkpoint does not fit this model: {unexpected[:3]}")
    meta = payload.get("optimizer")
    if optimizer is not None and meta is not None:
        tensors = load_file(str(directory / OPTIMIZER)) if (directory / OPTIMIZER).exists() else {}
        opt_state: dict[int, dict[str, Any]] = {}
        for key, value in tensors.items():
            idx, name = key.split(".", 1)
            opt_state.setdefault(int(idx), {})[name] = value.to(device)
        for key, value in meta["scalars"].items():
            idx, name = key.split(".", 1)
            opt_state.setdefault(int(idx), {})[name] = value
        optimizer.load_state_dict({"state": opt_state, "param_groups": meta["param_groups"]})
    log.info("agent.checkpoint.loaded", path=str(directory), step=payload.get("step"),
             round=payload.get("round"))
    return payload
