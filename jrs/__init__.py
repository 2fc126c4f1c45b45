"""jrs: joint registration and segmentation for online adaptive radiotherapy of the prostate.

The domain core: geometry, DICOM input/output, contours, registration, inference, the
re-contouring pipeline, metrics, QA and synthetic phantoms. It imports no web framework, no
torch and no training code.
"""

__version__ = "0.1.0"
