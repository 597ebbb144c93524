"""MRI physics as operators: centred FFT, multi-coil SENSE, sampling masks, coil maps, noise."""

from recon.physics.cg import conjugate_gradient
from recon.physics.fft import fft2c, fftc, ifft2c, ifftc
from recon.physics.masks import MaskFamily
from recon.physics.sense import SenseOp

__all__ = ["MaskFamily", "SenseOp", "conjugate_gradient", "fft2c", "fftc", "ifft2c", "ifftc"]
