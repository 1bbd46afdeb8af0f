"""The Kimi Linear model: configuration, layers, release-layout checkpoints and size summaries."""

from kimitune.model.configuration import KimiLinearConfig, ModelConfigError
from kimitune.model.modeling import KimiLinearCache, KimiLinearForCausalLM, KimiLinearOutput
from kimitune.model.options import RunOptions

__all__ = ["KimiLinearCache", "KimiLinearConfig", "KimiLinearForCausalLM", "KimiLinearOutput", "ModelConfigError",
           "RunOptions"]
