"""hiermoe-lightning: hierarchical, token-deduplicated expert parallelism for PyTorch Lightning (after HierMoE)."""

from .cost.link_costs import LinkCosts
from .layer import MoELayer
from .parallel import ExpertParallel
from .placement import Placement
from .topology import Topology

__version__ = "0.1.0"

__all__ = ["Topology", "LinkCosts", "MoELayer", "ExpertParallel", "Placement", "__version__"]
