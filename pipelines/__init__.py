"""CycGuard's Gadgetron 4 v2 pipelines (``*.xml`` here), installed with the package.

``cycguard replay -c NAME`` and ``cycguard check NAME`` find them by file stem; copy them
into Gadgetron's config folder to run them under a real Gadgetron (``docker/``).
"""
