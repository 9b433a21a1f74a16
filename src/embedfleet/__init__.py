"""embedfleet: self-hosted text-embedding serving."""

__version__ = "0.1.0"
__all__ = ["__version__"]
