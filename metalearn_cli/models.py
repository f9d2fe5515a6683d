"""Networks. Plain `nn.Module`s: algorithms use them as pure functions of a parameter dict
through `torch.func.functional_call`, so nothing here knows about meta-learning."""

from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import nn

from metalearn_cli import options

#: model.bn: which statistics batch norm uses at test (see MetaBatchNorm2d)
BN_MODES = ("transductive", "frozen", "per_step")
#: model.init: conv4's initialisation, PyTorch's defaults or MAML's reference code's (see Conv4)
CONV4_INITS = ("pytorch", "reference")


class MLP(nn.Module):
    """Fully connected ReLU network; the MAML paper's sinusoid model is MLP((1,), 1, hidden=(40, 40))."""

    #: an adapted copy has an int8 form (`metalearn_cli.compression.quantization`)
    quantizable = True

    def __init__(self, input_shape: Sequence[int], out_features: int, hidden: Sequence[int] = (40, 40)) -> None:
        super().__init__()
        sizes = [math.prod(input_shape), *hidden]
        layers: list[nn.Module] = [nn.Flatten()]
        for fan_in, fan_out in zip(sizes[:-1], sizes[1:]):
            layers += [nn.Linear(fan_in, fan_out), nn.ReLU()]
        self.body = nn.Sequential(*layers)
        self.head = nn.Linear(sizes[-1], out_features)

    def forward(self, x: torch.Tensor, features_only: bool = False) -> torch.Tensor:
        features = self.body(x)
        return features if features_only else self.head(features)


class GaussianMLP(MLP):
    """A Gaussian policy (rllab's GaussianMLPPolicy, the MAML paper's 2 x 100 ReLU): the network's output is
    the action mean, and `log_std` ([out_features], learned, the same in every state) its log standard
    deviation. Initialised as the reference code's: Glorot-uniform weights, zero biases, standard
    deviation exp(init_log_std) (1). The tasks read the mean from the forward pass and `log_std` from the
    parameters (`metalearn_cli.tasks.episodes`)."""

    #: a policy's log standard deviation is read outside the forward pass, which an int8 copy would drop
    quantizable = False

    def __init__(self, input_shape: Sequence[int], out_features: int, hidden: Sequence[int] = (100, 100),
                 init_log_std: float = 0.0) -> None:
        super().__init__(input_shape, out_features, hidden)
        if isinstance(init_log_std, bool) or not isinstance(init_log_std, (int, float)) or not math.isfinite(init_log_std):
            raise options.invalid("init_log_std", init_log_std, "a finite number (the initial log standard deviation of actions)")
        for layer in self.modules():
            if isinstance(layer, nn.Linear):
                nn.init.xavier_uniform_(layer.weight)
                nn.init.zeros_(layer.bias)
        self.log_std = nn.Parameter(torch.full((out_features,), float(init_log_std)))




class MetaBatchNorm2d(nn.Module):
    """Batch normalisation with an explicit choice of which statistics normalise at test time.

    * ``transductive``: always the statistics of the batch at hand, in training and at test (the
      task's support set while adapting, its query set when scoring). What MAML's and Reptile's
      published numbers use; at test, the query examples of a task influence each other.
    * ``frozen``: batch statistics in meta-training; at validation and test the running statistics
      of the meta-learned initialisation, estimated on meta-training support sets. No test example
      influences another.
    * ``per_step``: like ``frozen``, with one set of running statistics per inner step (MAML++,
      Antoniou et al. 2019): step k of adaptation at test normalises with the statistics the
      model had at step k in meta-training.

    Running statistics are updated only by `record` (outside the inner loop, without gradients);
    the forward pass itself never changes a buffer, so it is safe under functional_call and vmap.
    """

    def __init__(self, channels: int, mode: str = "transductive", steps: int = 1, momentum: float = 0.1, eps: float = 1e-5) -> None:
        super().__init__()
        self.mode = options.choice("bn", mode, BN_MODES)
        self.momentum = momentum
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))
        slots = steps + 1 if mode == "per_step" else 1
        if mode != "transductive":
            self.register_buffer("running_mean", torch.zeros(slots, channels))
            self.register_buffer("running_var", torch.ones(slots, channels))
        #: inner step being run (per_step); set by FunctionalModel before each forward
        self.step = 0
        #: when True, forward passes update the running statistics (used by `record` only)
        self.recording = False

    def _slot(self) -> int:
        return min(self.step, self.running_mean.shape[0] - 1) if self.mode == "per_step" else 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.mode != "transductive" and self.recording:
            with torch.no_grad():
                slot = self._slot()
                mean = x.mean(dim=(0, 2, 3))
                var = x.var(dim=(0, 2, 3), unbiased=True)
                self.running_mean[slot].lerp_(mean, self.momentum)
                self.running_var[slot].lerp_(var, self.momentum)
        if self.mode == "transductive" or self.training:
            # Written out rather than F.batch_norm: its double backward is wrong under vmap
            # (second-order MAML with vectorized tasks; tests/test_models.py checks this).
            mean = x.mean(dim=(0, 2, 3), keepdim=True)
            var = (x - mean).pow(2).mean(dim=(0, 2, 3), keepdim=True)
            scale = self.weight.view(1, -1, 1, 1) * torch.rsqrt(var + self.eps)
            return (x - mean) * scale + self.bias.view(1, -1, 1, 1)
        slot = self._slot()
        return nn.functional.batch_norm(
            x, self.running_mean[slot], self.running_var[slot], self.weight, self.bias, False, 0.0, self.eps
        )


