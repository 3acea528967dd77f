"""The networks of Stable Diffusion: the UNet noise predictor and the VAE, in LDM's checkpoint names."""
from .unet import (SD2_INPAINT_UNET, SD15_INPAINT_UNET, SD15_UNET, SD21_UNET, SDXL_BASE_UNET, SDXL_INPAINT_UNET,
                   SDXL_REFINER_UNET, TINY_UNET, UNetConfig, UNetModel)
from .vae import SD_VAE, SDXL_VAE, TINY_VAE, VAE, DiagonalGaussian, VAEConfig

__all__ = ["UNetConfig", "UNetModel", "SD15_UNET", "SD21_UNET", "SD15_INPAINT_UNET", "SD2_INPAINT_UNET", "TINY_UNET",
           "SDXL_BASE_UNET", "SDXL_REFINER_UNET", "SDXL_INPAINT_UNET", "VAEConfig", "VAE", "DiagonalGaussian",
           "SD_VAE", "SDXL_VAE", "TINY_VAE"]
