"""Model zoo: every architecture is built from a ``ModelConfig`` through the registry."""

from vf_lightning.models import mlp, resnet, torchvision_adapters, vgg, vit  # noqa: F401  (registers models)
from vf_lightning.models.config import ModelConfig, available_models, build_model, register_model
from vf_lightning.models.init import apply_init
from vf_lightning.models.layers import ChannelLayerNorm, fast_memory_format
from vf_lightning.models.mlp import MLP
from vf_lightning.models.resnet import CifarResNet
from vf_lightning.models.torchvision_adapters import remap_torchvision_vgg_state_dict
from vf_lightning.models.vgg import VGG
from vf_lightning.models.vit import ViT

__all__ = [
    "MLP",
    "VGG",
    "ViT",
    "ChannelLayerNorm",
    "CifarResNet",
    "ModelConfig",
    "apply_init",
    "available_models",
    "build_model",
    "fast_memory_format",
    "register_model",
    "remap_torchvision_vgg_state_dict",
]
