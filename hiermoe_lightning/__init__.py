"""hiermoe-lightning: hierarchical, token-deduplicated expert parallelism for PyTorch Lightning (after HierMoE)."""

from .callback import HierMoECallback
from .cost.link_costs import LinkCosts
from .layer import MoELayer
from .parallel import ExpertParallel
from .placement import Placement
from .strategy import HierMoEStrategy, register_strategy
from .topology import Topology

register_strategy()

__version__ = "0.1.0"

__all__ = ["Topology", "LinkCosts", "MoELayer", "ExpertParallel", "HierMoEStrategy", "HierMoECallback", "Placement",
           "__version__"]
