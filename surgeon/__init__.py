"""surgeon: repair the safety alignment a language model lost in fine-tuning."""

__version__ = "0.1.0"
# The name on PyPI ("surgeon" there is an unrelated 2014 package); the command stays `surgeon`.
DISTRIBUTION = "alignment-surgeon"

__all__ = ["Recipe", "Result", "evaluate", "repair"]


def __getattr__(name: str):
    # the Python API (surgeon/api.py), imported when first used: `import surgeon` stays light
    if name in __all__:
        from surgeon import api

        return getattr(api, name)
    raise AttributeError(f"module 'surgeon' has no attribute '{name}'")