class Conv4(nn.Module):
    """The 4-block convolutional network of MAML, Reptile and most few-shot papers.

    Each block: 3x3 convolution with `channels` filters, batch norm, ReLU, then downsampling by
    stride 2 (`downsample="stride"`, MAML's Omniglot network) or 2x2 max-pooling ("maxpool", MAML's
    miniImageNet network, with 32 filters). The features are averaged over space ("mean", MAML's
    Omniglot head) or flattened ("flatten", its miniImageNet head) and a linear layer gives the
    class scores.

    `init="pytorch"` keeps PyTorch's default initialisation; `init="reference"` is MAML's TensorFlow
    code's: Glorot-uniform convolutions, zero biases and a head drawn from N(0, 1), whose weights are
    about 14 times PyTorch's (with 64 features), which changes the size of the inner loop's steps.
    """

    #: an adapted copy (batch norm fixed) has an int8 form (`metalearn_cli.compression.quantization`)
    quantizable = True

    def __init__(
        self,
        input_shape: Sequence[int],
        out_features: int,
        channels: int = 64,
        blocks: int = 4,
        downsample: str = "stride",
        pool: str = "mean",
        bn: str = "transductive",
        bn_steps: int = 10,
        init: str = "pytorch",
    ) -> None:
        super().__init__()
        options.choice("init", init, CONV4_INITS)
        options.choice("downsample", downsample, ("stride", "maxpool"))
        options.choice("pool", pool, ("mean", "flatten"))
        options.choice("bn", bn, BN_MODES)
        options.integer("channels", channels, "filters per convolution")
        options.integer("bn_steps", bn_steps, "inner steps with their own batch-norm statistics (model.bn=per_step)")
        layers: list[nn.Module] = []
        in_channels = int(input_shape[0])
        for _ in range(blocks):
            stride = 2 if downsample == "stride" else 1
            layers += [
                nn.Conv2d(in_channels, channels, 3, stride=stride, padding=1),
                MetaBatchNorm2d(channels, bn, steps=bn_steps),
                nn.ReLU(),
            ]
            if downsample == "maxpool":
                layers.append(nn.MaxPool2d(2))
            in_channels = channels
        self.features = nn.Sequential(*layers)
        self.pool = pool
        with torch.no_grad():
            size = self._pool(self.features(torch.zeros(2, *input_shape))).shape[-1]
        self.head = nn.Linear(size, out_features)
        if init == "reference":
            for layer in self.features:
                if isinstance(layer, nn.Conv2d):
                    nn.init.xavier_uniform_(layer.weight)
                    nn.init.zeros_(layer.bias)
            nn.init.normal_(self.head.weight, 0.0, 1.0)
            nn.init.zeros_(self.head.bias)

    def _pool(self, h: torch.Tensor) -> torch.Tensor:
        return h.mean(dim=(-2, -1)) if self.pool == "mean" else h.flatten(1)

    def forward(self, x: torch.Tensor, features_only: bool = False) -> torch.Tensor:
        features = self._pool(self.features(x))
        return features if features_only else self.head(features)


class CosineClassifier(nn.Module):
    """Baseline++'s head (Chen et al. 2019): scale * cos(feature, class weight)."""

    def __init__(self, in_features: int, classes: int, scale: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(classes, in_features))
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        self.scale = scale

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return cosine_logits(features, self.weight, self.scale)


def cosine_logits(features: torch.Tensor, weight: torch.Tensor, scale: float) -> torch.Tensor:
    features = nn.functional.normalize(features, dim=-1, eps=1e-8)
    weight = nn.functional.normalize(weight, dim=-1, eps=1e-8)
    return scale * features @ weight.transpose(-1, -2)
