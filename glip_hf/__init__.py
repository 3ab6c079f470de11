"""glip-hf: GLIP (Gaussian, centre-biased patch masking for CLIP pre-training, arXiv 2403.15837) for transformers.

Importing the package registers ``"glip"`` with ``AutoConfig``, ``AutoModel`` and
``AutoModelForZeroShotImageClassification``.
"""

from transformers import AutoConfig, AutoModel, AutoModelForZeroShotImageClassification

from .configuration_glip import GLIPConfig, GLIPVisionConfig
from .hub import export_to_clip
from .masking import sample_keep_indices
from .modeling_glip import GLIPModel, GLIPVisionModel, masked_inference

__version__ = "0.1.0"

AutoConfig.register(GLIPConfig.model_type, GLIPConfig, exist_ok=True)
AutoConfig.register(GLIPVisionConfig.model_type, GLIPVisionConfig, exist_ok=True)
AutoModel.register(GLIPConfig, GLIPModel, exist_ok=True)
AutoModel.register(GLIPVisionConfig, GLIPVisionModel, exist_ok=True)
AutoModelForZeroShotImageClassification.register(GLIPConfig, GLIPModel, exist_ok=True)

__all__ = [
    "GLIPConfig",
    "GLIPModel",
    "GLIPVisionConfig",
    "GLIPVisionModel",
    "export_to_clip",
    "masked_inference",
    "sample_keep_indices",
]
