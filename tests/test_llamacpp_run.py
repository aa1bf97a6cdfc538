"""`serving.engine: llamacpp` end to end on the real default model (small subsets): GGUF
candidates quantized by llama.cpp, quality against the llama.cpp F32 baseline, the engine noise
floor, and economics measured on llama.cpp's own processes."""

from __future__ import annotations

import pytest

pytest.importorskip("llama_cpp")

from quantgate.config import RunConfig, check_supported  # noqa: E402
from quantgate.errors import UserError  # noqa: E402
from quantgate.record import build_record  # noqa: E402
from quantgate.run import execute  # noqa: E402

SMALL = {
    "serving": {"engine": "llamacpp"},
    "evaluation": {"limit": 16, "cloze_items": 16, "ppl_windows": 2, "window_tokens": 128},
    "economics": {"requests": 2, "prompt_tokens": 32, "new_tokens": 16},
    "quality_gate": {"min_items": 10},
}


@pytest.fixture(scope="module")
def result(tmp_path_factory):
    cfg = RunConfig.model_validate({**SMALL, "candidates": [{"method": "gguf", "type": "Q8_0"},
                                                             {"method": "gguf", "type": "Q2_K"}]})
    return execute(cfg, workdir=tmp_path_factory.mktemp("work"))


@pytest.mark.slow
@pytest.mark.heavy
def test_quality_follows_the_bits_and_q8_holds(result):
    q8, q2 = result.candidates
    assert (q8.name, q2.name) == ("gguf-Q8_0", "gguf-Q2_K")
    assert q8.comparison.kld.mean < q2.comparison.kld.mean
    assert q8.comparison.top1_agreement > q2.comparison.top1_agreement
    assert q8.weight_bytes < result.baseline.weight_bytes / 3  # 8-bit blocks vs float32
    assert q8.comparison.kld.mean < 0.02


@pytest.mark.slow
@pytest.mark.heavy
def test_noise_floor_is_measured_and_small(result):
    floor = result.noise_floor
    assert (floor.engine, floor.reference) == ("llamacpp", "torch float32")
    assert floor.kld.size == 2 * 127
    assert floor.kld.mean() < 1e-3 and floor.top1_agree.mean() > 0.97


@pytest.mark.slow
@pytest.mark.heavy
def test_economics_are_measured_on_the_engine(result):
    for m in [result.baseline, *result.candidates]:
        e = m.economics
        assert e.engine == "llamacpp" and not e.simulated
        assert e.artifact_bytes == m.artifact.stat().st_size == m.weight_bytes
        assert e.throughput.decode_tokens_per_s.value > 0 and 0 < e.roofline_fraction
        assert e.peak_rss_bytes.value < e.artifact_bytes + (600 << 20)
    record = build_record(result)
    assert record.noise_floor.kld_mean < 1e-3
    assert record.candidates[0].economics.decode_tokens_per_s > 0
    assert len(record.candidates[0].artifact.sha256) == 64


def test_gguf_candidates_need_the_llamacpp_engine_and_a_known_type():
    with pytest.raises(UserError, match="runs on serving.engine llamacpp"):
        check_supported(RunConfig.model_validate({"candidates": [{"method": "gguf", "type": "Q4_K_M"}]}))
    with pytest.raises(UserError, match="runs on serving.engine torch"):
        check_supported(RunConfig.model_validate({**SMALL, "candidates": [{"method": "rtn", "bits": 4}]}))
    for bad in ({"method": "gguf"}, {"method": "gguf", "type": "Q9_Z"}, {"method": "gguf", "type": "Q8_0", "bits": 4}):
        with pytest.raises(ValueError, match="gguf"):
            RunConfig.model_validate({"candidates": [bad]})
    cand = RunConfig.model_validate({"candidates": [{"method": "gguf", "type": "Q4_K_M", "imatrix": True}]}).candidates[0]
    assert (cand.label, cand.quantized_bits) == ("gguf-Q4_K_M-imatrix", 4)
