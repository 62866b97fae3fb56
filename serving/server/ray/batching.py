"""Server-side batching on a Ray replica: ``@serve.batch`` over leased versions."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

import numpy as np
from ray import serve

from serving.protocol.tensors import conform
from serving.protocol.types import InferRequest, InferResponse, status_of
from serving.runtime.service import ModelService
from serving.runtime.slot import Live
from serving.server.local import LocalModel


@dataclass(frozen=True)
class _Failed:
    """One request's failure inside a batch (the others still get their outputs)."""

    error: Exception


class BatchedModel(LocalModel):
    """A local model port whose live-version infers go through ``@serve.batch``.

    Each request leases the live version, conforms its inputs to it and waits for
    its batch under that lease; a batch predicts once per version it holds, so a
    swap while requests wait never mixes two versions. When a joined batch fails,
    each of its requests is predicted alone, so one bad request fails only itself.
    """

    def __init__(self, service: ModelService) -> None:
        super().__init__(service)
        batching = service.config.batching
        self._batched = serve.batch(
            max_batch_size=batching.max_batch_size, batch_wait_timeout_s=batching.batch_wait_timeout_s
        )(self._predict_batch)

    async def infer(self, request: InferRequest) -> InferResponse:
        service = self.service
        if request.version is not None or request.primary_only or service.split.shadow_fraction > 0:
            # NOTE: explicit versions, v1 and mirrored requests are answered unbatched.
            return await super().infer(request)
        role = service.choose(request.routing_key)
        if role != "live":
            # NOTE: the canary's share is answered unbatched, routed once, here.
            return await self._run(None, service.infer, request, role)
        started = time.perf_counter()
        served, status = service.slot.version or "none", 200
        try:
            with service.slot.lease() as live:
                served = live.version
                inputs = conform(request.inputs, live.predictor.inputs)
                outputs = await self._batched((live, inputs))
                if isinstance(outputs, _Failed):
                    raise outputs.error
                return service.respond(live, request, outputs)
        except BaseException as exc:
            status = status_of(exc)
            raise
        finally:
            service.observe(served, status, started)

    async def _predict_batch(
        self, batch: list[tuple[Live, dict[str, np.ndarray]]]
    ) -> list[dict[str, np.ndarray] | _Failed]:
        """Predict each version's share of the batch together; results in the batch's order."""
        groups: dict[int, list[int]] = {}
        for i, (live, _) in enumerate(batch):
            groups.setdefault(id(live), []).append(i)
        results: list[dict[str, np.ndarray] | _Failed] = [_Failed(RuntimeError("not predicted"))] * len(batch)
        for indices in groups.values():
            live = batch[indices[0]][0]
            outputs = await self._predict_group(live, [batch[i][1] for i in indices])
            for i, out in zip(indices, outputs, strict=True):
                results[i] = out
        return results

    async def _predict_group(
        self, live: Live, items: list[dict[str, np.ndarray]]
    ) -> list[dict[str, np.ndarray] | _Failed]:
        names = list(items[0])
        if len(items) > 1 and all(list(item) == names for item in items):
            sizes = [len(item[names[0]]) for item in items]
            joined = {n: np.concatenate([item[n] for item in items]) for n in names}
            whole = await asyncio.to_thread(self._one, live, joined)
            if not isinstance(whole, _Failed):
                bounds = np.cumsum(sizes)[:-1]
                split = {n: np.split(np.asarray(v), bounds) for n, v in whole.items()}
                return [{n: parts[i] for n, parts in split.items()} for i in range(len(items))]
            # NOTE: the joined batch failed: predict each request alone to find the one(s) at fault.
        return [await asyncio.to_thread(self._one, live, item) for item in items]

    @staticmethod
    def _one(live: Live, item: dict[str, np.ndarray]) -> dict[str, np.ndarray] | _Failed:
        try:
            return ModelService.run(live, item)
        except Exception as exc:  # noqa: BLE001 -- NOTE: handed to that request's error
            return _Failed(exc)
