"""diffusion_core: Stable Diffusion from first principles in readable PyTorch, proven equal to diffusers.

    from diffusion_core import DiffusionModel, GenerationConfig
    model = DiffusionModel.from_pretrained("v1-5-pruned-emaonly.safetensors")
    model.generate(GenerationConfig("a red circle on a blue background", seed=0)).image.save("out.png")
"""
from .generation import GeneratedImage, GenerationConfig
from .pipeline import DiffusionModel
from .schedulers import SamplerType, make_scheduler

__all__ = ["DiffusionModel", "GenerationConfig", "GeneratedImage", "SamplerType", "make_scheduler"]
