"""rtb-ray: relative trajectory balance for diffusion posteriors, distributed on Ray."""

__version__ = "0.1.0"
