"""The generalization and protocol-matrix benchmarks count what they claim: false positives
among the checked slices only, `unverified` apart, recovery on the slices an attack damaged."""

from __future__ import annotations

from typing import Any

import pytest

from benchmarks import generalization, protocol_matrix


def _case(verdict: str, psnr: float, shipped: float | None = None) -> dict[str, Any]:
    return {"verdict": verdict, "psnr": psnr, "ssim": 0.9, "psnr_cg": psnr - 3, "ssim_cg": 0.8,
            "psnr_shipped": psnr if shipped is None else shipped, "ssim_shipped": 0.9}


def test_clean_figures_count_false_positives_among_the_checked_slices_only() -> None:
    fpr = {"rows": [{"verdict": v} for v in ["clean"] * 6 + ["flagged", "mitigated", "unverified", "unverified"]]}
    attacks = {"rows": [{"clean": _case("clean", 36.0, 35.5)}, {"clean": _case("clean", 38.0)}]}
    figures = generalization.clean_figures(fpr, attacks)
    assert figures["flagged of the checked (FPR)"] == pytest.approx(2 / 8)
    assert figures["unverified"] == pytest.approx(0.2) and figures["rewritten (mitigated)"] == pytest.approx(0.1)
    assert figures["network PSNR dB"] == pytest.approx(37.0) and figures["shipped clean loss dB"] == pytest.approx(0.25)


def test_the_protocol_matrix_scores_attacks_on_the_slices_they_damage() -> None:
    key = protocol_matrix.label(*protocol_matrix.ATTACKS[0])
    others = {protocol_matrix.label(*a): _case("clean", 36.0) for a in protocol_matrix.ATTACKS[1:]}
    victims = [
        {"clean": _case("clean", 36.0), "bart_psnr": 33.0, "bart_ssim": 0.8, "bart_seconds": 2.0,
         "attacks": {key: _case("mitigated", 26.0, shipped=31.0), **others}},  # 10 dB lost, 5 back
        {"clean": _case("clean", 36.0), "bart_psnr": 34.0, "bart_ssim": 0.8, "bart_seconds": 2.0,
         "attacks": {key: _case("clean", 35.0), **others}},  # 1 dB: not counted
    ]
    clean = [{"verdict": "clean", "seconds": 1.0}, {"verdict": "flagged", "seconds": 3.0}, {"verdict": "unverified"}]
    summary = protocol_matrix.summarise({"clean": clean, "victims": victims})
    first = summary["attacks"][protocol_matrix.short(*protocol_matrix.ATTACKS[0][:2])]
    assert first["damaging"] == 1 and first["tpr"] == 1.0 and first["recovered"] == pytest.approx(0.5)
    assert summary["fpr"] == 0.5 and summary["unverified"] == pytest.approx(1 / 3) and summary["seconds_per_slice"] == 2.0
    assert summary["psnr_bart"] == 33.5
