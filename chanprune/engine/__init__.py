"""The pruning engine's data path: calibration batches carried through the network node by node.

``store`` keeps per-batch values within a memory budget (spilling to files beyond it);
``frontier`` runs a traced model over every batch up to a chosen node, keeping only the values
later nodes still read; ``calibration`` pairs the working model's frontier with the original's
and turns what they carry into moments for a pruning unit.
"""
