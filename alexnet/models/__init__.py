"""The model zoo: the paper's AlexNet, its 32x32 sibling, and the four-layer CIFAR-10 net.

Every design choice under test (activation, norm, pool, dropout, init, towers, width,
remove_conv) is an argument resolved by a table of name -> factory (``layers.py``,
``weight_init.py``, ``registry.py``); ``build_model`` is the entry.
"""

from alexnet.models.alexnet import AlexNet
from alexnet.models.build import build_model
from alexnet.models.cifar import ConvNet4, alexnet_cifar
from alexnet.models.layers import (
    LocallyConnected2d,
    get_activation,
    get_norm,
    get_pool,
    paper_lrn,
)
from alexnet.models.registry import MODELS, build_model_from_config, input_size
from alexnet.models.summary import LayerRow, count_params, describe_model, render_table

__all__ = [
    "MODELS",
    "AlexNet",
    "ConvNet4",
    "LayerRow",
    "LocallyConnected2d",
    "alexnet_cifar",
    "build_model",
    "build_model_from_config",
    "count_params",
    "describe_model",
    "get_activation",
    "get_norm",
    "get_pool",
    "input_size",
    "paper_lrn",
    "render_table",
]
