"""Order gadget: the images of a ``<distributed>`` block back in slice order, every slice accounted for.

``<external><execute name="gadgets.order" target="order" type="python"/>`` on the main
Gadgetron node, after the ``<distributed>`` block and before ``gadgets.export``. Gadgetron's
distributors return the workers' images in the order they finish, each numbered by the
worker that made it (``image_index`` 1 on every worker that got one slice). This stage
holds each image until every slice before it is out, numbers it by its place in the scan
(slice ``s`` is image ``s + 1``, as a single node numbers a scan acquired in slice order) and
sends it on; an image as received (``CycGuard.Received``) follows its rewritten image. At the
end of the scan every slice the header's encoding limits announce that no worker returned
is an error of the run, never a silent gap; when no slice came back at all, the run fails
with the likely cause. Images whose counters the header does not announce (or every image,
when it announces no slice count) go out at the end, in counter order.

An image that has waited ``hold_seconds`` for a slice before it goes on without it (logged);
the late slice is sent as soon as it comes. The stage only reorders and renumbers: pixels,
meta and verdicts are untouched.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from typing import Any

import ismrmrd

from gadgets.convert import image_key, is_received
from gadgets.params import OrderSettings
from gadgets.stages import Resources, SliceError, gadget_logging, serve
from recon.types import SliceKey

log = logging.getLogger("cycguard.gadget.order")

NOTHING_CAME_BACK = (
    "no image came back from the <distributed> workers for any of the {n} slice(s) the header announces: "
    "their gadgets failed before the first slice (see the workers' logs). A stock Gadgetron 4.7.2 drops the "
    "target and the <configuration> of every <external> node when it forwards a <distributed> stream to a worker, "
    "so every Python node there fails ('attribute name must be string' in the worker's log): run the distributed "
    "pipeline on a Gadgetron with that fixed (docs/DISTRIBUTED.md) or use the single-node pipeline 'defended'"
)


def _order(key: SliceKey) -> tuple[int, ...]:
    return (key.repetition, key.contrast, key.phase, key.set, key.slice)


def _name(key: SliceKey) -> str:
    extra = [f"{field} {value}" for field, value in (("contrast", key.contrast), ("repetition", key.repetition), ("set", key.set), ("phase", key.phase)) if value]
    return f"slice {key.slice}" + (f" ({', '.join(extra)})" if extra else "")


class OrderStage:
    """Restores slice order and image numbering after a ``<distributed>`` block."""

    name = "order"

    def __init__(self, settings: OrderSettings, resources: Resources) -> None:
        self.settings = settings
        self.expected = [SliceKey(slice=s) for s in range(resources.protocol().slices)]
        self.rank = {key: position for position, key in enumerate(self.expected)}
        self.next = 0  # first expected slice not yet sent
        self.held: dict[SliceKey, tuple[float, list[ismrmrd.Image]]] = {}
        self.numbers: dict[SliceKey, int] = {}  # slice -> image_index it went out with
        self.late: set[SliceKey] = set()  # slices the images after them stopped waiting for
        self.extra = 0  # images the header does not announce, numbered after the announced ones
        self.clock = time.monotonic

    def process(self, item: Any) -> Iterable[Any]:
        if not isinstance(item, ismrmrd.Image):
            return [item]
        key = image_key(item)
        if is_received(item):
            if key in self.numbers:  # its rewritten image already went out: follow it
                item.image_index = self.numbers[key]
                return [item]
            if key in self.held:
                self.held[key][1].append(item)
                return []
            return [SliceError(f"{_name(key)}: an image as received came back without its rewritten image; not sent")]
        if key in self.numbers or key in self.held:
            return [SliceError(f"{_name(key)}: came back twice from the <distributed> workers; the second image was not sent")]
        self.held[key] = (self.clock(), [item])
        return self._release()

    def _send(self, key: SliceKey) -> list[ismrmrd.Image]:
        _, images = self.held.pop(key)
        if key in self.rank:
            number = self.rank[key] + 1
        else:
            self.extra += 1
            number = len(self.expected) + self.extra
        self.numbers[key] = number
        for image in images:
            image.image_index = number
        return images

    def _release(self) -> list[Any]:
        now = self.clock()
        overdue = [key for key, (since, _) in self.held.items() if key in self.rank and now - since >= self.settings.hold_seconds]
        if overdue:
            last = max(self.rank[key] for key in overdue)
            skipped = [key for key in self.expected[self.next : last] if key not in self.numbers and key not in self.held]
            if skipped:
                log.warning("images waited %.0f s for %s; sent without them (they follow when they come)",
                            self.settings.hold_seconds, ", ".join(map(_name, skipped)))
                self.late.update(skipped)
        out: list[Any] = []
        while self.next < len(self.expected):
            key = self.expected[self.next]
            if key in self.held:
                out += self._send(key)
            elif key not in self.numbers and key not in self.late:
                break
            self.next += 1
        for key in [key for key in self.held if key in self.late]:
            out += self._send(key)
        return out

    def close(self) -> Iterable[Any]:
        came_back = len(self.numbers) + len(self.held)
        if self.expected and came_back == 0:
            raise RuntimeError(NOTHING_CAME_BACK.format(n=len(self.expected)))
        out: list[Any] = []
        for key in sorted(self.held, key=_order):
            out += self._send(key)
        out += [
            SliceError(f"{_name(key)}: no image came back from the <distributed> workers (its worker failed, was stopped "
                       "or refused the slice; see that worker's log)")
            for key in self.expected if key not in self.numbers
        ]
        return out


def order(connection: Any) -> None:
    """Gadget target ``gadgets.order:order``."""
    gadget_logging()
    serve(connection, "gadgets.order", "order")
