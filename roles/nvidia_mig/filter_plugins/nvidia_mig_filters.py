"""Filters of the nvidia_mig role: the layout checks of the script the role installs.

The script (files/nvidia_mig_layout.py) runs on the host at boot with Python's standard
library only; the role validates the inventory's layout with the same function before it
writes it.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

_SCRIPT = Path(__file__).resolve().parent.parent / "files" / "nvidia_mig_layout.py"
_spec = importlib.util.spec_from_file_location("nvidia_mig_layout", _SCRIPT)
_layout = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_layout)


def nvidia_mig_layout_errors(layout) -> list:
    """Problems of nvidia_mig_layout, as sentences (empty when valid)."""
    return _layout.validate_layout(layout)


class FilterModule:
    def filters(self):
        return {"nvidia_mig_layout_errors": nvidia_mig_layout_errors}
