"""Networks: the denoising UNet, the attribute embedding, the codecs (pixels, or a latent autoencoder) and the
autoencoder's discriminator."""
from .codec import Codec, PixelCodec
from .unet import UNet, UNetConfig, count_parameters, timestep_embedding

__all__ = ["Codec", "PixelCodec", "UNet", "UNetConfig", "count_parameters", "timestep_embedding"]
