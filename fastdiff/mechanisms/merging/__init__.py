"""Token merging: ToMe-SD bipartite soft matching and ToDo key/value pooling around token submodules."""

from .merge import TokenMerge

__all__ = ["TokenMerge"]
