"""Artifact formats: write a candidate as a file a serving engine loads, and load it back.

- gguf: the very file the llama.cpp engine evaluated, copied byte for byte.
- compressed-tensors: integer weights packed with their scales (and zero points) in the layout
  vLLM loads, written with the compressed-tensors library:
    * weight-only candidates (rtn, gptq, awq; W{bits}A16) -> "pack-quantized": codes packed into
      int32 words, float scales per group ("group" strategy) or per output row ("channel"), zero
      points packed likewise when asymmetric.
    * W8A8 candidates (smoothquant, w8a8) -> "int-quantized": int8 weights with per-channel
      scales, and input activations int8, symmetric, *dynamic per token* (one scale per token,
      max|x| / 127, computed at run time). Dynamic because that is what was evaluated: quantgate
      fake-quantizes each linear's input with its own per-token absmax and stores no activation
      scales. SmoothQuant's smoothing factors are already folded into the norms (and the
      linears' columns), so the smoothed model's weights are what is written.
  Linears outside the candidate's targets (lm_head, unless quantized) and every other tensor are
  stored densely in the export dtype (default_dtype: float16 for W{bits}A16, float32 for W8A8).
- hf: a plain Hugging Face directory of the dequantized weights (float32 by default: the exact
  weights that were evaluated).

compressed-tensors stores codes on a signed grid: [-2^(b-1), 2^(b-1) - 1] with signed zero
points. quantgate's asymmetric codes [0, 2^b - 1] and zero points [0, 2^b - 1] are shifted by
2^(b-1), which leaves every q - z unchanged.

Loading back (load_torch_artifact): transformers reads the directory on CPU in float32; packed
modules are decompressed to dense float32 weights (bit-identical to the evaluated ones, the float16
scales widening exactly), and W8A8 input quantization is installed as quantgate evaluates it.
(compressed-tensors' own Python forward divides by 127.5 instead of 127; vLLM's int8 kernel and
quantgate use 127.)
"""

from __future__ import annotations

import copy
import json
import re
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from quantgate.errors import NotSupportedYet, UserError
from quantgate.methods.registry import ComposeConfig, MethodConfig
from quantgate.methods.rtn import QuantizedWeight, QuantSpec, dequantize
from quantgate.methods.smoothquant import fake_quantize_activations

if TYPE_CHECKING:
    from quantgate.record import RunRecord

FORMATS = ("gguf", "onnx", "compressed-tensors", "hf")
# Formats exported as the very artifact their engine evaluated (copied, checked by sha256); the
# engine is the one whose registry entry loads the format (engines.registry.loader_of).
EVALUATED = ("gguf", "onnx")
DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
WEIGHTS_FILE = "model.safetensors"
# W8A8 input activations as quantgate evaluates them (methods/smoothquant.fake_quantize_activations).
W8A8_INPUTS = {"num_bits": 8, "type": "int", "symmetric": True, "strategy": "token", "dynamic": True}


def default_dtype(fmt: str, cand: MethodConfig) -> str:
    """Storage dtype of the tensors that are not integer-coded, when --dtype is not given:
    float16 for weight-only compressed-tensors checkpoints (the serving size; the round trip
    stays below 1e-4 KLD), float32 otherwise. hf holds the dequantized weights, exact only in
    float32; W8A8 candidates re-round every activation to int8 per token, which turns any float16
    rounding of the other tensors into a different model (on the default model even float16
    layer-0 norms alone move the smoothquant candidate by a mean KLD of 0.016)."""
    w8a8 = cand.quantizer is not None and cand.quantizer.activation_bits
    return "float16" if fmt == "compressed-tensors" and not w8a8 else "float32"


def torch_scheme(cand: MethodConfig, fmt: str, dtype: str, targets: list[str], ignore: list[str]) -> dict[str, Any]:
    """The manifest's explicit scheme of a torch-evaluated candidate written as `fmt`: what was
    quantized how (weights as compressed-tensors QuantizationArgs; None for a pruned-only
    candidate), the input quantization applied at run time, and the storage dtype of the rest."""
    q = cand.quantizer
    w8a8 = q is not None and bool(q.activation_bits)
    weights = q and {"num_bits": q.bits, "type": "int", "symmetric": bool(q.symmetric),
                     "strategy": "group" if q.group_size else "channel", "group_size": q.group_size}
    steps = cand.steps if isinstance(cand, ComposeConfig) else None  # (qat's steps are training steps)
    return {
        "method": q.method if q is not None else cand.method,
        "bits": q and q.bits,
        "group_size": q and q.group_size,
        "symmetric": q and q.symmetric,
        "steps": [s.label for s in steps] if steps else None,
        "format": ("int-quantized" if w8a8 else "pack-quantized") if fmt == "compressed-tensors" else "dense",
        "weights": weights,
        "input_activations": dict(W8A8_INPUTS) if w8a8 else None,
        "dtype": dtype, "targets": targets, "ignore": ignore,
    }


