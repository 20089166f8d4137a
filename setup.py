"""t5like: T5-style Transformers in JAX/Flax with the whole optimisation toolbox."""
from setuptools import find_packages, setup

setup(
    name='t5like',
    version='0.1.0',
    description='T5-style Transformers in JAX/Flax: train, shard, prune, distil, quantise, serve.',
    python_requires='>=3.10',
    packages=find_packages(include=['t5like', 't5like.*']),
    # Compiled on first use by t5like/kernels/cpu_matmul.py.
    package_data={'t5like.kernels': ['*.cc', '*.h']},
    install_requires=[
        'jax>=0.10,<0.11',
        'flax>=0.12,<0.13',
        'optax>=0.2.8,<0.3',
        'orbax-checkpoint>=0.12,<0.13',
        'chex>=0.1.92,<0.2',
        'tensorstore>=0.1.86,<0.2',
        'absl-py>=2.1,<3',
        'ml_collections>=1.1,<2',
        'numpy>=2.0,<3',
        'safetensors>=0.8,<0.9',
        'grain>=0.2.18,<0.3',
        'sentencepiece>=0.2,<0.3',
        'matplotlib>=3.9,<4',
        'tensorboardX>=2.6,<3',
        'psutil>=7,<8',
        'qwix>=0.1.8,<0.2',
        'sacrebleu>=2.4,<3',
    ],
    extras_require={
        'dev': ['pytest>=9,<10', 'pytest-timeout>=2.3,<3', 'nbclient>=0.11,<0.12',
                'nbformat>=5.10,<6', 'ipykernel>=7,<8', 'import-linter>=2.10,<3',
                'onnx>=1.23,<1.24', 'onnxruntime>=1.32,<1.33'],
        # ONNX export (python -m t5like.infer.onnx); onnxruntime for --int8 and t5like.ort.
        'onnx': ['onnx>=1.23,<1.24', 'onnxruntime>=1.32,<1.33'],
        # Workdirs and corpora on Google Cloud Storage (gs://) through etils.epath's fsspec backend.
        'cloud': ['gcsfs>=2024.6'],
        'parity': ['torch==2.13.0', 'transformers>=5,<6'],
        # httptools and uvloop: uvicorn's C HTTP parser and event loop, used when installed; less
        # CPU per streamed token than h11 and asyncio (experiments/results/serving/ab/)
        'serve': ['fastapi>=0.115,<1', 'uvicorn>=0.30,<1', 'httptools>=0.6,<1', 'uvloop>=0.21,<1',
                  'prometheus_client>=0.21,<1',
                  'httpx>=0.28,<1', 'openai>=1.50,<4', 'flatbuffers>=24,<26',
                  'jinja2>=3.1,<4', 'pydantic>=2.7,<3'],
    },
)
