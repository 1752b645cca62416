"""The embedded demo MoE: a small Mixtral trained on text every Python installation ships.

``python -m moeviz.demo train``     trains it (see ``--help``);
``python -m moeviz.demo evaluate``  prints held-out perplexity, accuracy, routing and pruning cost.
This package imports nothing from the rest of moeviz, so it works while that API evolves.
"""
