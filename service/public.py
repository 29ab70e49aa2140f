"""What the service tells clients about itself: enough to use it, nothing about the machine.

``/models``, ``/readyz`` and every error body carry names, versions, aliases, labels,
preprocessing, feature sizes, precision and readiness. They never carry file-system paths, URLs
(which name hosts and buckets), run folders or stack text: a model's full spec, with its lineage,
training data and files, stays in ``backbones models show``. Error texts that come from deeper
layers (a registry error, ONNX Runtime's message) pass through :func:`redact` first.
"""

from __future__ import annotations

import re
from typing import Any

from models.spec import VersionSpec

# a URL (scheme://...), a Windows path (C:\...), or a token starting with / ~/ ./ ../ (not a/b,
# so media types such as multipart/form-data and image/jpeg stay)
_URL = re.compile(r"\b[A-Za-z][A-Za-z0-9+.-]*://[^\s'\"<>]*")
_WINDOWS_PATH = re.compile(r"\b[A-Za-z]:\\[^\s'\"<>]*")
_POSIX_PATH = re.compile(r"(?<![\w.~/-])(?:~|\.{1,2})?/[^\s'\"<>,;]*")
_STACK = re.compile(r"Traceback \(most recent call last\):.*", re.DOTALL)
MAX_MESSAGE = 300  # an error text longer than this is cut (a dumped graph or stack says nothing to a client)


def redact(text: str) -> str:
    """``text`` with URLs and file-system paths replaced by ``<url>`` and ``<path>``, any stack
    trace dropped, on one line and at most :data:`MAX_MESSAGE` characters."""
    text = _STACK.sub("", text)
    text = _URL.sub("<url>", text)
    text = _WINDOWS_PATH.sub("<path>", text)
    text = _POSIX_PATH.sub(lambda m: m.group(0) if m.group(0) == "/" else "<path>", text)
    text = " ".join(text.split())
    return text if len(text) <= MAX_MESSAGE else text[: MAX_MESSAGE - 3] + "..."


def public_spec(spec: VersionSpec) -> dict[str, Any]:
    """The part of a version's spec a client needs to send images and read answers."""
    return {
        "name": spec.name,
        "version": spec.version,
        "created_at": spec.created_at.isoformat(),
        "labels": list(spec.labels),
        "num_classes": spec.num_classes,
        "preprocess": spec.model_dump(mode="json")["preprocess"],
        "feature_dim": spec.feature_dim,
        "precision": spec.precision,
    }
