"""What a network weighs and costs: parameter counts, the size of its weights stored sparse, and the CPU latency
of query inference, dense and compressed side by side.

Sparse storage (`save_sparse`): a `torch.save` file holding, for every masked tensor, its surviving values
(in the tensor's dtype, row-major order) and its mask packed eight entries to a byte (`numpy.packbits`), and
every other tensor of the state dict (biases, batch norm and its running statistics) as it is. A weight then
costs its dtype's bits times the share kept, plus one bit: at 75% sparsity in float32, 9 bits instead of 32.
`load_sparse` gives back the dense state dict, bit for bit. The dense reference is `torch.save` of the same
state dict, so both sizes carry the same file overhead.
"""

from __future__ import annotations

import io
import statistics
import time
from pathlib import Path
from typing import Callable, Mapping

import numpy as np
import torch
from torch import Tensor, nn

#: what `save_sparse` writes, as the record names it
SPARSE_FORMAT = "torch.save of each masked tensor's kept values and its mask packed to bits (numpy.packbits); other tensors dense"


def counts(model: nn.Module) -> tuple[int, int]:
    """(parameters, nonzero parameters) of `model`."""
    parameters = list(model.parameters())
    return sum(p.numel() for p in parameters), sum(int(torch.count_nonzero(p)) for p in parameters)


def sparse_state(state: Mapping[str, Tensor], masks: Mapping[str, Tensor]) -> dict:
    out: dict = {}
    for name, value in state.items():
        value = value.detach().cpu()
        if name not in masks:
            out[name] = value.clone()
            continue
        mask = masks[name].detach().cpu().to(torch.bool)
        out[name] = {
            "values": value[mask].clone(),
            "bits": torch.from_numpy(np.packbits(mask.flatten().numpy())),
            "shape": list(value.shape),
        }
    return out


def save_sparse(state: Mapping[str, Tensor], masks: Mapping[str, Tensor], path: Path) -> int:
    """Write `state` with its masked tensors stored sparse (see the module docstring); returns the file's bytes."""
    tmp = path.with_name(f".{path.name}.tmp")
    torch.save(sparse_state(state, masks), tmp)
    tmp.replace(path)
    return path.stat().st_size


def load_sparse(path: Path) -> dict[str, Tensor]:
    """The dense state dict that `save_sparse` wrote."""
    stored = torch.load(path, map_location="cpu", weights_only=True)
    out = {}
    for name, value in stored.items():
        if not isinstance(value, dict):
            out[name] = value
            continue
        numel = int(np.prod(value["shape"])) if value["shape"] else 1
        mask = torch.from_numpy(np.unpackbits(value["bits"].numpy(), count=numel).astype(bool))
        dense = torch.zeros(numel, dtype=value["values"].dtype)
        dense[mask] = value["values"]
        out[name] = dense.view(value["shape"])
    return out


def dense_bytes(state: Mapping[str, Tensor]) -> int:
    """The bytes of `torch.save` of the state dict as it is."""
    buffer = io.BytesIO()
    torch.save({k: v.detach().cpu() for k, v in state.items()}, buffer)
    return buffer.getbuffer().nbytes


def side_by_side_ms(calls: dict[str, Callable[[], object]], repeats: int, warmup: int = 3) -> dict[str, float]:
    """The median wall time in milliseconds of each call, timed `repeats` times in alternation (the order of
    the calls turning each round), so that both see the same machine state."""
    names = list(calls)
    for _ in range(warmup):
        for name in names:
            calls[name]()
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(repeats):
        order = names[r % len(names):] + names[: r % len(names)]
        for name in order:
            start = time.perf_counter()
            calls[name]()
            times[name].append(1000.0 * (time.perf_counter() - start))
    return {name: statistics.median(values) for name, values in times.items()}
