# syntax=docker/dockerfile:1
# The lastguard image: `lastguard operator` and `lastguard sidecar` (the chart runs
# the first; the injection webhook puts the second beside each protected app).
#
#   docker build -t lastguard:dev .          (make image)
#
# Stage 1 builds lastguard's wheel; stage 2 installs it, with its dependencies as
# prebuilt wheels only, into a virtualenv. No compiler, no build tools and no
# source tree reach the final image (python:*-slim has no compiler to begin with). tests/e2e/test_image_install.py runs the
# same build and install steps without Docker.
#
# The base is pinned by tag; pin the digest too for reproducible builds, and
# update both together:
#   docker buildx imagetools inspect python:3.11-slim-bookworm --format '{{json .Manifest.Digest}}'
# then write PYTHON_IMAGE=python:3.11-slim-bookworm@sha256:<digest>.
ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1
WORKDIR /src
# Only what the wheel is built from (.dockerignore keeps the rest out of the context).
COPY pyproject.toml setup.py README.md ./
COPY sidecar/ sidecar/
COPY operator/ operator/
COPY proto/ proto/
RUN python -m pip wheel --no-deps --wheel-dir /dist .

FROM ${PYTHON_IMAGE}
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1
# The wheel is mounted for this one step, not copied: it leaves no layer behind.
# The virtualenv gets no pip or setuptools of its own; the base image's pip installs
# into it. --only-binary: every dependency must come as a wheel, since nothing could
# build one here.
RUN --mount=type=bind,from=build,source=/dist,target=/dist \
    python -m venv --without-pip /opt/lastguard \
    && python -m pip --python /opt/lastguard/bin/python install \
       --only-binary=:all: /dist/lastguard-*.whl \
    && groupadd --system --gid 65532 nonroot \
    && useradd --system --uid 65532 --gid 65532 --no-create-home --home-dir /nonexistent \
       --shell /usr/sbin/nologin nonroot
ENV PATH=/opt/lastguard/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
# The chart runs the pod as 65532 too, with a read-only root filesystem.
USER 65532:65532
# The operator's gRPC, webhook, metrics and health ports; the sidecar's ext_authz port.
EXPOSE 15010 9443 9090 8080 9191
ENTRYPOINT ["lastguard"]
CMD ["--help"]
