"""Peer schedule optimisers that need no retraining, as bases for the toolkit (issue 13): each makes a trajectory
(ᾱ, cleanest first) for a solver and step count, with its provenance (settings, seconds, model evaluations).

- :mod:`.gits`: GITS (Chen et al., ICML 2024), from the model itself: teacher paths on a fine grid, the cost of
  one-step jumps between grid points, a dynamic programme over them.
- :mod:`.dmn`: DMN (Xue et al., CVPR 2024), from the schedule and solver alone: the authors' analytic bound on the
  discretisation error, minimised with ``trust-constr``.
- :mod:`.bases`: :func:`peer_base`, a peer base by name (with a cache keyed by the model's weights), the
  integration's entry point; :func:`stored_peer_base` reads one back from a checkpoint's entries.
- :mod:`.common`: :class:`PeerResult`, the result both return.
"""

from .bases import (
    PEER_BASES,
    base_trajectory,
    check_peer_grid,
    entry_fields,
    peer_base,
    stored_peer_base,
    weights_digest,
)
from .common import PEERS, PeerResult
from .dmn import DMN_INITS, DMN_SOLVERS, DMNSettings, check_dmn_solver, dmn, dmn_bound, step_weights
from .gits import (
    METRICS,
    GITSCosts,
    GITSSettings,
    gits,
    gits_costs,
    gits_from_costs,
    jump_costs,
    select_steps,
    teacher_paths,
)

__all__ = [
    "PEER_BASES", "base_trajectory", "check_peer_grid", "entry_fields", "peer_base", "stored_peer_base",
    "weights_digest", "PEERS", "PeerResult",
    "DMN_INITS", "DMN_SOLVERS", "DMNSettings", "check_dmn_solver", "dmn", "dmn_bound", "step_weights",
    "METRICS", "GITSCosts", "GITSSettings", "gits", "gits_costs", "gits_from_costs", "jump_costs", "select_steps",
    "teacher_paths",
]
