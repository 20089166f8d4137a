"""The published-peak table: jax's device_kind strings map to the right chip, MFU arithmetic."""
import pytest

from t5like.parallel import hardware


@pytest.mark.parametrize('kind, name, bf16_tflops', [
    ('TPU v4', 'TPU v4', 275), ('TPU v5 lite', 'TPU v5e', 197), ('TPU v5e', 'TPU v5e', 197),
    ('TPU v5', 'TPU v5p', 459), ('TPU v5p', 'TPU v5p', 459), ('TPU v6 lite', 'TPU v6e', 918),
    ('NVIDIA A100-SXM4-80GB', 'A100 80GB', 312), ('NVIDIA A100-PCIE-40GB', 'A100 40GB', 312),
    ('NVIDIA H100 80GB HBM3', 'H100 SXM', 989), ('NVIDIA H100 PCIe', 'H100 PCIe', 756),
    ('NVIDIA H200', 'H200', 989), ('H100', 'H100 SXM', 989)])
def test_device_kinds_map_to_their_chip(kind, name, bf16_tflops):
  spec = hardware.lookup(kind)
  assert spec.name == name
  assert spec.peak_flops('bfloat16') == bf16_tflops * 1e12 == spec.peak_flops('bf16')


def test_f32_columns_and_memory():
  h100, v5e = hardware.require('NVIDIA H100 80GB HBM3'), hardware.require('TPU v5 lite')
  assert h100.peak_flops('float32') == 67e12 and h100.peak_flops('tf32') == 494.5e12
  assert v5e.peak_flops('f32') == v5e.peak_flops('bf16')   # one bf16 pass at default precision
  assert v5e.memory_bytes == 16 * 2**30 and hardware.require('NVIDIA H200').memory_bytes == 141e9
  with pytest.raises(ValueError, match='no tf32 peak'):
    v5e.peak_flops('tf32')
  with pytest.raises(ValueError, match='float16'):
    h100.peak_flops('float16')


def test_unknown_kinds_and_mfu():
  assert hardware.lookup('cpu') is None
  assert hardware.published_mfu(1e12, 'cpu', 'bfloat16') is None
  with pytest.raises(ValueError, match="'Trainium'.*known"):
    hardware.require('Trainium')
  # 4 x v4 chips at 550 TFLOP/s of model FLOPs: half of 4 x 275.
  assert hardware.published_mfu(550e12, 'TPU v4', 'bf16', num_devices=4) == pytest.approx(0.5)


def test_detect_platform(tmp_path):
  dev = tmp_path / 'dev'
  dev.mkdir()
  no_smi = lambda name: None
  assert hardware.detect_platform({}, str(dev), which=no_smi) == 'cpu'
  assert hardware.detect_platform({'COLAB_TPU_ADDR': '10.0.0.2:8470'}, str(dev), no_smi) == 'tpu'
  (dev / 'accel0').touch()
  assert hardware.detect_platform({}, str(dev), which=no_smi) == 'tpu'
  (dev / 'accel0').unlink()
  smi = tmp_path / 'nvidia-smi'
  smi.write_text('#!/bin/sh\necho "GPU 0: NVIDIA H100 80GB HBM3 (UUID: GPU-1)"\n')
  smi.chmod(0o755)
  assert hardware.detect_platform({}, str(dev), which=lambda name: str(smi)) == 'cuda'
  smi.write_text('#!/bin/sh\necho "NVIDIA-SMI has failed" >&2; exit 9\n')
  assert hardware.detect_platform({}, str(dev), which=lambda name: str(smi)) == 'cpu'


def test_jax_requirement():
  assert hardware.jax_requirement('cpu', '0.10.2') == 'jax==0.10.2'
  assert hardware.jax_requirement('cuda', '0.10.2') == 'jax[cuda12]==0.10.2'
  assert hardware.jax_requirement('tpu', '0.10.2') == 'jax[tpu]==0.10.2'
  with pytest.raises(ValueError, match="'rocm'"):
    hardware.jax_requirement('rocm', '0.10.2')


def test_progress_line_shows_both_mfus():
  from t5like.train.metrics import ProgressLine
  line = ProgressLine(100).line(10, {'loss': 2.0, 'mfu': 0.31, 'mfu_published': 0.42})
  assert 'MFU 31.0% (42.0% of published peak)' in line
