"""The BitNet-student marker a converted model's config carries (``config.bitdistill``)."""

from __future__ import annotations

__all__ = ["MARKER_FORMAT", "MARKER_KEY", "MARKER_VERSION", "student_marker"]

MARKER_KEY = "bitdistill"
MARKER_FORMAT = "bitnet-b1.58-student"
MARKER_VERSION = 1


def student_marker(config_or_model) -> dict | None:
    """The BitNet-student marker of a config or model (``config.bitdistill``), or ``None`` if it is not one."""
    config = getattr(config_or_model, "config", config_or_model)
    marker = getattr(config, MARKER_KEY, None)
    if isinstance(marker, dict) and marker.get("format") == MARKER_FORMAT:
        return marker
    return None
