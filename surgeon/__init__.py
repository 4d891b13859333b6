"""surgeon: repair the safety alignment a language model lost in fine-tuning."""

__version__ = "0.1.0"
# The name on PyPI ("surgeon" there is an unrelated 2014 package); the command stays `surgeon`.
DISTRIBUTION = "alignment-surgeon"
