"""The service's model calls: at most `concurrency` at once, and with dynamic batching, concurrent
requests merged into calls of the bundle's compiled batch.

A request of fewer samples than `max_batch` waits in a queue. When a model slot is free, the batcher
takes the oldest request, adds the requests queued behind it while they fit, waits for more until
`max_delay` seconds after the oldest one arrived, and runs the merged batch (the predictor zero-pads a
short batch, as it pads a short request). Each request gets its own rows of the outputs back. A
sample's outputs do not depend on the rows beside it (the kernels compute each sample alone, in the
same order), so every answer is identical to the one the request gets unbatched. Requests of
`max_batch` samples or more run alone, as without batching.
"""
import dataclasses
import math

import anyio
import numpy as np


@dataclasses.dataclass(eq=False)
class _Waiting:
    x: np.ndarray
    arrived: float
    done: anyio.Event = dataclasses.field(default_factory=anyio.Event)
    outputs: list[np.ndarray] | None = None
    error: Exception | None = None


class ModelCalls:
    """`await calls(x)` runs the predictor on x and returns its outputs as a list. Create it in the event
    loop; with batching, `batch_forever` must run in a task meanwhile. `batch_sizes` (a histogram) sees
    the samples of each call, `queue_depth` (a gauge) the requests waiting for one."""

    def __init__(self, predictor, concurrency: int, max_batch: int | None, max_delay: float, batch_sizes,
                 queue_depth):
        self._predictor = predictor
        self._slots = anyio.Semaphore(concurrency)
        self._max_batch = max_batch
        self._max_delay = max_delay
        self._batch_sizes = batch_sizes
        self._queue_depth = queue_depth
        self._send, self._receive = anyio.create_memory_object_stream(math.inf)
        self._next: _Waiting | None = None  # taken from the queue, but did not fit in the last batch

    def _call(self, xs: list[np.ndarray]) -> list[np.ndarray]:
        x = xs[0] if len(xs) == 1 else np.concatenate(xs)
        result = self._predictor(x)
        self._batch_sizes.observe(x.shape[0])
        return result if isinstance(result, list) else [result]

    async def __call__(self, x: np.ndarray) -> list[np.ndarray]:
        self._queue_depth.inc()
        if self._max_batch is None or x.shape[0] >= self._max_batch:
            try:
                await self._slots.acquire()
            finally:
                self._queue_depth.dec()
            try:
                return await anyio.to_thread.run_sync(self._call, [x])
            finally:
                self._slots.release()
        waiting = _Waiting(x, anyio.current_time())
        self._send.send_nowait(waiting)
        await waiting.done.wait()
        if waiting.error is not None:
            raise waiting.error
        return waiting.outputs

    async def batch_forever(self) -> None:
        async with anyio.create_task_group() as group:
            while True:
                await self._slots.acquire()
                group.start_soon(self._run, await self._collect())

    async def _collect(self) -> list[_Waiting]:
        first = self._next or await self._receive.receive()
        self._next = None
        batch, size = [first], first.x.shape[0]
        deadline = first.arrived + self._max_delay
        while size < self._max_batch:
            try:
                waiting = self._receive.receive_nowait()
            except anyio.WouldBlock:
                waiting = None
                with anyio.move_on_after(deadline - anyio.current_time()):
                    waiting = await self._receive.receive()
                if waiting is None:  # the oldest request has waited max_delay
                    break
            if size + waiting.x.shape[0] > self._max_batch:
                self._next = waiting
                break
            batch.append(waiting)
            size += waiting.x.shape[0]
        return batch

    async def _run(self, batch: list[_Waiting]) -> None:
        self._queue_depth.dec(len(batch))
        try:
            outputs = await anyio.to_thread.run_sync(self._call, [waiting.x for waiting in batch])
            start = 0
            for waiting in batch:
                end = start + waiting.x.shape[0]
                waiting.outputs = [y[start:end] for y in outputs]
                start = end
        except Exception as err:  # the predictor's: every request of the batch gets it
            for waiting in batch:
                waiting.error = err
        finally:
            self._slots.release()
            for waiting in batch:
                waiting.done.set()
