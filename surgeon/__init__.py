"""surgeon: repair the safety alignment a language model lost in fine-tuning."""

__version__ = "0.1.0"
