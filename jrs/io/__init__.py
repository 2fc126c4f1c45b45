"""DICOM in and out: series, CT, RTSTRUCT, REG, derived series and contours.

Series reading and validation, CT volumes, RTSTRUCT read and write, DICOM spatial registration
(REG), derived series, and contours (polygons <-> masks in patient coordinates).
"""
