"""Small networks of the embedded priors: a time-conditioned UNet and the TAESD tiny autoencoder."""

from .taesd import TinyDecoder, TinyEncoder, load_taesd
from .unet import SmallUNet

__all__ = ["SmallUNet", "TinyEncoder", "TinyDecoder", "load_taesd"]
