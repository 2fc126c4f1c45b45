"""Gaussian smoothing of the network's field: analytic attenuation, invariants, the pipeline.

A sinusoidal displacement of wavelength L filtered by a Gaussian of sigma s keeps its shape and
loses amplitude by exp(-2 pi^2 s^2 / L^2); constant and zero fields are unchanged (the same scan
twice still moves nothing); white noise loses variance by (2 sqrt(pi) s)^3 for s in voxels.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from jrs.inference.smoothing import field_smoothing_sigma, smooth_field


def test_sigma_from_metadata_and_override() -> None:
    assert field_smoothing_sigma({}) == 0.0
    assert field_smoothing_sigma({"dvf_smoothing_mm": 1.5}) == 1.5
    assert field_smoothing_sigma({"dvf_smoothing_mm": 2}) == 2.0
    assert field_smoothing_sigma({"dvf_smoothing_mm": -1.0}) == 0.0
    assert field_smoothing_sigma({"dvf_smoothing_mm": "2"}) == 0.0  # not a number: off
    assert field_smoothing_sigma({"dvf_smoothing_mm": True}) == 0.0
    assert field_smoothing_sigma({"dvf_smoothing_mm": 1.5}, 0.0) == 0.0
    assert field_smoothing_sigma({}, 3.0) == 3.0
    with pytest.raises(ValueError, match=">= 0"):
        field_smoothing_sigma({}, -0.5)


def test_a_sinusoid_loses_the_gaussian_amplitude_and_keeps_its_phase() -> None:
    wavelength, sigma = 16.0, 2.0  # mm, 1 mm voxels
    x = np.broadcast_to(np.arange(96, dtype=np.float64), (24, 32, 96))
    wave = np.sin(2 * np.pi * x / wavelength).astype(np.float32)
    dvf = np.stack([3.0 * wave, np.zeros_like(wave), np.full_like(wave, 1.25)])
    out = smooth_field(dvf, sigma)
    expected = np.exp(-2 * np.pi**2 * sigma**2 / wavelength**2)  # 0.735
    core = (slice(None), slice(None), slice(16, 80))  # away from the x borders
    gain = float(np.sum(out[0][core] * wave[core]) / np.sum(wave[core] ** 2)) / 3.0
    assert gain == pytest.approx(expected, abs=0.01)
    residual = out[0][core] - 3.0 * gain * wave[core]
    assert float(np.abs(residual).max()) < 0.02  # the same wave, only smaller
    np.testing.assert_allclose(out[1], 0.0, atol=1e-6)
    np.testing.assert_allclose(out[2], 1.25, atol=1e-5)  # a constant stays (also at borders)


def test_zero_field_stays_exactly_zero_and_sigma_zero_is_the_identity() -> None:
    zero = np.zeros((3, 10, 12, 14), np.float32)
    assert not smooth_field(zero, 2.0).any()
    rng = np.random.default_rng(1)
    field = rng.normal(size=(3, 10, 12, 14)).astype(np.float32)
    assert smooth_field(field, 0.0) is field


def test_white_noise_variance_drops_as_theory_and_layouts_agree() -> None:
    rng = np.random.default_rng(2)
    noise = rng.normal(size=(3, 64, 64, 64)).astype(np.float32)
    sigma = 2.0
    out = smooth_field(noise, sigma)
    inner = out[:, 12:-12, 12:-12, 12:-12]
    expected_std = 1.0 / (2 * np.sqrt(np.pi) * sigma) ** 1.5  # 0.053
    assert float(inner.std()) == pytest.approx(expected_std, rel=0.15)
    last = smooth_field(np.moveaxis(noise, 0, -1), sigma, channel_axis=-1)
    np.testing.assert_allclose(np.moveaxis(last, -1, 0), out, atol=1e-6)
    # physical units: on 2 mm voxels the same sigma in mm is one voxel, a weaker filter
    coarse = smooth_field(noise, sigma, spacing_mm=2.0)[:, 12:-12, 12:-12, 12:-12]
    assert float(coarse.std()) > 2.0 * float(inner.std())


def test_bad_fields_are_refused() -> None:
    with pytest.raises(ValueError, match="3 components"):
        smooth_field(np.zeros((2, 4, 4, 4), np.float32), 1.0)
    with pytest.raises(ValueError, match=">= 0"):
        smooth_field(np.zeros((3, 4, 4, 4), np.float32), -1.0)


@dataclass
class _Pred:
    seg_probs: np.ndarray | None
    dvf: np.ndarray


class _RoughBackend:
    """Fake network: a rough field (noise seeded by the fixed image) plus a null bias.

    For the same image twice the two passes return the same field, so the corrected field is
    zero however rough; for a real pair the roughness remains and the smoothing must remove it.
    """

    def __init__(self, sigma_mm: float) -> None:
        organs = ("prostate", "seminal_vesicles", "rectum", "bladder")
        self.metadata: dict[str, Any] = {
            "name": "fake",
            "version": "0",
            "dvf_smoothing_mm": sigma_mm,
            "path_choice": dict.fromkeys(organs, "registration"),
        }

    def predict(self, fixed: np.ndarray, moving: np.ndarray, moving_labels: np.ndarray) -> _Pred:
        seed = int(abs(float(fixed.sum())) * 1000) % (2**31)
        rng = np.random.default_rng(seed)
        dvf = rng.normal(0.0, 0.6, (3, *fixed.shape)).astype(np.float32)
        return _Pred(None, dvf)


@pytest.mark.integration
def test_pipeline_smooths_the_field_and_the_same_scan_still_moves_nothing(
    tmp_path: Path,
) -> None:
    from jrs.core.geometry import Volume
    from jrs.pipeline.options import RecontourOptions
    from jrs.pipeline.run import recontour
    from jrs.synth import generate_fraction, generate_patient, write_fraction, write_patient

    patient = generate_patient(5, matrix=128, slice_thickness=3.0)
    write_patient(patient, tmp_path / "case")
    write_fraction(generate_fraction(patient, 1), tmp_path / "case" / "fraction_1")
    plan = tmp_path / "case" / "planning"
    daily = tmp_path / "case" / "fraction_1" / "ct"
    res = recontour(
        plan / "ct",
        plan / "rtstruct.dcm",
        plan / "ct",
        tmp_path / "same",
        RecontourOptions(device="cpu", dvf_spacing_mm=0),
        backend=_RoughBackend(2.0),
    )
    assert float(np.abs(Volume.read(str(res.dvf)).array).max()) < 0.05
    qa = json.loads(res.qa.read_text())
    assert qa["network"]["dvf_smoothing"]["sigma_mm"] == 2.0
    std = {}
    for sigma in (0.0, 2.0):
        res = recontour(
            plan / "ct",
            plan / "rtstruct.dcm",
            daily,
            tmp_path / f"pair{sigma}",
            RecontourOptions(device="cpu", dvf_spacing_mm=0),
            backend=_RoughBackend(sigma),
        )
        field = Volume.read(str(res.dvf)).array
        std[sigma] = float(np.diff(field, axis=2).std())  # voxel-to-voxel roughness
    assert std[2.0] < 0.3 * std[0.0]
    # the option overrides the model's sigma
    res = recontour(
        plan / "ct",
        plan / "rtstruct.dcm",
        daily,
        tmp_path / "override",
        RecontourOptions(device="cpu", dvf_spacing_mm=0, dvf_smoothing_mm=0.0),
        backend=_RoughBackend(2.0),
    )
    assert json.loads(res.qa.read_text())["network"]["dvf_smoothing"]["sigma_mm"] == 0.0
