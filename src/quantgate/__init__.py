"""quantgate: compress a language model and prove, on your own eval set, what it cost."""

__version__ = "0.1.0"
