"""Models: the three Min cells, the ConvLSTM/ConvGRU baselines, the network (with its normaliser), the model
file, the official importer.

Models hold no state between calls and know nothing of Ray, DeepSpeed, MLflow or xarray.
"""
from minconv_dist.models.baselines import ConvGRUCell, ConvLSTMCell
from minconv_dist.models.compare import WeightDifference, check_weights, weight_differences
from minconv_dist.models.min_cells import DEFAULT_H0, MinConvCell
from minconv_dist.models.model_file import load_model_file, save_model_file
from minconv_dist.models.network import NORMS, PREDICTS, Network
from minconv_dist.models.normalizer import Normalizer, StaticFields, TendencyNormalizer
from minconv_dist.models.official import from_official_checkpoint, to_official_state_dict
from minconv_dist.models.padding import PADDINGS, PaddedConv2d, pad
from minconv_dist.models.registry import ARCHS, SEQUENTIAL_ARCHS, build_model

__all__ = [
    "ARCHS", "DEFAULT_H0", "NORMS", "PADDINGS", "PREDICTS", "ConvGRUCell", "ConvLSTMCell", "MinConvCell", "Network",
    "Normalizer", "PaddedConv2d", "SEQUENTIAL_ARCHS", "StaticFields", "TendencyNormalizer", "WeightDifference", "build_model",
    "check_weights", "from_official_checkpoint", "load_model_file", "pad", "save_model_file", "to_official_state_dict",
    "weight_differences",
]
