"""Models: the three Min cells, the ConvLSTM/ConvGRU baselines, the network, the official importer.

Models hold no state between calls and know nothing of Ray, DeepSpeed, MLflow or xarray.
"""
from minconv_dist.models.baselines import ConvGRUCell, ConvLSTMCell
from minconv_dist.models.io import load_checkpoint, save_checkpoint
from minconv_dist.models.min_cells import DEFAULT_H0, MinConvCell
from minconv_dist.models.network import Network
from minconv_dist.models.official import from_official_checkpoint, to_official_state_dict
from minconv_dist.models.padding import PADDINGS, PaddedConv2d, pad
from minconv_dist.models.registry import ARCHS, build_model

__all__ = [
    "ARCHS", "DEFAULT_H0", "PADDINGS", "ConvGRUCell", "ConvLSTMCell", "MinConvCell", "Network",
    "PaddedConv2d", "build_model", "from_official_checkpoint", "load_checkpoint", "pad", "save_checkpoint",
    "to_official_state_dict",
]
