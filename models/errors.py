"""Errors a user can act on. Each message names the bad value, what was expected and the next step."""

from __future__ import annotations


class BackbonesError(Exception):
    """Base class for every error the project raises on purpose (never a bug)."""


class UnknownModelError(BackbonesError, LookupError):
    """A model name, version or alias that is neither registered nor in the catalog."""


class WeightsUnavailableError(BackbonesError):
    """Pretrained weights are neither cached nor downloadable (for example, offline)."""


class ExportError(BackbonesError):
    """Export or its verification failed; nothing was registered."""


class RegistryError(BackbonesError):
    """A registry operation was refused (bad name, immutable version, alias in use...)."""


class IntegrityError(RegistryError):
    """A stored file does not match the checksum recorded when its version was registered."""


class ArtifactError(RegistryError):
    """An ONNX file refused before it is stored or served: external data, the wrong inputs or
    outputs, a graph ONNX Runtime cannot load or run, or one that crashes or hangs it."""


# Every way an input image can be unusable; the HTTP service maps each to a 4xx status.
IMAGE_ERROR_KINDS = frozenset({"empty", "undecodable", "unsupported_format", "too_large"})


class ImageError(BackbonesError, ValueError):
    """An input image that cannot be used.

    ``kind`` tells callers (the HTTP service maps it to a status code) what went wrong:
    ``empty``, ``undecodable``, ``unsupported_format`` or ``too_large``.
    """

    def __init__(self, message: str, *, kind: str) -> None:
        super().__init__(message)
        self.kind = kind


class ConversionError(ExportError):
    """An INT8 or FP16 conversion failed its accuracy gate or could not be made; nothing was registered."""
