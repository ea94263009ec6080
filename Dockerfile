# syntax=docker/dockerfile:1
# POLAR image search: one image for the API (`polar serve`) and the Celery worker.
#   CPU (default):  docker build -t polar-search .
#   CUDA:           docker build --build-arg TORCH_VARIANT=cu128 -t polar-search:cuda .
#   No PyTorch index reachable (PyPI only; CUDA wheels, several GB bigger):
#                   docker build --build-arg TORCH_INDEX_URL=https://pypi.org/simple -t polar-search .
# TORCH_VARIANT is the suffix of a PyTorch wheel index (https://download.pytorch.org/whl/<variant>):
# `cpu` keeps the image small (no CUDA libraries); `cu126`, `cu128`, ... match a host driver.
# PYTHON_IMAGE: any Debian-based Python 3.11 with `python` and venv (the smoke test's stand-in).
ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS builder
ARG TORCH_VARIANT=cpu
ARG TORCH_VERSION=2.14.1
ARG TORCHVISION_VERSION=0.29.1
# Where torch comes from; the variant's index unless told otherwise.
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/${TORCH_VARIANT}
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH
# torch comes first, from its variant's index; the dependency step below then keeps that build.
RUN python -m venv /opt/venv \
    && pip install --no-cache-dir --index-url "${TORCH_INDEX_URL}" \
        "torch==${TORCH_VERSION}" "torchvision==${TORCHVISION_VERSION}"
WORKDIR /app
# The dependencies and the build backend alone (read from pyproject.toml): no code in this
# stage, so that a code change reuses the whole venv, here and where the runtime copies it.
COPY pyproject.toml ./
RUN python -c "import tomllib; p = tomllib.load(open('pyproject.toml', 'rb')); print('\n'.join(p['project']['dependencies'] + p['build-system']['requires']))" > /tmp/requirements.txt \
    && pip install --no-cache-dir -r /tmp/requirements.txt

FROM ${PYTHON_IMAGE} AS runtime
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    POLAR_DATA_DIR=/data \
    POLAR_MODEL__CACHE_DIR=/models \
    POLAR_HOST=0.0.0.0 \
    POLAR_PORT=8000 \
    HF_HOME=/models/huggingface \
    TORCH_HOME=/models/torch \
    XDG_CACHE_HOME=/models/cache
RUN groupadd --system --gid 10001 polar \
    && useradd --system --uid 10001 --gid polar --home-dir /app --shell /usr/sbin/nologin polar \
    && mkdir -p /data /models \
    && chown polar:polar /data /models
COPY --from=builder /opt/venv /opt/venv
WORKDIR /app
COPY . .
# Editable, so that the code, alembic.ini and migrations/ stay together under /app; offline (the
# build backend is in the venv) and a few KB, so that a code change costs seconds, not a copy of
# the multi-GB venv.
RUN pip install --no-cache-dir --no-deps --no-build-isolation -e .
# Numeric, so that Kubernetes runAsNonRoot can verify it.
USER 10001:10001
# Named volumes mounted here start with the ownership set above.
VOLUME ["/data", "/models"]
EXPOSE 8000
# slim has no curl: ask /healthz with the Python that is already there.
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('POLAR_PORT', '8000'), timeout=4)"]
CMD ["polar", "serve", "--host", "0.0.0.0"]
