# captioner HTTP service: gunicorn + Flask, CPU PyTorch, the bundled model inside.
#   docker build -t captioner .
#   docker run --rm -p 8000:8000 -e CAPTIONER_API_KEYS=change-me captioner
#
# Build arguments; the defaults are the public ones:
#   BASE_IMAGE       a Python 3.11 image with `python` and `pip` on PATH   (python:3.11-slim)
#   PIP_INDEX_URL    the package index for everything but PyTorch          (PyPI)
#   TORCH_INDEX_URL  the index torch and torchvision come from             (PyTorch's CPU-only index)
# docker/smoke-test.sh builds this file with buildah from a Debian base and local wheels, runs it
# and checks it (README, "Container").
ARG BASE_IMAGE=python:3.11-slim
FROM ${BASE_IMAGE}

ARG PIP_INDEX_URL=https://pypi.org/simple
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    CAPTIONER_HOST=0.0.0.0 \
    CAPTIONER_PORT=8000 \
    CAPTIONER_THREADS=16

WORKDIR /app

# PyTorch first, from its CPU-only index (PyPI's torch is a multi-GB CUDA build).
RUN pip install --index-url "$TORCH_INDEX_URL" torch==2.14.1 torchvision==0.29.1

# Only the package, its model and the service: no tests, data, benchmarks or docs (.dockerignore).
COPY pyproject.toml README.md ./
COPY captioner ./captioner
COPY training ./training
COPY service ./service
# Editable install: the web page and gunicorn.conf.py are used from /app/service as they are.
# Readable by the service's user whatever the modes in the build context (a checkpoint written
# through a temporary file is 0600), and owned by root, so the service cannot change its code.
RUN chmod -R a+rX /app \
    && pip install --index-url "$PIP_INDEX_URL" -e . \
    && test -f captioner/weights/default.pt \
    && useradd --create-home --uid 10001 captioner

USER captioner
EXPOSE 8000
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s --retries=3 \
    CMD python -c "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('CAPTIONER_PORT', '8000'), timeout=4)"

ENTRYPOINT ["gunicorn", "-c", "/app/service/gunicorn.conf.py"]
CMD ["service:create_app()"]
