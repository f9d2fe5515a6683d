"""The files `metalearn export` writes an adapted network to, and the check that the file computes what
PyTorch computes.

* `onnx`: `torch.onnx.export` (torch's own exporter, built on `onnxscript`), one self-contained .onnx file
  (opset of the exporter's choice) with input `images` [batch, C, H, W] and output `logits` [batch, N], the
  batch dimension dynamic; checked with onnxruntime on the CPU. The packages come with the `deploy` extra.
* `torchscript`: `torch.jit.trace` saved with `torch.jit.save`; checked with `torch.jit.load`. The network
  has no data-dependent control flow, so the trace is the whole network, for any batch size.

The check runs the saved file, through its runtime, on images the network was not traced on (a task's
queries) and compares its outputs with the adapted network's in PyTorch: the largest absolute difference
must be at most `TOLERANCE`.
"""

from __future__ import annotations

import importlib
import logging
import os
import tempfile
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from metalearn_cli import options
from metalearn_cli.errors import MetalearnError

#: format=: the kinds of file an adapted network is written as
FORMATS = ("onnx", "torchscript")
SUFFIXES = {"onnx": ".onnx", "torchscript": ".pt"}
#: what format=onnx imports: the exporter's graph builder, the format, the runtime that checks the file
ONNX_PACKAGES = ("onnxscript", "onnx", "onnxruntime")
INSTALL = "pip install 'metalearn[deploy]'"
#: the largest absolute difference between the file's outputs and PyTorch's that passes the check
TOLERANCE = 1e-4
INPUT, OUTPUT = "images", "logits"
#: loggers whose progress notes (graph passes, nodes removed) an export prints at INFO
EXPORTER_LOGGERS = ("torch.onnx", "torch.export", "onnxscript", "onnx_ir")


@dataclass
class Check:
    """The saved file's outputs against PyTorch's on the same images."""

    runtime: str
    images: int
    #: what the images are ("query images", "support images")
    what: str
    max_abs_diff: float
    tolerance: float = TOLERANCE

    @property
    def passed(self) -> bool:
        return self.max_abs_diff <= self.tolerance

    def line(self) -> str:
        sign = "<=" if self.passed else ">"
        return (f"checked: {self.runtime} vs PyTorch on {self.images} {self.what}, "
                f"max |diff| {self.max_abs_diff:.2g} {sign} {short(self.tolerance)}")

    def record(self) -> dict:
        return {"runtime": self.runtime, "images": self.images, "on": self.what, "max_abs_diff": self.max_abs_diff,
                "tolerance": self.tolerance, "passed": self.passed}


class ExportFormat:
    """One of FORMATS: writes a network to a file and runs that file with its runtime. Built before anything
    is adapted or written, so a missing package is reported first."""

    def __init__(self, name: str) -> None:
        self.name = options.choice("format", name, FORMATS)
        self.suffix = SUFFIXES[name]
        if name == "onnx":
            missing = [package for package in ONNX_PACKAGES if not _importable(package)]
            if missing:
                raise MetalearnError(
                    f"`format=onnx` needs the packages {', '.join(ONNX_PACKAGES)}, and {', '.join(missing)} "
                    f"{'is' if len(missing) == 1 else 'are'} not installed. Install them with `{INSTALL}` (or pip install "
                    f"{' '.join(ONNX_PACKAGES)}), or write TorchScript instead with `format=torchscript`, which needs nothing more."
                )

    @property
    def runtime(self) -> str:
        if self.name == "onnx":
            import onnxruntime

            return f"onnxruntime {onnxruntime.__version__}"
        return "torch.jit.load"

    def write(self, network: nn.Module, example: Tensor, path: Path) -> None:
        """`network` (images [B, C, H, W] -> logits [B, N], eval mode) as this format's file at `path`, traced on
        `example` (at least 2 images: a batch of 1 would fix the batch size)."""
        with warnings.catch_warnings(), quiet(EXPORTER_LOGGERS):
            warnings.simplefilter("ignore")  # the exporters' deprecation and tracing notices are not the user's
            try:
                if self.name == "onnx":
                    batch = torch.export.Dim("batch")
                    torch.onnx.export(network, (example,), str(path), input_names=[INPUT], output_names=[OUTPUT],
                                      dynamic_shapes=({0: batch},), external_data=False, verbose=False)
                else:
                    torch.jit.save(torch.jit.trace(network, example), str(path))
            except Exception as error:
                detail = " ".join(str(error).split())[:300]
                raise MetalearnError(
                    f"the adapted network could not be written with `format={self.name}`: {type(error).__name__}: {detail}. "
                    f"Try the other format (`format={'torchscript' if self.name == 'onnx' else 'onnx'}`)."
                ) from None

    def run(self, path: Path, images: Tensor) -> Tensor:
        """The logits of the file at `path` for `images`, computed by this format's runtime on the CPU."""
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if self.name == "onnx":
                import onnxruntime

                session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
                return torch.from_numpy(session.run([OUTPUT], {INPUT: images.cpu().numpy()})[0])
            with torch.no_grad():
                return torch.jit.load(str(path), map_location="cpu")(images.cpu())

    def check(self, network: nn.Module, path: Path, images: Tensor, what: str) -> Check:
        with torch.no_grad():
            expected = network(images)
        got = self.run(path, images)
        if got.shape != expected.shape:
            raise MetalearnError(f"the written {self.name} file gives outputs of shape {tuple(got.shape)} for "
                                 f"{tuple(images.shape)} images, where PyTorch gives {tuple(expected.shape)}.")
        return Check(self.runtime, images.shape[0], what, float((got.float() - expected).abs().max()))


def temporary_beside(path: Path) -> Path:
    """A new, empty file name in `path`'s folder (renamed over the final name once the file is checked)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=path.suffix, dir=path.parent)
    os.close(fd)
    return Path(name)


def short(number: float) -> str:
    """1e-4 rather than 0.0001 or 1e-04."""
    mantissa, _, exponent = f"{number:.0e}".partition("e")
    return f"{mantissa}e{int(exponent)}"


@contextmanager
def quiet(names: tuple[str, ...]):
    """The loggers `names` (and their children) say only warnings and errors for a while."""
    loggers = [logging.getLogger(name) for name in names]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


def _importable(package: str) -> bool:
    try:
        importlib.import_module(package)
    except ImportError:
        return False
    return True
