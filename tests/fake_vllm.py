"""A stand-in for vLLM's OpenAI server, for the fast tests of quantgate's vLLM launcher
(engines/vllm.py). Not vLLM: `make test-vllm` runs the real one.

It takes vLLM's command line (`-m vllm.entrypoints.openai.api_server --model DIR
--served-model-name NAME --host H --port P --dtype D ...`, unknown options ignored), loads DIR in D
with plain transformers (compressed-tensors checkpoints included) and answers /health, /v1/models (with the
checkpoint's "root", as vLLM does) and /v1/completions in vLLM's layout, computed by the model
(test_openai_engine.TinyServer; streamed generation with transformers' generate). It starts a child process in its own
process group, as vLLM starts its engine core, so that stopping the group can be checked.

Environment: FAKE_VLLM=crash exits at once with an error line; FAKE_VLLM=hang never answers
/health. FAKE_VLLM_PIDS: a file each server appends "<pid> <child pid>" to; a server that finds
another one's pid still alive appends "OVERLAP" (two servers at once).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))


def wrapper(directory: Path) -> Path:
    """An executable that stands where vLLM's interpreter would ($QUANTGATE_VLLM_PYTHON,
    launch.python): it runs this fake with the arguments it is given."""
    path = directory / "vllm-python"
    path.write_text(f'#!/bin/sh\nexec "{sys.executable}" "{Path(__file__).resolve()}" "$@"\n')
    path.chmod(0o755)
    return path


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def record_pids(path: str, *pids: int) -> None:
    log = Path(path)
    earlier = [int(p) for line in (log.read_text().splitlines() if log.exists() else []) for p in line.split()
               if p.isdigit()]
    with open(log, "a") as f:
        if any(alive(p) for p in earlier):
            f.write("OVERLAP\n")
        f.write(" ".join(map(str, pids)) + "\n")


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("-m")
    parser.add_argument("--model", required=True)
    parser.add_argument("--served-model-name", required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--dtype", default="float32")
    args, _ = parser.parse_known_args()
    mode = os.environ.get("FAKE_VLLM", "")
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(3600)"])  # "the engine core"
    if os.environ.get("FAKE_VLLM_PIDS"):
        record_pids(os.environ["FAKE_VLLM_PIDS"], os.getpid(), child.pid)
    print(f"fake vLLM serving {args.model} as {args.served_model_name} on port {args.port}", flush=True)
    if mode == "crash":
        print("RuntimeError: the fake engine core failed to start", flush=True)
        return 1
    import torch
    from test_openai_engine import TinyServer, _json, serve
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(1)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=getattr(torch, args.dtype)).eval()
    scored = TinyServer(model)

    def completions(method: str, path: str, body: dict):
        if not body.get("stream"):
            return scored(method, path, body)
        with torch.inference_mode():  # greedy with a KV cache: the load sweep sends many of these
            out = model.generate(torch.tensor([body["prompt"]]), max_new_tokens=body["max_tokens"], do_sample=False,
                                 eos_token_id=2, pad_token_id=0)[0, len(body["prompt"]):].tolist()
        events = [{"choices": [{"text": f"<{t}>"}]} for t in out]
        events.append({"choices": [], "usage": {"completion_tokens": len(out)}})
        data = "".join(f"data: {json.dumps(e)}\n\n" for e in events) + "data: [DONE]\n\n"
        return 200, {"Content-Type": "text/event-stream"}, data.encode()
    listed = _json({"object": "list", "data": [{"id": args.served_model_name, "root": args.model}]})

    def answer(method: str, path: str, body: dict):
        if path == "/health":
            return None if mode == "hang" else (200, {}, b"")
        if path.endswith("/models"):
            return listed
        return completions(method, path, body)

    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *a: stop.set())
    with serve(answer, port=args.port):
        stop.wait()
    return 0


if __name__ == "__main__":
    sys.exit(main())
