"""The part of a graph a block needs to update some atoms: their incoming edges and those edges' sources.

A block noise head (a message-passing block of the backbone's own kind, ``noise_head: block``)
predicts the noise of corrupted atoms only. A message-passing block's output at an atom
depends on that atom's features, the features of its neighbours and the edges between them,
so running the unchanged block on this subgraph gives, on the wanted atoms, exactly what it
gives on the whole graph, at the cost of the corrupted atoms' neighbourhoods.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["IncomingSubgraph", "incoming_subgraph"]


@dataclass(frozen=True)
class IncomingSubgraph:
    """The subgraph of the edges into some atoms.

    Attributes:
        nodes: bool ``[N]``, the atoms the subgraph holds (the wanted atoms and every source
            of an edge into them); ``x[nodes]`` are its node features, in the same order.
        edges: bool ``[E]``, the edges into a wanted atom; ``edge_attr[edges]`` are the
            subgraph's edge features, in the same order.
        edge_index: ``[2, E']``, those edges with the subgraph's node numbers.
        wanted: ``[n]``, the subgraph's node numbers of the wanted atoms, in atom order.
    """

    nodes: torch.Tensor
    edges: torch.Tensor
    edge_index: torch.Tensor
    wanted: torch.Tensor


def incoming_subgraph(edge_index: torch.Tensor, atoms: torch.Tensor) -> IncomingSubgraph:
    """The edges into ``atoms`` and the atoms they connect, renumbered.

    Args:
        edge_index: ``[2, E]``, source (row 0) and target (row 1) of each edge, messages
            flowing to the target (fairchem's convention).
        atoms: bool ``[N]``, the atoms whose block output is wanted.
    """
    edges = atoms[edge_index[1]]
    nodes = atoms.clone()
    nodes[edge_index[0, edges]] = True
    renumber = torch.cumsum(nodes.long(), 0) - 1  # old node number -> subgraph number (where nodes)
    return IncomingSubgraph(nodes=nodes, edges=edges, edge_index=renumber[edge_index[:, edges]], wanted=renumber[atoms])
