# The censorwatch service image: one image, the command picks the process (poll, worker, dispatch, ...).
#   docker build -t censorwatch .
#   docker run --rm censorwatch check-config
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /src
COPY . /src
RUN pip install /src \
    && useradd --system --uid 10001 --home-dir /var/lib/censorwatch --create-home --shell /usr/sbin/nologin censorwatch \
    && rm -rf /src

WORKDIR /var/lib/censorwatch
USER 10001:10001
ENV CENSORWATCH_STATE_DIR=/var/lib/censorwatch \
    CENSORWATCH_METRICS__HOST=0.0.0.0
# metrics: poller, worker, dispatcher
EXPOSE 9464 9465 9466

ENTRYPOINT ["censorwatch"]
CMD ["--help"]
