"""Model zoo of the training command: softmax regression, an MLP, a small CNN, a CIFAR-style
ResNet-18 and a small decoder-only character transformer.

The image models take images shaped ``(N, C, H, W)`` (tabular data such as scikit-learn's
digits is fed as ``(N, 1, 8, 8)``) and return logits shaped ``(N, num_classes)``; the
transformer takes int64 tokens ``(N, L)`` and returns next-token logits ``(N, L, vocab)``.
Parameters are
initialised with PyTorch's default initialisers, which draw from the global RNG, so
``torch.manual_seed(s)`` before :func:`build_model` gives the same weights on every rank and
every run. torchvision is deliberately not a dependency; the ResNet is written out here.

Note for distributed training: :class:`ResNet18` uses ``BatchNorm2d``, whose batch statistics
are computed on the *local* shard, so a p-rank run is not bit-comparable with a 1-rank run of
the same global batch (the MLP and CNN have no such layer and are).
"""

from __future__ import annotations

import inspect
import logging
import operator
from collections.abc import Callable

import torch
from torch import nn

logger = logging.getLogger(__name__)

MODEL_NAMES: tuple[str, ...] = ("linear", "mlp", "cnn", "resnet18", "transformer")
#: Models that read token sequences ``(N, L)`` and predict every next token.
SEQUENCE_MODELS: tuple[str, ...] = ("transformer",)


def _check_in_shape(in_shape: tuple[int, int, int], *, min_side: int = 1) -> tuple[int, int, int]:
    """Validate ``in_shape`` = (channels, height, width) and return it as a tuple of ints."""
    try:
        # operator.index accepts numpy/torch integer scalars and rejects floats.
        channels, height, width = (operator.index(v) for v in in_shape)
    except (TypeError, ValueError):
        raise ValueError(
            f"in_shape must be a (channels, height, width) tuple of ints, got {in_shape!r}"
        ) from None
    if channels < 1:
        raise ValueError(f"in_shape channels must be >= 1, got {channels}")
    if height < min_side or width < min_side:
        raise ValueError(
            f"in_shape height and width must be >= {min_side} for this model, got {height}x{width}"
        )
    return (channels, height, width)


def _check_positive_int(value: int, name: str) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}")