def gguf_scheme(cand: MethodConfig) -> dict[str, Any]:
    """The manifest's scheme of a llama.cpp candidate: llama.cpp's file type, nominal bits."""
    return {"method": cand.method, "bits": cand.quantized_bits, "group_size": None, "symmetric": None,
            "format": "gguf", "gguf_type": cand.type, "imatrix": cand.imatrix, "input_activations": None}


# -- writing -------------------------------------------------------------------------------------


def copy_gguf(source: Path, out: Path, name: str) -> list[Path]:
    """The evaluated GGUF file copied into `out` as `name` (a name that says what it holds)."""
    out.mkdir(parents=True, exist_ok=True)
    target = out / name
    shutil.copyfile(source, target)
    return [target]


def artifact_name(record: RunRecord, candidate: str) -> str:
    """What an export holds, as a file or directory name: the model, the candidate (its label
    names method, bits, group ...) and the run that gated it, e.g.
    smollm2-135m-instruct.gguf-Q4_K_M.run-20261206T073526Z-34ea3e50. The manifest states all of it
    explicitly; the name is for people listing a directory."""
    model = Path(record.model.base).name.removesuffix(".gguf") or "model"
    return re.sub(r"[^A-Za-z0-9._+-]", "_", f"{model}.{candidate}.run-{record.run_id}")


# Who loads each format: the oldest release known to load it and why (None: see the note), for
# the manifest's "loaders". Versions that actually loaded the artifact are recorded beside them.
LOADERS: dict[str, dict[str, tuple[str | None, str]]] = {
    "compressed-tensors": {
        "transformers": ("4.45.0", "first release with the compressed-tensors quantizer; it also needs the "
                                   "compressed-tensors package at or above the version that wrote the config"),
        "vllm": ("0.5.0", "first release with compressed-tensors W4A16 / W8A8-int8 kernels; not loaded at "
                          "export: quantgate verify serves it when $QUANTGATE_VLLM_PYTHON names vLLM's interpreter"),
    },
    "hf": {"transformers": (None, "any release that implements the model's architecture (config.json model_type); "
                                  "plain safetensors weights")},
    "gguf": {"llama.cpp": (None, "the build that evaluated it (llama-cpp-python version below) or newer; older "
                                 "builds may lack its file type or its tokenizer's pre-tokenizer")},
    "onnx": {"onnxruntime": (None, "the release that evaluated it or newer (MatMulNBits with accuracy_level, "
                                   "GroupQueryAttention: com.microsoft contrib operators)")},
}


def loaders(fmt: str, verified: dict[str, str | None]) -> dict[str, dict[str, str | None]]:
    """The manifest's "loaders": per loader, its minimum version (where no older one is known to
    work: the version that loaded this artifact here), why, and the version that loaded it back
    here (None: not loaded here)."""
    return {name: {"min_version": low or verified.get(name), "why": why, "verified_with": verified.get(name)}
            for name, (low, why) in LOADERS[fmt].items()}


def write_hf(model: torch.nn.Module, tokenizer, out: Path, dtype: str) -> list[Path]:
    """A plain HF directory (safetensors, config, generation config, tokenizer) of `model`, whose
    floating tensors are cast to `dtype`. `model` is the caller's own copy (it is cast in place)."""
    out.mkdir(parents=True, exist_ok=True)
    model.to(DTYPES[dtype])
    model.save_pretrained(out, safe_serialization=True)
    _edit_config(out, {})
    tokenizer.save_pretrained(out)
    return sorted(out.glob("*.safetensors"))


