"""cai-factory: a Constitutional AI / RLAIF data factory."""

__version__ = "0.1.0"
