"""Export an evaluated candidate as an artifact a serving engine loads, with a manifest beside it,
and verify an artifact against its manifest and its gate run.

  codes.py     integer codes, scales and zero points read back exactly from fake-quantized weights
  formats.py   gguf (the evaluated file), compressed-tensors (packed, vLLM's layout), hf (dense)
  stored.py    a stored run's inputs (config, baseline, eval set, calibration), checked, and its
               candidates made again
  manifest.py  quantgate-manifest.json
  build.py     `quantgate export`
  verify.py    `quantgate verify`
"""
