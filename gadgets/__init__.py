"""Gadgetron adapters for CycGuard (the only package that imports ``gadgetron``).

The command line (:mod:`gadgets.cli`) lives here too; it imports Gadgetron lazily, so the
offline commands work without the ``gadgetron`` extra.
"""
