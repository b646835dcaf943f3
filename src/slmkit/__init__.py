"""slmkit: a workbench for small language models."""

from .api import LM, load
from .config import ModelConfig
from .errors import SlmError

__all__ = ["LM", "ModelConfig", "SlmError", "load"]
__version__ = "0.1.0"
