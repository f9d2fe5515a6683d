"""Int8 inference for one adapted task's network (`metalearn compress compress.quantize=int8`).

A few-shot learner adapts in float: inner steps of a few examples need float gradients, and the adapted
weights of one task are what is deployed. Quantization therefore comes after adaptation, on the plain
network an algorithm makes of one task (`Algorithm.adapted_network`), with its batch norm already fixed.
It is post-training static quantization with PyTorch's FX workflow (`torch.ao.quantization.quantize_fx`):

* batch norm is folded into the convolution before it and the ReLU fused after it, so a block is one int8
  convolution. Its statistics must be settled first: with `model.bn=transductive` those of the query batch
  (what evaluation normalises the queries with), else the stored running statistics of the step adaptation
  ended at;
* weights: int8, symmetric, one scale per output channel; activations: uint8, one scale and zero point per
  tensor, from a histogram observer run over the calibration images (the batch the statistics came from);
* operations without an int8 kernel (ProtoNets' distances, a cosine head) run in float on the dequantized
  features.

The kernels are the CPU's (`x86`, or `qnnpack` where that is the engine torch offers); an int8 network runs on
the CPU only. `torch.ao.quantization` warns that it is deprecated in favour of the torchao package, but it is
the workflow torch 2.14 ships with real int8 CPU kernels; its warnings are silenced here, not hidden elsewhere.
"""

from __future__ import annotations

import copy
import io
import warnings
from contextlib import contextmanager
from typing import Iterator

import torch
from torch import Tensor, nn

#: what the record says was done
SCHEME = {
    "method": "post-training static quantization (torch.ao.quantization.quantize_fx) of each task's adapted network",
    "weights": "int8, symmetric, one scale per output channel",
    "activations": "uint8, one scale and zero point per tensor, histogram observer",
    "batch_norm": "folded into the preceding convolution (statistics settled first), ReLU fused",
    "float_ops": "operations without int8 kernels (ProtoNets' distances, a cosine head) in float on dequantized features",
}
#: the CPU engines, in the order they are preferred
ENGINES = ("x86", "fbgemm", "qnnpack")


def engine() -> str:
    """The int8 CPU engine this torch offers."""
    supported = torch.backends.quantized.supported_engines
    for name in ENGINES:
        if name in supported:
            return name
    raise RuntimeError(f"this torch build has no int8 CPU engine (supported: {supported})")


@contextmanager
def _quiet() -> Iterator[None]:
    # torch.ao.quantization's deprecation notice and its observers' reduce_range advice, once per task otherwise
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", module=r"torch\.ao\.quantization")
        warnings.filterwarnings("ignore", message=r".*(torch\.ao\.quantization|quant_min and quant_max|quantize_per_tensor).*")
        yield


class _Traced(nn.Module):
    """The network called with its input only, so that FX traces the forward a deployed network runs
    (keyword switches such as `features_only` stay at their defaults)."""

    def __init__(self, network: nn.Module) -> None:
        super().__init__()
        self.network = network

    def forward(self, x: Tensor) -> Tensor:
        return self.network(x)


@torch.no_grad()
def quantize_int8(network: nn.Module, calibration: Tensor) -> nn.Module:
    """An int8 copy of `network` (a plain network in eval mode, batch norm fixed) for the CPU, its activation
    ranges observed on `calibration` (a batch of its inputs)."""
    from torch.ao.quantization import get_default_qconfig_mapping
    from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx

    name = engine()
    torch.backends.quantized.engine = name
    float_copy = _Traced(copy.deepcopy(network).cpu().eval())
    calibration = calibration.detach().cpu().float()
    with _quiet():
        prepared = prepare_fx(float_copy, get_default_qconfig_mapping(name), (calibration,))
        prepared(calibration)
        return convert_fx(prepared).eval()


def file_bytes(network: nn.Module) -> int:
    """The bytes of `torch.save` of the network's state dict (an int8 network's holds its packed weights)."""
    buffer = io.BytesIO()
    with _quiet():
        torch.save(network.state_dict(), buffer)
    return buffer.getbuffer().nbytes
