"""Registration: pre-alignment, the far field, the iterative method, instance optimisation.

The whole-body and prostate-centred pre-alignment, the bony far field outside the network box,
the iterative (B-spline) method, and the instance optimisation on top of the network's field.
"""
