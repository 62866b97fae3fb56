# syntax=docker/dockerfile:1
# serving: one image for the RayService head and workers (KubeRay runs `ray start`
# in it) and for the CLI. CPU only.
#
#   docker build -t serving:0.1.0 .                                   # sklearn + ONNX
#   docker build --build-arg FRAMEWORKS=torch,onnx -t serving:0.1.0-torch .
#   docker build --build-arg FRAMEWORKS=torch,tensorflow,onnx -t serving:0.1.0-all .
#
# Every Python package is pinned by deploy/docker/constraints.txt (the versions the
# tests ran with), so head, workers and CLI share the same Python and Ray.

ARG PYTHON_IMAGE=python:3.11.13-slim-bookworm

# --- build: a virtualenv with the package and the chosen frameworks ------------
FROM ${PYTHON_IMAGE} AS build

# Framework extras to install besides `serve`, `oci` (registry stores) and `oms` (OpenSSF model
# signatures): any of torch, tensorflow, onnx
# (comma separated, may be empty). sklearn/joblib/pickle models need none.
ARG FRAMEWORKS=onnx
ARG TORCH_VERSION=2.13.0
# NOTE: the CPU wheel index; the default PyPI torch pulls multi-GB CUDA libraries.
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu

SHELL ["/bin/bash", "-o", "pipefail", "-c"]
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1

RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:${PATH}

WORKDIR /src
COPY deploy/docker/constraints.txt /tmp/constraints.txt
RUN case ",${FRAMEWORKS}," in \
        *,torch,*) pip install --no-cache-dir --index-url "${TORCH_INDEX_URL}" "torch==${TORCH_VERSION}" ;; \
    esac

COPY pyproject.toml README.md ./
COPY serving ./serving
RUN extras="serve,oci,oms${FRAMEWORKS:+,${FRAMEWORKS}}" \
    && pip install --no-cache-dir --constraint /tmp/constraints.txt ".[${extras}]" \
    && pip check \
    && python -c "import ray, serving; print('ray', ray.__version__)"

# --- runtime -------------------------------------------------------------------
FROM ${PYTHON_IMAGE} AS runtime

SHELL ["/bin/bash", "-o", "pipefail", "-c"]

# NOTE: KubeRay's head and worker probes run `wget ... | grep success`.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends wget \
    && rm -rf /var/lib/apt/lists/*

# uid/gid 1000 as in the upstream Ray images; the chart's podSecurityContext uses it.
RUN groupadd --gid 1000 ray \
    && useradd --uid 1000 --gid 1000 --home-dir /home/ray --create-home --shell /bin/bash ray \
    && mkdir -p /var/cache/serving \
    && chown 1000:1000 /var/cache/serving

COPY --from=build /opt/venv /opt/venv

ENV PATH=/opt/venv/bin:${PATH} \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    TORCH_FORCE_WEIGHTS_ONLY_LOAD=1 \
    SERVING_CACHE_DIR=/var/cache/serving \
    SERVING_PROGRESS=false \
    HOME=/home/ray

WORKDIR /home/ray
USER 1000:1000

# 8000 Serve HTTP, 8001 OIP gRPC, 8080 Ray metrics, 8265 dashboard, 6379 GCS, 10001 Ray client.
EXPOSE 8000 8001 8080 8265 6379 10001

# KubeRay replaces the command with `ray start ...`; by hand the image is the CLI.
CMD ["serving", "--help"]
