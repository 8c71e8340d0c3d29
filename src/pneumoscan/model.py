"""Neural networks for chest X-ray classification and the ``build_model`` factory.

``MedicalCNN`` is the seed architecture, kept exactly: five blocks of
(Conv3x3-BN-ReLU) x 2 + MaxPool, global average pooling, FC 512->256 + ReLU +
Dropout(0.5), FC 256->2, Xavier-uniform initialisation. The other architectures
are the seed's customisation points (residual connections, squeeze-and-excitation
attention) and share its blocks so that they stay comparable.
"""

from __future__ import annotations

import torch
from torch import nn

SEED_WIDTHS = (32, 64, 128, 256, 512)


class SqueezeExcitation(nn.Module):
    """Channel attention (Hu et al. 2018): rescales channels by a learned gate."""

    def __init__(self, channels: int, reduction: int = 16) -> None:
        super().__init__()
        hidden = max(channels // reduction, 8)
        self.fc1 = nn.Conv2d(channels, hidden, kernel_size=1)
        self.fc2 = nn.Conv2d(hidden, channels, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate = x.mean(dim=(2, 3), keepdim=True)
        gate = torch.sigmoid(self.fc2(torch.relu(self.fc1(gate))))
        return x * gate


class ConvBlock(nn.Module):
    """(Conv3x3-BN-ReLU) x 2, optional SE attention and residual shortcut, then MaxPool 2x2."""

    def __init__(self, in_ch: int, out_ch: int, residual: bool = False, attention: bool = False):
        super().__init__()
        self.conv1 = nn.Conv2d(in_ch, out_ch, kernel_size=3, padding=1)
        self.bn1 = nn.BatchNorm2d(out_ch)
        self.conv2 = nn.Conv2d(out_ch, out_ch, kernel_size=3, padding=1)
        self.bn2 = nn.BatchNorm2d(out_ch)
        self.se = SqueezeExcitation(out_ch) if attention else None
        self.shortcut = None
        if residual:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_ch, out_ch, kernel_size=1, bias=False), nn.BatchNorm2d(out_ch)
            )
        self.pool = nn.MaxPool2d(2, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        if self.se is not None:
            out = self.se(out)
        if self.shortcut is not None:
            out = out + self.shortcut(x)
        return self.pool(torch.relu(out))


class MedicalCNN(nn.Module):
    """The seed's CNN; ``residual``/``attention`` turn on the customisation points.

    Args:
        in_channels: 1 (grayscale) or 3 (grayscale replicated, the seed's input).
        num_classes: output logits (2: NORMAL, PNEUMONIA).
        widths: channels of the five blocks.
        dropout: dropout before the last layer.
    """

    def __init__(
        self,
        in_channels: int = 3,
        num_classes: int = 2,
        widths: tuple[int, ...] = SEED_WIDTHS,
        dropout: float = 0.5,
        residual: bool = False,
        attention: bool = False,
    ) -> None:
        super().__init__()
        if in_channels not in (1, 3):
            raise ValueError(f"in_channels must be 1 or 3, got {in_channels}")
        chans = (in_channels, *widths)
        self.features = nn.Sequential(
            *[ConvBlock(chans[i], chans[i + 1], residual, attention) for i in range(len(widths))]
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc1 = nn.Linear(widths[-1], 256)
        self.dropout = nn.Dropout(dropout)
        self.fc2 = nn.Linear(256, num_classes)
        self._initialize_weights()

    def _initialize_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Pooled features (N, widths[-1]) before the classifier head."""
        return torch.flatten(self.pool(self.features(x)), 1)

    def forward_with_features(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Logits and every block's output averaged over space ((N, widths[i]) each; the last is ``embed``)."""
        pooled = []
        for block in self.features:
            x = block(x)
            pooled.append(x.mean(dim=(2, 3)))
        return self.head(pooled[-1]), pooled

    def head(self, features: torch.Tensor) -> torch.Tensor:
        """Logits from pooled features (the classifier after global average pooling)."""
        return self.fc2(self.dropout(torch.relu(self.fc1(features))))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.embed(x))


ARCHITECTURES = {
    "medical_cnn": {},
    "medical_cnn_res": {"residual": True},
    "medical_cnn_se": {"attention": True},
    "medical_cnn_res_se": {"residual": True, "attention": True},
}


def model_kwargs(arch: str, in_channels: int, width: float = 1.0, dropout: float = 0.5) -> dict:
    """The constructor arguments for ``arch``; stored in checkpoints to rebuild the model."""
    if arch not in ARCHITECTURES:
        raise ValueError(f"unknown arch {arch!r}; choose one of {', '.join(ARCHITECTURES)}")
    widths = tuple(max(8, round(w * width)) for w in SEED_WIDTHS)
    return {"in_channels": in_channels, "num_classes": 2, "widths": list(widths),
            "dropout": dropout, **ARCHITECTURES[arch]}


def build_model(cfg) -> MedicalCNN:
    """Build the network a config names (``cfg.arch``, ``cfg.in_channels``, ``cfg.width``, ``cfg.dropout``)."""
    return model_from_kwargs(model_kwargs(cfg.arch, cfg.in_channels, cfg.width, cfg.dropout))


class Ensemble(nn.Module):
    """Several MedicalCNNs on one input; their logits are averaged.

    Each member was trained with its own input normalisation, so the ensemble takes the
    un-normalised input (grayscale in [0, 1], replicated to the channels; its ``InputSpec`` has
    mean 0 and std 1) and normalises it per member. Pooled block features are the members'
    features side by side, block by block, so the gate and the scope classifier see all of them.

    Args:
        members: each member's ``model_kwargs``.
        norms: each member's (mean, std) input normalisation.
    """

    def __init__(self, members: list[dict], norms: list[list[float]]) -> None:
        super().__init__()
        if not members or len(members) != len(norms):
            raise ValueError(f"an ensemble needs one (mean, std) per member; got {len(members)} member(s) "
                             f"and {len(norms)} normalisation(s)")
        self.members = nn.ModuleList(model_from_kwargs(kw) for kw in members)
        self.model_kwargs = ensemble_kwargs(members, norms)  # what a checkpoint stores to rebuild it
        stats = torch.tensor([[float(m), float(sd)] for m, sd in norms])
        if not bool((stats[:, 1] > 0).all()):
            raise ValueError(f"member normalisation std must be positive, got {norms}")
        self.register_buffer("norm_mean", stats[:, 0].clone())
        self.register_buffer("norm_std", stats[:, 1].clone())

    def member_inputs(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The ensemble input normalised for each member."""
        return [(x - self.norm_mean[i]) / self.norm_std[i] for i in range(len(self.members))]

    def forward_with_features(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        outs = [m.forward_with_features(xi) for m, xi in zip(self.members, self.member_inputs(x))]
        logits = torch.stack([lg for lg, _ in outs]).mean(0)
        pooled = [torch.cat(per_block, 1) for per_block in zip(*(p for _, p in outs))]
        return logits, pooled

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([m.embed(xi) for m, xi in zip(self.members, self.member_inputs(x))], 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.stack([m(xi) for m, xi in zip(self.members, self.member_inputs(x))]).mean(0)


def ensemble_kwargs(members: list[dict], norms: list[list[float]]) -> dict:
    """The ``model_kwargs`` of an ensemble: its members' kwargs and normalisations, and the
    combined block widths (what the pooled features of each block hold)."""
    widths = [sum(int(kw["widths"][b]) for kw in members) for b in range(len(members[0]["widths"]))]
    return {"ensemble": [dict(kw) for kw in members], "norms": [[float(m), float(s)] for m, s in norms],
            "in_channels": int(members[0]["in_channels"]), "num_classes": 2, "widths": widths}


def model_from_kwargs(kwargs: dict) -> MedicalCNN | Ensemble:
    """Rebuild a network (or an ensemble of them) from the ``model_kwargs`` stored in a checkpoint."""
    if "ensemble" in kwargs:
        return Ensemble(kwargs["ensemble"], kwargs["norms"])
    kw = dict(kwargs)
    kw["widths"] = tuple(kw["widths"])
    return MedicalCNN(**kw)
