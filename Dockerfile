# One image for all four services:  docker run IMAGE serve gateway   (or embedding | retrieval | generation)
FROM python:3.11-slim AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY services ./services
RUN pip wheel --no-cache-dir --wheel-dir /wheels .

FROM python:3.11-slim
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    RAGFLEET_DATA_DIR=/data \
    RAGFLEET_EMBEDDING_ONNX_CACHE_DIR=/opt/ragfleet/onnx
COPY --from=build /wheels /wheels
# The int8-compute embedding model is built into the image, so an embedding pod starts without the ~2 s build.
RUN pip install --no-cache-dir /wheels/*.whl && rm -rf /wheels \
    && python -m services.embedding.backends.quantize /opt/ragfleet/onnx \
    && groupadd --gid 10001 ragfleet && useradd --uid 10001 --gid 10001 --no-create-home ragfleet \
    && mkdir -p /data && chown ragfleet:ragfleet /data
USER 10001:10001
WORKDIR /data
# gRPC: gateway 50050, embedding 50051, retrieval 50052, generation 50053; Prometheus metrics 9450-9453.
EXPOSE 50050 50051 50052 50053 9450 9451 9452 9453
ENTRYPOINT ["ragfleet"]
CMD ["serve", "gateway"]
