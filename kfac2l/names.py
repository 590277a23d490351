"""Names shared by the registry, the runner, the figures, reproduce and the bench: one place.

Optimiser names are the paper's legend names in lower case; the legend order, labels, colours,
line styles and markers are identical in every figure.
"""

from __future__ import annotations

TWO_LEVEL = ("nico", "spectral", "residu", "kry-nico", "kry-residu", "previous", "taylor")
NO_CURVATURE = ("sgd", "adam")          # learning-rate grid only, no damping
PAPER_OPTIMIZERS = ("kfac", *TWO_LEVEL, "adam", "sgd")  # the ten of the paper's figures (+ TAYLOR)
ORDER = ("kfac", *TWO_LEVEL, "adam", "sgd", "ngd", "two-level")

LABELS = {
    "kfac": "KFAC", "nico": "NICO", "spectral": "SPECTRAL", "residu": "RESIDU", "kry-nico": "KRY-NICO",
    "kry-residu": "KRY-RESIDU", "previous": "PREVIOUS", "taylor": "TAYLOR", "adam": "ADAM", "sgd": "SGD",
    "ngd": "NGD", "two-level": "TWO-LEVEL",
}
COLORS = {
    "kfac": "#000000", "nico": "#1f77b4", "spectral": "#ff7f0e", "residu": "#2ca02c", "kry-nico": "#d62728",
    "kry-residu": "#9467bd", "previous": "#8c564b", "taylor": "#e377c2", "adam": "#7f7f7f", "sgd": "#bcbd22",
    "ngd": "#17becf", "two-level": "#aec7e8",
}
# curves that overlap stay distinguishable: a line style and a marker per optimiser
LINESTYLES = {
    "kfac": "-", "nico": "--", "spectral": "-.", "residu": ":", "kry-nico": (0, (5, 1)), "kry-residu": (0, (3, 1, 1, 1)),
    "previous": (0, (1, 1)), "taylor": (0, (5, 2, 1, 2)), "adam": "-", "sgd": "--", "ngd": "-", "two-level": "--",
}
MARKERS = {
    "kfac": "o", "nico": "s", "spectral": "^", "residu": "v", "kry-nico": "D", "kry-residu": "P", "previous": "X",
    "taylor": "*", "adam": "<", "sgd": ">", "ngd": "h", "two-level": "p",
}