def write_compressed_tensors(model: torch.nn.Module, tokenizer, codes: dict[str, QuantizedWeight],
                             scheme: dict[str, Any], out: Path) -> list[Path]:
    """A compressed-tensors directory: each module of `codes` (name -> its exact codes) packed in
    scheme["format"], every other tensor dense in scheme["dtype"]; config.json carries the
    quantization_config. Each packed module is decompressed again and compared with the
    model's weight bit for bit before anything is written."""
    from compressed_tensors.compressors import BaseCompressor, ModelCompressor
    from safetensors.torch import save_file

    ct_scheme = _ct_scheme(scheme)
    compressor = BaseCompressor.get_value_from_registry(scheme["format"])
    dtype = DTYPES[scheme["dtype"]]
    tensors: dict[str, torch.Tensor] = {}
    for name, q in codes.items():
        weight = model.get_submodule(name).weight.detach()
        packed = compressor.compress(_ct_state(q), ct_scheme)
        back = compressor.decompress({**packed, "weight_scale": packed["weight_scale"].float()}, ct_scheme)["weight"]
        if not torch.equal(back.float(), weight.float()):
            raise UserError(f"{name}: the {scheme['format']} packing does not reproduce the evaluated weight")
        # float16 scales are exact in float16 and float32, not in bfloat16 (8 significand bits): kept as they are
        packed["weight_scale"] = packed["weight_scale"].to(torch.float16 if dtype == torch.bfloat16 else dtype)
        tensors.update({f"{name}.{k}": v.contiguous() for k, v in packed.items()})
    skip = {f"{name}.weight" for name in codes}
    tensors.update({k: v.to(dtype) if v.is_floating_point() else v
                    for k, v in _stored_tensors(model).items() if k not in skip})
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out / WEIGHTS_FILE), metadata={"format": "pt"})
    config = copy.deepcopy(model.config)
    config.dtype = scheme["dtype"]
    config.save_pretrained(out)
    ModelCompressor(quantization_config=_ct_config(ct_scheme, scheme)).update_config(str(out))
    _edit_config(out, _dequantize_at_load(scheme))
    model.generation_config.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return [out / WEIGHTS_FILE]


def _dequantize_at_load(scheme: dict[str, Any]) -> dict[str, Any]:
    """What config.json's quantization_config needs so that plain transformers loads the
    checkpoint. Asymmetric pack-quantized: compressed-tensors 0.20's compressed-load path
    allocates zero points unpacked [out, groups] while its own compressor (and vLLM) store them
    packed [out / (32 / bits), groups], so transformers 5.24 + compressed-tensors 0.20 stop with
    a size mismatch; `dequantize: true` makes transformers decompress at load with the
    compressor's own decompress instead (transformers 5.19 + compressed-tensors 0.17 load either
    way; vLLM does not read the key)."""
    weights = scheme["weights"] or {}
    if scheme["format"] == "pack-quantized" and weights.get("symmetric") is False:
        return {"quantization_config": {"dequantize": True}}
    return {}


def legacy_fields(config: dict[str, Any]) -> dict[str, Any]:
    """Top-level keys older loaders read where transformers 5 writes rope_parameters: rope_theta
    (transformers 4.x otherwise silently uses 10000) and, for a rope that is not the default,
    rope_scaling with the same parameters (4.x's name for them)."""
    rope = config.get("rope_parameters")
    if not isinstance(rope, dict) or "rope_theta" not in rope:
        return {}
    out = {"rope_theta": rope["rope_theta"]}
    if rope.get("rope_type", "default") != "default":
        out["rope_scaling"] = {k: v for k, v in rope.items() if k != "rope_theta"}
    return out


def _edit_config(out: Path, updates: dict[str, Any]) -> None:
    """config.json in `out` with legacy_fields and `updates` (one level of dicts merged) added."""
    path = out / "config.json"
    config = json.loads(path.read_text(encoding="utf-8"))
    for key, value in {**legacy_fields(config), **updates}.items():
        config[key] = {**config.get(key, {}), **value} if isinstance(value, dict) and key in config else value
    path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def check_ct_shapes(model: torch.nn.Module, names: list[str], spec: QuantSpec) -> None:
    """compressed-tensors groups must tile the columns; refuse a group size that does not divide."""
    for name in names:
        cols = model.get_submodule(name).weight.shape[1]
        if spec.group_size is not None and cols % spec.group_size:
            raise NotSupportedYet(f"compressed-tensors export of {name}: group_size {spec.group_size} does not "
                                  f"divide its {cols} input columns (the format has no shorter last group)")


def _ct_scheme(scheme: dict[str, Any]):
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme

    weights = {k: v for k, v in scheme["weights"].items() if v is not None}
    inputs = scheme["input_activations"]
    return QuantizationScheme(targets=["Linear"], weights=QuantizationArgs(**weights),
                              input_activations=QuantizationArgs(**inputs) if inputs else None,
                              format=scheme["format"])


def _ct_config(ct_scheme, scheme: dict[str, Any]):
    from compressed_tensors.quantization import QuantizationConfig

    return QuantizationConfig(config_groups={"group_0": ct_scheme}, format=scheme["format"],
                              quantization_status="compressed", ignore=list(scheme["ignore"]))


def _ct_state(q: QuantizedWeight) -> dict[str, torch.Tensor]:
    """A module's state as compressed-tensors' compressors take it: the exact float32 weight,
    float32 scales [out, n_groups] and, asymmetric, int8 zero points on the signed grid."""
    state = {"weight": dequantize(q), "weight_scale": q.scales.float()}
    if q.zeros is not None:
        state["weight_zero_point"] = (q.zeros - 2 ** (q.spec.bits - 1)).to(torch.int8)
    return state


