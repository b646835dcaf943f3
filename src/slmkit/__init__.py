"""slmkit: a workbench for small language models."""

from .api import LM, load  # noqa: E402
from .config import ModelConfig  # noqa: E402
from .errors import SlmError  # noqa: E402

__all__ = ["LM", "ModelConfig", "SlmError", "load"]
__version__ = "0.1.0"
