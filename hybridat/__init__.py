"""hybridat: hybrid adversarial training and the analysis of Dual BN (Zhang et al., 2024)."""

__version__ = "0.1.0"

_API = {"import_checkpoint": "interop", "export_branch": "interop", "load_checkpoint": "checkpoint"}


def __getattr__(name: str):
    """hybridat.import_checkpoint etc., imported on first use so that `import hybridat` stays light."""
    if name in _API:
        import importlib

        return getattr(importlib.import_module(f".{_API[name]}", __name__), name)
    raise AttributeError(f"module 'hybridat' has no attribute {name!r}")