class LinearClassifier(nn.Module):
    """Softmax (multinomial logistic) regression: flatten -> one Linear layer.

    With the cross-entropy loss the training objective is convex in the parameters, which
    makes it the model on which quasi-Newton curvature has the least excuse not to pay:
    BENCHMARKS.md §9.15 uses it (full batch, Fashion-MNIST) as a held-out task.

    Args:
        in_shape: input shape (channels, height, width); flattened to C*H*W features.
        num_classes: number of output logits (>= 1).
    """

    def __init__(self, *, in_shape: tuple[int, int, int], num_classes: int) -> None:
        super().__init__()
        channels, height, width = _check_in_shape(in_shape)
        _check_positive_int(num_classes, "num_classes")
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(channels * height * width, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return logits ``(N, num_classes)`` for images ``(N, C, H, W)``."""
        return self.net(x)


class MLP(nn.Module):
    """Fully connected classifier: flatten -> (Linear -> ReLU) per hidden size -> Linear.

    Args:
        in_shape: input shape (channels, height, width); flattened to C*H*W features.
        num_classes: number of output logits (>= 1).
        hidden_sizes: widths of the hidden layers, each >= 1 (default (256, 128)).
    """

    def __init__(
        self,
        *,
        in_shape: tuple[int, int, int],
        num_classes: int,
        hidden_sizes: tuple[int, ...] = (256, 128),
    ) -> None:
        super().__init__()
        channels, height, width = _check_in_shape(in_shape)
        _check_positive_int(num_classes, "num_classes")
        if len(hidden_sizes) == 0:
            raise ValueError("hidden_sizes must contain at least one width")
        for i, size in enumerate(hidden_sizes):
            _check_positive_int(size, f"hidden_sizes[{i}]")
        layers: list[nn.Module] = [nn.Flatten()]
        features = channels * height * width
        for size in hidden_sizes:
            layers += [nn.Linear(features, size), nn.ReLU(inplace=True)]
            features = size
        layers.append(nn.Linear(features, num_classes))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return logits ``(N, num_classes)`` for images ``(N, C, H, W)``."""
        return self.net(x)


class SmallCNN(nn.Module):
    """Two conv/ReLU/max-pool stages, then two linear layers.

    Sized for Fashion-MNIST on a couple of CPU cores: 421,642 parameters for 1x28x28 inputs,
    about 30 s per epoch on 2 cores, ~90 % test accuracy after a few epochs. By default the
    classifier sees the whole ``channels[1] x H/4 x W/4`` feature map (7x7 for 28x28 inputs):
    an adaptive average pool down to 4x4 was tried and cost ~6 points of accuracy after two
    epochs. ``pool_size`` adds that pool back, to bound the classifier for large images.

    Args:
        in_shape: input shape (channels, height, width); height and width must be >= 4 (two
            2x2 max-pools).
        num_classes: number of output logits (>= 1).
        channels: output channels of the two 3x3 convolutions, each >= 1 (default (32, 64)).
        pool_size: if given (>= 1), adaptive-average-pool the feature map to
            ``pool_size x pool_size`` before the classifier; default None (no pool).
        hidden_size: width of the hidden linear layer, >= 1 (default 128).
    """

    def __init__(
        self,
        *,
        in_shape: tuple[int, int, int],
        num_classes: int,
        channels: tuple[int, int] = (32, 64),
        pool_size: int | None = None,
        hidden_size: int = 128,
    ) -> None:
        super().__init__()
        in_channels, height, width = _check_in_shape(in_shape, min_side=4)
        _check_positive_int(num_classes, "num_classes")
        if len(channels) != 2:
            raise ValueError(f"channels must hold exactly 2 widths, got {channels!r}")
        for i, size in enumerate(channels):
            _check_positive_int(size, f"channels[{i}]")
        if pool_size is not None:
            _check_positive_int(pool_size, "pool_size")
        _check_positive_int(hidden_size, "hidden_size")
        c1, c2 = channels
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, c1, kernel_size=3, padding=1),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
            nn.Conv2d(c1, c2, kernel_size=3, padding=1),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
        )
        if pool_size is None:
            # MaxPool2d floors: 28 -> 14 -> 7, 8 -> 4 -> 2, 9 -> 4 -> 2.
            map_h, map_w = height // 4, width // 4
        else:
            self.features.append(nn.AdaptiveAvgPool2d(pool_size))
            map_h = map_w = pool_size
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(c2 * map_h * map_w, hidden_size),
            nn.ReLU(inplace=True),
            nn.Linear(hidden_size, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return logits ``(N, num_classes)`` for images ``(N, C, H, W)``."""
        return self.classifier(self.features(x))


class BasicBlock(nn.Module):
    """ResNet basic block: two 3x3 conv/BN layers plus an identity or 1x1-projection shortcut.

    Args:
        in_planes: input channels (>= 1).
        planes: output channels (>= 1).
        stride: stride of the first convolution and of the projection (1 or 2).
    """

    def __init__(self, *, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        _check_positive_int(in_planes, "in_planes")
        _check_positive_int(planes, "planes")
        if stride not in (1, 2):
            raise ValueError(f"stride must be 1 or 2, got {stride!r}")
        # bias=False: the following BatchNorm's shift makes a conv bias redundant.
        self.conv1 = nn.Conv2d(in_planes, planes, kernel_size=3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, kernel_size=3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut: nn.Module
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_planes, planes, kernel_size=1, stride=stride, bias=False),
                nn.BatchNorm2d(planes),
            )
        else:
            self.shortcut = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Apply the block."""
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return torch.relu(out + self.shortcut(x))


class ResNet18(nn.Module):
    """CIFAR-style ResNet-18 (He et al. 2016, as used for CIFAR-10 in the mL-BFGS paper).

    3x3 stride-1 stem conv (no 7x7 conv, no max-pool, so small images keep their resolution),
    four stages of two :class:`BasicBlock` each with widths ``width * (1, 2, 4, 8)`` and
    strides (1, 2, 2, 2), global average pool, one linear layer. With ``width=64``, 3 input
    channels and 10 classes it has 11,173,962 parameters.

    Args:
        in_shape: input shape (channels, height, width); the stem takes ``channels`` inputs.
        num_classes: number of output logits (>= 1).
        width: channels of the stem and first stage, >= 1 (default 64; tests use small ones).
    """

    def __init__(self, *, in_shape: tuple[int, int, int], num_classes: int, width: int = 64) -> None:
        super().__init__()
        in_channels, _, _ = _check_in_shape(in_shape)
        _check_positive_int(num_classes, "num_classes")
        _check_positive_int(width, "width")
        self.conv1 = nn.Conv2d(in_channels, width, kernel_size=3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        stages: list[nn.Module] = []
        in_planes = width
        for multiplier, stride in ((1, 1), (2, 2), (4, 2), (8, 2)):
            planes = width * multiplier
            stages.append(
                nn.Sequential(
                    BasicBlock(in_planes=in_planes, planes=planes, stride=stride),
                    BasicBlock(in_planes=planes, planes=planes, stride=1),
                )
            )
            in_planes = planes
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(in_planes, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return logits ``(N, num_classes)`` for images ``(N, C, H, W)``."""
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        return self.fc(torch.flatten(self.pool(out), 1))


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention (``F.scaled_dot_product_attention``, is_causal).

    Args:
        width: model width d (>= 1), divisible by ``heads``.
        heads: number of attention heads (>= 1).
    """

    def __init__(self, *, width: int, heads: int) -> None:
        super().__init__()
        _check_positive_int(width, "width")
        _check_positive_int(heads, "heads")
        if width % heads:
            raise ValueError(f"width ({width}) must be divisible by heads ({heads})")
        self.heads = heads
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(N, L, d)`` → ``(N, L, d)``; position i attends to positions ≤ i."""
        n, length, width = x.shape
        q, k, v = self.qkv(x).view(n, length, 3, self.heads, width // self.heads).unbind(2)
        out = torch.nn.functional.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True)
        return self.proj(out.transpose(1, 2).reshape(n, length, width))


class TransformerLayer(nn.Module):
    """Pre-LayerNorm decoder layer: ``x + attn(ln(x))``, then ``x + mlp(ln(x))`` (GELU, 4×)."""

    def __init__(self, *, width: int, heads: int) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(width)
        self.attn = CausalSelfAttention(width=width, heads=heads)
        self.ln2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(),
                                 nn.Linear(4 * width, width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Apply the layer to ``(N, L, d)``."""
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class CharTransformer(nn.Module):
    """Small decoder-only (GPT-style) character language model.

    Token and learned position embeddings, ``depth`` pre-LN :class:`TransformerLayer` s, a
    final LayerNorm and a linear head to the vocabulary. Embeddings start at N(0, 0.02²) as
    in GPT-2 (PyTorch's N(0, 1) default would dwarf the LayerNorm'd residual stream); the
    linear layers keep PyTorch's defaults. With the defaults (width 64, depth 4, context 64,
    vocabulary 128) it has 220,672 parameters in 28 layers (blocks).

    Args:
        in_shape: ``(L,)``: the context length (tokens per sample), >= 1.
        num_classes: vocabulary size (>= 1); inputs are token ids in ``[0, num_classes)``.
        width: model width d (>= 1, divisible by ``heads``).
        depth: number of decoder layers (>= 1).
        heads: attention heads per layer (>= 1).
    """

    def __init__(self, *, in_shape: tuple[int, ...], num_classes: int, width: int = 64,
                 depth: int = 4, heads: int = 4) -> None:
        super().__init__()
        if len(tuple(in_shape)) != 1:
            raise ValueError(f"in_shape must be (context_length,) for the transformer, got "
                             f"{in_shape!r}")
        context = operator.index(tuple(in_shape)[0])
        _check_positive_int(context, "in_shape[0] (context length)")
        _check_positive_int(num_classes, "num_classes")
        _check_positive_int(depth, "depth")
        self.tok_emb = nn.Embedding(num_classes, width)
        self.pos_emb = nn.Embedding(context, width)
        nn.init.normal_(self.tok_emb.weight, std=0.02)
        nn.init.normal_(self.pos_emb.weight, std=0.02)
        self.layers = nn.Sequential(*(TransformerLayer(width=width, heads=heads)
                                      for _ in range(depth)))
        self.ln_f = nn.LayerNorm(width)
        self.head = nn.Linear(width, num_classes)
        self.register_buffer("positions", torch.arange(context), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return next-token logits ``(N, L, num_classes)`` for int64 tokens ``(N, L)``."""
        h = self.tok_emb(x) + self.pos_emb(self.positions[:x.shape[1]])
        return self.head(self.ln_f(self.layers(h)))


_BUILDERS: dict[str, Callable[..., nn.Module]] = {
    "linear": LinearClassifier,
    "mlp": MLP,
    "cnn": SmallCNN,
    "resnet18": ResNet18,
    "transformer": CharTransformer,
}


def build_model(
    name: str, *, in_shape: tuple[int, int, int], num_classes: int, **options: object
) -> nn.Module:
    """Build model ``name`` for inputs ``in_shape`` and ``num_classes`` outputs.

    Call ``torch.manual_seed(seed)`` first for a reproducible initialisation.

    Args:
        name: one of :data:`MODEL_NAMES`.
        in_shape: input shape, e.g. ``DatasetSplit.in_shape``: (channels, height, width) for
            the image models, (context length,) for the transformer.
        num_classes: number of output logits (>= 1).
        **options: model-specific keywords: ``hidden_sizes`` (mlp); ``channels``,
            ``pool_size``, ``hidden_size`` (cnn); ``width`` (resnet18); ``width``,
            ``depth``, ``heads`` (transformer).

    Returns:
        The model, in training mode, on the CPU, in float32.

    Raises:
        ValueError: unknown ``name``, an option the model does not take, or a bad value.
    """
    if name not in _BUILDERS:
        raise ValueError(f"name must be one of {MODEL_NAMES}, got {name!r}")
    builder = _BUILDERS[name]
    accepted = set(inspect.signature(builder).parameters) - {"in_shape", "num_classes"}
    unknown = sorted(set(options) - accepted)
    if unknown:
        raise ValueError(
            f"model {name!r} does not take option(s) {unknown}; allowed: {sorted(accepted)}"
        )
    # Every builder validates its own in_shape: (C, H, W) for images, (L,) for tokens.
    model = builder(in_shape=tuple(in_shape), num_classes=num_classes, **options)
    n_params = count_parameters(model)
    logger.debug("built %s for in_shape=%s, %d classes: %d parameters (%.2f M)",
                 name, tuple(in_shape), num_classes, n_params, n_params / 1e6)
    return model


def count_parameters(model: nn.Module) -> int:
    """Number of scalar parameters of ``model`` (trainable or not; buffers excluded)."""
    return sum(p.numel() for p in model.parameters())
