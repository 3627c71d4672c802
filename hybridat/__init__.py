"""hybridat: hybrid adversarial training and the analysis of Dual BN (Zhang et al., 2024)."""

__version__ = "0.1.0"

# each command's function (README, Stages), importable as hybridat.NAME (evaluate: hybridat.evaluate.evaluate, as
# the module of that name would shadow it)
_API = {"import_checkpoint": "interop", "export_branch": "interop", "load_checkpoint": "checkpoint",
        "checkpoint_info": "checkpoint",
        "run_training": "run", "write_csv": "checkpoint", "load_split": "data",
        "swap_bn": "recombine", "ns_gap": "analysis", "write_ns_gap": "analysis", "load_runs": "report",
        "write_report": "report", "HybridatError": "errors"}
__all__ = list(_API)


def __getattr__(name: str):
    """hybridat.import_checkpoint etc., imported on first use so that `import hybridat` stays light."""
    if name in _API:
        import importlib

        return getattr(importlib.import_module(f".{_API[name]}", __name__), name)
    raise AttributeError(f"module 'hybridat' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_API])
