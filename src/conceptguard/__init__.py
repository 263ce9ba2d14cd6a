"""conceptguard: erase, immunize, guard and red-team concepts in text-to-image diffusion models."""

__version__ = "0.1.0"

from conceptguard.errors import ConceptGuardError  # noqa: E402

__all__ = ["ConceptGuardError", "__version__"]
