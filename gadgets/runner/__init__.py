"""Our runner: plays Gadgetron's side of a pipeline (replay of ``.h5`` files; the server).

:mod:`.config` parses and checks v2 pipeline XML, :mod:`.frontend` holds Python
equivalents of the C++ preprocessing gadgets, :mod:`.external` drives ``<external>`` nodes
over the real wire protocol, :mod:`.chain` strings them together and :mod:`.replay` reads a
raw file through a pipeline into images and a report.
"""
