"""m3el: M3EL (Multi-level Matching Network for Multimodal Entity Linking) for the Hugging Face ecosystem.

Importing the package registers M3EL with the Auto classes, and marks the classes so that `save_pretrained`
writes the Hub code next to the weights (`auto_map`), for `trust_remote_code=True` loading without this package.
"""

from transformers import AutoConfig, AutoModel, AutoProcessor

from .configuration_m3el import M3ELConfig
from .modeling_m3el import M3ELFeatures, M3ELModel, M3ELOutput, M3ELPreTrainedModel, M3ELScores
from .processing_m3el import M3ELProcessor

AutoConfig.register(M3ELConfig.model_type, M3ELConfig, exist_ok=True)
AutoModel.register(M3ELConfig, M3ELModel, exist_ok=True)
AutoProcessor.register(M3ELConfig, M3ELProcessor, exist_ok=True)
M3ELConfig.register_for_auto_class()
M3ELModel.register_for_auto_class("AutoModel")
M3ELProcessor.register_for_auto_class("AutoProcessor")

__all__ = [
    "M3ELConfig",
    "M3ELFeatures",
    "M3ELModel",
    "M3ELOutput",
    "M3ELPreTrainedModel",
    "M3ELProcessor",
    "M3ELScores",
]