def _stored_tensors(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The state dict without tied duplicates (named_parameters keeps a shared tensor's first name)
    and without non-persistent buffers."""
    state = model.state_dict()
    keep = {n for n, _ in model.named_parameters()} | {n for n, _ in model.named_buffers() if n in state}
    return {k: v.detach() for k, v in state.items() if k in keep}


# -- loading back ----------------------------------------------------------------------------------


def load_torch_artifact(directory: Path, scheme: dict[str, Any]) -> torch.nn.Module:
    """An exported compressed-tensors or hf directory as a float32 CPU model that computes what
    the evaluated candidate computed. transformers loads it (compressed modules dequantized by
    compressed-tensors at load); the packed modules' weights are then decompressed once more with
    their scales widened to float32, so (q - z) · s is the exact float32 product (transformers
    multiplies in the scales' stored dtype), and the scheme's input quantization is installed."""
    from transformers import AutoConfig, AutoModelForCausalLM

    packed = scheme["format"] in ("pack-quantized", "int-quantized")
    try:
        config = AutoConfig.from_pretrained(str(directory))
        if packed:  # dequantize at load (compressed-tensors' lazy path cannot read packed zero points)
            config.quantization_config = {**config.quantization_config, "dequantize": True}
        model = AutoModelForCausalLM.from_pretrained(str(directory), config=config, dtype=torch.float32,
                                                     use_safetensors=True)
    except (OSError, ValueError) as e:
        raise UserError(f"{directory}: cannot load the exported model: {str(e).splitlines()[0]}") from None
    if packed:
        _exact_weights(model, directory / WEIGHTS_FILE, scheme)
    if scheme.get("input_activations"):
        hook = _input_quantizer(scheme["input_activations"])
        for name in scheme["targets"]:
            model.get_submodule(name).register_forward_pre_hook(hook)
    return model.eval()


def load_plain(directory: Path) -> torch.nn.Module:
    """The export as a user loads it: AutoModelForCausalLM.from_pretrained(directory) in float32,
    nothing else (no config edits, no weights replaced, no hooks). UserError naming the directory
    and the loader's versions when it cannot be loaded."""
    import transformers

    try:
        model = transformers.AutoModelForCausalLM.from_pretrained(str(directory), dtype=torch.float32)
    except (OSError, ValueError, RuntimeError, KeyError, TypeError) as e:
        raise UserError(f"{directory}: plain transformers {loader_versions()} cannot load it: "
                        f"{str(e).strip().splitlines()[0]}") from None
    return model.eval()


def loader_versions() -> str:
    """"transformers X + compressed-tensors Y": what load_plain loaded with."""
    import importlib.metadata

    import transformers

    try:
        ct = importlib.metadata.version("compressed-tensors")
    except importlib.metadata.PackageNotFoundError:
        ct = "not installed"
    return f"{transformers.__version__} + compressed-tensors {ct}"


def _exact_weights(model: torch.nn.Module, path: Path, scheme: dict[str, Any]) -> None:
    """Overwrite each target's weight with its float32 decompression from the file at `path`."""
    from compressed_tensors.compressors import BaseCompressor
    from safetensors import safe_open

    ct_scheme = _ct_scheme(scheme)
    compressor = BaseCompressor.get_value_from_registry(scheme["format"])
    with safe_open(str(path), framework="pt") as f, torch.no_grad():
        keys = set(f.keys())
        for name in scheme["targets"]:
            state = {k[len(name) + 1:]: f.get_tensor(k) for k in keys if k.rsplit(".", 1)[0] == name}
            state["weight_scale"] = state["weight_scale"].float()
            model.get_submodule(name).weight.copy_(compressor.decompress(state, ct_scheme)["weight"])


def _input_quantizer(args: dict[str, Any]):
    """The forward pre-hook that quantizes a linear's input as `args` (compressed-tensors
    QuantizationArgs as a dict) says; only what quantgate evaluates is accepted."""
    expected = {**W8A8_INPUTS, "num_bits": args.get("num_bits")}
    if {k: args.get(k) for k in expected} != expected or not 2 <= args["num_bits"] <= 16:
        raise NotSupportedYet(f"input activation quantization {args} (quantgate applies int, symmetric, "
                              "dynamic per-token)")
    bits = int(args["num_bits"])

    def hook(_module: torch.nn.Module, inputs: tuple) -> tuple:
        return (fake_quantize_activations(inputs[0], bits=bits), *inputs[1:])

    return hook
