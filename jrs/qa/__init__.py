"""Quality assurance: where a human should look.

Per-structure figures and flags, the plausibility of the inputs, image evidence (residual shift,
contour fit), flags shared by one organ's contours, and the review figure.
"""
