"""diffusion_core: Stable Diffusion from first principles in readable PyTorch, proven equal to diffusers.

    from diffusion_core import DiffusionModel, GenerationConfig
    model = DiffusionModel.from_pretrained("v1-5-pruned-emaonly.safetensors")
    model.generate(GenerationConfig("a red circle on a blue background", seed=0)).image.save("out.png")
"""
from .control import ControlInput
from .generation import GeneratedImage, GenerationConfig
from .models.controlnet import ControlNetModel
from .models.t2i_adapter import T2IAdapter
from .pipeline import DiffusionModel
from .schedulers import SamplerType, make_scheduler

__all__ = ["ControlInput", "ControlNetModel", "DiffusionModel", "GenerationConfig", "GeneratedImage", "SamplerType",
           "T2IAdapter", "make_scheduler"]
