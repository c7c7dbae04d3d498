from ._cfg import CIFAR10_LABELS, IMAGENET_MEAN, IMAGENET_STD, DeployCfg
from ._registry import create_model, get_deploy_cfg, list_models, register_model

__all__ = [
    "DeployCfg", "CIFAR10_LABELS", "IMAGENET_MEAN", "IMAGENET_STD",
    "create_model", "get_deploy_cfg", "list_models", "register_model",
]
