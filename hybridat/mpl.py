"""matplotlib, imported so that $MPLBACKEND cannot stop a command: hybridat draws on Figure objects and saves them
as PNG files (no pyplot, no window), so it uses no backend, but matplotlib reads $MPLBACKEND when it is imported and
raises on a name it does not know (a typo, a setting for another machine): `report` and `ns-gap` ended in a
traceback. The variable is set aside while matplotlib loads and then given to it as matplotlib would take it
(`rcParams["backend"]`), a name it refuses left out, as if unset."""

from __future__ import annotations

import os
import sys


def _import() -> None:
    if "matplotlib" in sys.modules:  # loaded already (a notebook's): its backend is the caller's
        return
    backend = os.environ.pop("MPLBACKEND", None)
    try:
        import matplotlib
    finally:
        if backend is not None:
            os.environ["MPLBACKEND"] = backend
    if backend:
        try:
            matplotlib.rcParams["backend"] = backend
        except ValueError:
            pass


_import()
