"""CycGuard reconstruction core: physics, networks, defense and MRD/DICOM I/O.

Pure library: nothing here imports Gadgetron. Layering (docs/DESIGN.md section 2):
``recon.pipeline -> recon.detect / recon.mitigate -> recon.models -> recon.physics -> recon.types``.
"""

__version__ = "0.1.0"
