"""featpipe's local torch.hub directory: models that need no download.

The weights are RANDOM (seeded, so the same on every machine). The features mean nothing for
retrieval; these entries exist so the demo, the tests and the benchmarks run offline on the real
code path. For real features use `--model-repo facebookresearch/dinov2` (downloads once into
TORCH_HOME) or a local checkout of it, or pass `--weights FILE`.
"""

dependencies = ["torch", "torchvision"]

import torch
from torch import nn


def _seeded(build, seed: int) -> nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build()


def _vit(depth: int, dim: int, heads: int, seed: int) -> nn.Module:
    from torchvision.models.vision_transformer import VisionTransformer

    def build():
        m = VisionTransformer(image_size=224, patch_size=14, num_layers=depth, num_heads=heads, hidden_dim=dim,
                              mlp_dim=4 * dim)
        m.heads = nn.Identity()  # the CLS token is the feature, as in DINOv2
        return m

    return _seeded(build, seed)


def vit_small_p14(pretrained: bool = False, seed: int = 0) -> nn.Module:
    """ViT-S/14 shape (DINOv2 dinov2_vits14: 12 blocks, 384 dims, 6 heads), 224 px input, random weights."""
    return _vit(12, 384, 6, seed)


def vit_tiny_p14(pretrained: bool = False, seed: int = 0) -> nn.Module:
    """A 4-block, 192-dim ViT with 14 px patches, 224 px input, random weights: cheap on a CPU."""
    return _vit(4, 192, 3, seed)


def resnet18(pretrained: bool = False, seed: int = 0) -> nn.Module:
    """torchvision's ResNet-18 with random weights; 512-dim pooled features."""
    from torchvision.models import resnet18 as build

    def make():
        m = build(weights=None)
        m.fc = nn.Identity()
        return m

    return _seeded(make, seed)


def tiny_cnn(pretrained: bool = False, seed: int = 0, dim: int = 64) -> nn.Module:
    """Three strided convolutions and a pool: so cheap that the data path decides the speed."""

    def build():
        return nn.Sequential(
            nn.Conv2d(3, 16, 5, stride=4, padding=2), nn.ReLU(),
            nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.ReLU(),
            nn.Conv2d(32, dim, 3, stride=2, padding=1), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten())

    return _seeded(build, seed)
