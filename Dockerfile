# The t5like model server. Installed by the same script as a checkout (scripts/setup_env.sh serve:
# a virtualenv with `pip install -e .[serve]` and the corpus package without its dependencies),
# then scripts/install_jax.sh for the platform: change those scripts, and the image follows.
#
#   docker build -t t5like-serve .                                  # CPU
#   docker build -t t5like-serve:gpu --build-arg PLATFORM=cuda .    # NVIDIA GPU: jax[cuda12]; the
#                                                                   # CUDA libraries come as wheels,
#                                                                   # the host needs only the driver
#   docker run -p 8000:8000 -v $PWD/models:/models:ro -e T5LIKE_ADMIN_TOKEN=... t5like-serve
#   docker run --gpus all -p 8000:8000 -v $PWD/models:/models:ro t5like-serve:gpu
#
# Nothing pins the platform at run time (no JAX_PLATFORMS): jax uses the GPU when the image has
# jax[cuda12] and the container was given one (`--gpus all`), else the CPU. The server runs as the
# non-root user t5like (uid 10001); mounted model folders need only be readable by it (files
# mode o+r, or run with `--user "$(id -u):$(id -g)"`: every path the server writes is writable
# by any uid). Port 8000: HTTP (OpenAI-compatible /v1, /admin, /health/live, /health/ready,
# /metrics).
FROM python:3.11-slim

ARG PLATFORM=cpu
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 \
    T5LIKE_VENV=/opt/venv T5LIKE_KERNEL_CACHE=/opt/t5like-kernels
ENV PATH=/opt/venv/bin:$PATH

# g++ builds the CPU decoding kernels (t5like/kernels); kept so a host with another CPU rebuilds them.
RUN apt-get update && apt-get install -y --no-install-recommends g++ \
 && rm -rf /var/lib/apt/lists/*
RUN useradd --create-home --uid 10001 t5like
WORKDIR /app
COPY setup.py README.md BUILD.md ./
COPY scripts/setup_env.sh scripts/install_jax.sh ./scripts/
COPY t5like ./t5like
RUN bash scripts/setup_env.sh serve \
 && bash scripts/install_jax.sh "$PLATFORM" \
 && mkdir -p "$T5LIKE_KERNEL_CACHE" /models \
 && python -c "from t5like.kernels import library; print('cpu kernels built:', library.available())" \
 && chmod -R a+rwX "$T5LIKE_KERNEL_CACHE" && chown t5like /models

USER t5like
EXPOSE 8000
VOLUME ["/models"]
# Readiness, with room for a loaded server: each probe may take 30 s (a busy event loop answers
# late, not never), three misses in a row mark the container unhealthy, and the first 10 minutes
# (model loading and compilation) do not count.
HEALTHCHECK --interval=30s --timeout=30s --start-period=600s --retries=3 \
  CMD python -c "import sys, urllib.request; sys.exit(urllib.request.urlopen('http://127.0.0.1:8000/health/ready', timeout=25).status != 200)"
STOPSIGNAL SIGTERM
# Inside a container the server must listen beyond loopback for the published port to reach it.
ENTRYPOINT ["python", "-m", "t5like.serve", "--model_base_path=/models", "--host=0.0.0.0", "--port=8000"]
