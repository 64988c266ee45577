# captioner HTTP service: gunicorn + Flask, CPU PyTorch, the bundled model inside.
#   docker build -t captioner .
#   docker run --rm -p 8000:8000 -e CAPTIONER_API_KEYS=change-me captioner
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    CAPTIONER_HOST=0.0.0.0 \
    CAPTIONER_PORT=8000 \
    CAPTIONER_THREADS=16

WORKDIR /app

# CPU-only PyTorch first (the default index would bring a multi-GB CUDA build).
RUN pip install --index-url https://download.pytorch.org/whl/cpu torch==2.14.1 torchvision==0.29.1

COPY pyproject.toml README.md ./
COPY captioner ./captioner
COPY training ./training
COPY service ./service
# Editable install: the web page and gunicorn.conf.py are used from /app/service as they are.
RUN pip install -e . \
    && test -f captioner/weights/default.pt \
    && useradd --create-home --uid 10001 captioner

USER captioner
EXPOSE 8000
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s --retries=3 \
    CMD python -c "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('CAPTIONER_PORT', '8000'), timeout=4)"

ENTRYPOINT ["gunicorn", "-c", "/app/service/gunicorn.conf.py"]
CMD ["service:create_app()"]
