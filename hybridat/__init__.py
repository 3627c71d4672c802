"""hybridat: hybrid adversarial training and the analysis of Dual BN (Zhang et al., 2024)."""

__version__ = "0.1.0"
