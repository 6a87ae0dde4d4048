# syntax=docker/dockerfile:1
# streamgmm daemon image: build wheels in one stage, run as a non-root user in a slim one.

FROM python:3.11-slim AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY streamgmm ./streamgmm
RUN pip wheel --no-cache-dir --wheel-dir /wheels .

FROM python:3.11-slim
LABEL org.opencontainers.image.title="streamgmm" \
      org.opencontainers.image.description="Streaming anomaly detection on Kafka with online Gaussian mixtures"
ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    OPENBLAS_NUM_THREADS=1 \
    STREAMGMM_CHECKPOINT__DIR=/var/lib/streamgmm \
    STREAMGMM_METRICS__HOST=0.0.0.0
COPY --from=build /wheels /wheels
RUN pip install --no-cache-dir /wheels/*.whl && rm -rf /wheels \
    && useradd --system --uid 10001 --home-dir /var/lib/streamgmm --shell /usr/sbin/nologin streamgmm \
    && mkdir -p /etc/streamgmm /var/lib/streamgmm && chown streamgmm /var/lib/streamgmm
COPY config/streamgmm.yaml /etc/streamgmm/streamgmm.yaml
USER streamgmm
VOLUME ["/var/lib/streamgmm"]
EXPOSE 9464
# /healthz answers while the process serves HTTP (liveness: a broker outage is /readyz's and
# the alerts' to report; restarting the container would not mend it). The port comes from the config
# and its STREAMGMM_* overrides, as the daemon's does.
HEALTHCHECK --interval=15s --timeout=5s --start-period=20s --retries=3 \
    CMD ["streamgmm", "healthcheck", "--config", "/etc/streamgmm/streamgmm.yaml"]
# Exec form: streamgmm itself is PID 1 and receives SIGTERM from `docker stop`; it finishes
# the batch, checkpoints and commits before exiting (give it time: docker stop -t 60).
ENTRYPOINT ["streamgmm"]
CMD ["run", "--config", "/etc/streamgmm/streamgmm.yaml"]
