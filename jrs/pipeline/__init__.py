"""Re-contouring: options, the run, batch, the demo job and the speed benchmarks.

``recontour`` (pre-alignment -> network or iterative method -> QA -> DICOM out) is the one
function that the command, batch, the DICOM node and the service call.
"""
