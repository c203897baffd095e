# The censorwatch service image: one image, the command picks the process (poll, worker, dispatch, ...).
#   docker build -t censorwatch .
#   docker run --rm censorwatch check-config

# Build stage: a wheel with the detection engine compiled by mypyc (setup.py). mypyc type-checks the engine against
# the project's dependencies, so they (and the dev extras, which bring mypy) are installed here, with gcc.
FROM python:3.11-slim AS build
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
RUN apt-get update \
    && apt-get install -y --no-install-recommends gcc libc6-dev \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY . /src
RUN pip install '/src[dev]' \
    && CENSORWATCH_COMPILE=1 pip wheel --no-deps --no-build-isolation --wheel-dir /wheels /src

FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

COPY --from=build /wheels /wheels
RUN pip install /wheels/censorwatch-*.whl \
    && useradd --system --uid 10001 --home-dir /var/lib/censorwatch --create-home --shell /usr/sbin/nologin censorwatch \
    && rm -rf /wheels

WORKDIR /var/lib/censorwatch
USER 10001:10001
ENV CENSORWATCH_STATE_DIR=/var/lib/censorwatch \
    CENSORWATCH_METRICS__HOST=0.0.0.0
# metrics: poller, worker, dispatcher
EXPOSE 9464 9465 9466

ENTRYPOINT ["censorwatch"]
CMD ["--help"]
