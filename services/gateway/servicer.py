"""GatewayService: authenticate, admit, and hand each RPC to its pipeline (Ask) or the ingestor."""

from __future__ import annotations

from typing import AsyncIterator

import grpc

from services.gateway.ask import AskPipeline
from services.gateway.auth import ApiKeyAuth
from services.gateway.deadlines import Deadline
from services.gateway.ingest import Ingestor
from services.runtime.admission import AdmissionLimiter
from services.runtime.guard import authenticated_by
from services.runtime.pb.ragfleet.v1 import gateway_pb2, gateway_pb2_grpc


class GatewayServiceServicer(gateway_pb2_grpc.GatewayServiceServicer):
    def __init__(self, *, auth: ApiKeyAuth, limiter: AdmissionLimiter, pipeline: AskPipeline,
                 ingestor: Ingestor) -> None:
        self._auth = auth
        self._limiter = limiter
        self._pipeline = pipeline
        self._ingestor = ingestor

    @property
    def authenticator(self) -> ApiKeyAuth:
        """For the server's guard: it checks the key before the body is parsed (services.gateway.server)."""
        return self._auth

    def _tenant(self, context: grpc.aio.ServicerContext) -> str:
        """The tenant the guard authenticated; checked here only when the servicer runs without that guard."""
        tenant = authenticated_by(self._auth)
        return tenant if tenant is not None else self._auth.authenticate(context.invocation_metadata())

    async def Ask(self, request: gateway_pb2.AskRequest,
                  context: grpc.aio.ServicerContext) -> AsyncIterator[gateway_pb2.AskResponse]:
        # Everything that can be refused is refused here, before the first event.
        tenant = self._tenant(context)
        plan = self._pipeline.plan(tenant, request)
        deadline = Deadline.from_context(context)
        self._limiter.acquire()
        try:
            async for event in self._pipeline.stream(tenant, request, plan, deadline):
                yield event
        finally:
            self._limiter.release()

    async def Ingest(self, request: gateway_pb2.IngestRequest,
                     context: grpc.aio.ServicerContext) -> gateway_pb2.IngestResponse:
        tenant = self._tenant(context)
        return await self._ingestor.ingest(tenant, request, Deadline.from_context(context))

    async def DeleteDocuments(self, request: gateway_pb2.DeleteDocumentsRequest,
                              context: grpc.aio.ServicerContext) -> gateway_pb2.DeleteDocumentsResponse:
        tenant = self._tenant(context)
        return await self._ingestor.delete(tenant, request, Deadline.from_context(context))
