"""selfreward: align small language models with online AI feedback."""

__version__ = "0.1.0"
