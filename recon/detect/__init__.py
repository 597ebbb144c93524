"""Detection of reconstructions that fail cyclic measurement consistency, and calibration."""

from recon.detect.calibration import Calibration, CalibrationError, calibrate
from recon.detect.cyclic import CyclicDetector, DetectionScores

__all__ = ["Calibration", "CalibrationError", "CyclicDetector", "DetectionScores", "calibrate"]
