"""Synthetic pelvic patients with known deformations (tests, demo, training data).

``generate_patient(seed)`` renders an analytic male pelvis (body with fat and muscle, pelvic bones,
bladder, prostate, seminal vesicles, rectum with content and gas) as a planning CT with labels and
structures; ``generate_fraction(patient, k)`` makes a daily CT with setup error, bladder and rectal
filling, prostate motion and elastic deformation, and the exact ground-truth pull DVF;
``write_dataset`` writes the ``jrs phantom`` layout of DESIGN.md as DICOM + ``true_dvf.mha``.
"""

from jrs.synth.dataset import write_dataset, write_fraction, write_patient
from jrs.synth.generator import (
    ROI_NAMES,
    PhantomFraction,
    PhantomPatient,
    generate_fraction,
    generate_patient,
)

__all__ = [
    "ROI_NAMES",
    "PhantomFraction",
    "PhantomPatient",
    "generate_fraction",
    "generate_patient",
    "write_dataset",
    "write_fraction",
    "write_patient",
]
