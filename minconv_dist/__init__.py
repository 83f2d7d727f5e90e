"""minconv_dist: minimal convolutional RNNs trained at scale on spatiotemporal data."""

__version__ = "0.1.0"
