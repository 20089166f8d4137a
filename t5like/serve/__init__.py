"""Model server: bundles, a versioned model registry, the OpenAI-compatible HTTP API, metrics.

  python -m t5like.serve --model_base_path=models/      (see t5like/serve/__main__.py)
  python -m t5like.serve.bundle --workdir=... --out=models/<name>/<version>
"""
