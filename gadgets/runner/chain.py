"""A whole pipeline as one iterator: C++ front end (Python equivalents), then each external node.

By default every ``<external>`` node runs as its own process over the wire, exactly as
Gadgetron runs it; ``in_process`` calls the same gadget stages directly (debugging, and the
benchmark of what the wire costs). Threads: each external process gets ``cores // externals``
torch threads (the cores this process may run on, ``gadgets.cores``) unless told otherwise, so
that pipelined stages do not oversubscribe the cores.
"""

from __future__ import annotations

from collections.abc import Generator, Iterable, Iterator
from typing import Any

from gadgets.cores import share
from gadgets.runner import frontend
from gadgets.runner.config import CppGadget, Pipeline, PipelineError
from gadgets.runner.external import ExternalRun
from gadgets.stages import build_stages, run_stages


def run_pipeline(
    pipeline: Pipeline,
    header_xml: str,
    items: Iterable[Any],
    in_process: bool = False,
    threads: int | None = None,
    echo_stderr: bool = False,
    io_timeout: float = 900.0,
) -> Generator[Any, None, None]:
    """Stream ``items`` (acquisitions, waveforms) through ``pipeline``; yields what leaves it."""
    front = [frontend.build(n.classname, header_xml, dict(n.properties)) for n in pipeline.nodes if isinstance(n, CppGadget)]
    stream: Iterator[Any] = run_stages(front, items)
    externals = pipeline.externals
    if threads is None:
        threads = share(len(externals))
    runs: list[ExternalRun] = []
    for node in externals:
        if in_process:
            if not node.ours:
                raise PipelineError(f"{node.name}: only CycGuard gadgets can run in process")
            stream = run_stages(build_stages(node.module, node.target, node.configuration, header_xml), stream)
        else:
            runs.append(ExternalRun(node, header_xml, threads, echo_stderr=echo_stderr, io_timeout=io_timeout))
            stream = runs[-1].run(stream)
    return _supervised(stream, runs)


def _supervised(stream: Iterator[Any], runs: list[ExternalRun]) -> Generator[Any, None, None]:
    """``stream``, ending every gadget of the chain and every thread feeding one before it
    returns, whether the chain finished, failed or its consumer stopped (close the iterator):
    no thread of a failed run may go on reading the input (HDF5 is not thread-safe) or hold
    a process. On success each run has ended already and this does nothing."""
    try:
        yield from stream
    finally:
        for run in runs:
            run.cancel()
        for run in runs:
            run.join()
