"""glip-hf: GLIP (Gaussian, centre-biased patch masking for CLIP pre-training, arXiv 2403.15837) for transformers.

Importing the package registers ``"glip"`` with ``AutoConfig``, ``AutoModel`` and
``AutoModelForZeroShotImageClassification``, and the checkpoint conversion that lets ``GLIPVisionModel`` load a full
GLIP checkpoint.
"""

from transformers import AutoConfig, AutoModel, AutoModelForZeroShotImageClassification
from transformers.conversion_mapping import register_checkpoint_conversion_mapping
from transformers.core_model_loading import PrefixChange

from .configuration_glip import GLIPConfig, GLIPVisionConfig
from .hub import export_to_clip
from .masking import sample_keep_indices
from .modeling_glip import GLIPModel, GLIPVisionModel, GLIPVisionModelWithProjection, masked_inference

__version__ = "0.1.0"

AutoConfig.register(GLIPConfig.model_type, GLIPConfig, exist_ok=True)
AutoConfig.register(GLIPVisionConfig.model_type, GLIPVisionConfig, exist_ok=True)
AutoModel.register(GLIPConfig, GLIPModel, exist_ok=True)
AutoModel.register(GLIPVisionConfig, GLIPVisionModel, exist_ok=True)
AutoModelForZeroShotImageClassification.register(GLIPConfig, GLIPModel, exist_ok=True)
# As transformers does for CLIPVisionModel: a full GLIP checkpoint's `vision_model.*` weights load into the
# vision-only class (GLIPVisionModelWithProjection keeps the prefix, as CLIP's does).
register_checkpoint_conversion_mapping(
    "GLIPVisionModel", [PrefixChange(prefix_to_remove="vision_model")], overwrite=True
)

__all__ = [
    "GLIPConfig",
    "GLIPModel",
    "GLIPVisionConfig",
    "GLIPVisionModel",
    "GLIPVisionModelWithProjection",
    "export_to_clip",
    "masked_inference",
    "sample_keep_indices",
]
