"""The domain's vocabulary: geometry, labels, displacement fields, metrics, errors.

Geometry in LPS and mm, labels and ROI synonyms, pull DVFs, overlap and surface metrics, and the
error hierarchy (without HTTP: the service and the DICOM node map it to statuses in one place).
"""
