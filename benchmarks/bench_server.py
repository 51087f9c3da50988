"""Serving speed: this project's server against its own `generate`, and mlx-lm's server running
mlx-lm's HunYuan model, all on the same random quantized weights.

Builds a model of the release's structure from random weights (as `bench_generate.py` does) and
writes it once as a checkpoint in mlx-lm's layout (`switch_mlp` experts, `model_type: hunyuan`),
which both projects load: this project fuses the experts' gate and up projections at load time,
mlx-lm builds its own `models.hunyuan`. Without `--tokenizer-dir` the checkpoint gets a synthetic
tokenizer of the release's size (256 bytes, then letter strings, then the 210 special tokens):
random weights make any text, and only the token counts matter here.

Then, for each of `--systems`, one after the other (one model in memory at a time): `ours` (this
server as it starts by default: continuous batching), `ours_queue` (one request at a time,
`--decode-concurrency 1`), `ours_kv8` (batching KV caches quantized to 8 bits from the first
token), `mlxlm` (mlx-lm's server, which batches, running mlx-lm's model) and
`mlxlm_ours` (mlx-lm's server running this project's model: the same shards, under a config
naming this project's model file, `--trust-remote-code`):
- `generate`'s decode tokens/s: `python -m hunyuan_mlx.generate` / `python -m mlx_lm generate`,
  greedy, `--gen` tokens after a `--prompt-tokens` prompt, as their `--verbose` output reports it
  (once per project);
- the server (`python -m hunyuan_mlx.server` / `python -m mlx_lm server`) on a free port; after
  an untimed round at the most clients (a GPU compiles kernels for each new batch shape at first
  use), for each of `--clients`, that many clients at once each stream a completion of `--gen`
  tokens after a distinct prompt: one client's decode tokens/s (tokens after the first, over
  the time from the first streamed token to the last; their sum, and its ratio to one client's
  in the summary), the aggregate tokens/s (all clients' completion tokens over the wall time
  from the first request to the last reply), and the clients' times to first token (mean and
  max: how long the last admitted waits).

One JSON line per measurement on stdout (and in `--out`), then one summary line. Full shape, GPU:

    python -m benchmarks.bench_server --out $OUT/bench_server.jsonl

Tiny shape on a CPU (a minute or two):

    python -m benchmarks.bench_server --tiny
"""

from __future__ import annotations

import argparse
import base64
import http.client
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import mlx.core as mx
from mlx.utils import tree_flatten

from benchmarks import a13b as bg
from hunyuan_mlx.cli import run_main
from hunyuan_mlx.interrupts import signals_as_interrupts
from hunyuan_mlx.mlx_lm_model import add_model_file
from hunyuan_mlx.tokenizer import TIKTOKEN_FILE, write_tokenizer_json
from hunyuan_mlx.tokenizer.hunyuan import SPECIAL_TOKEN_NAMES

ROOT = Path(__file__).resolve().parents[1]
TINY = {
    "layers": 2,
    "width_scale": 0.0625,
    "experts": 8,
    "vocab": 4096,
    "prompt_tokens": 64,
    "gen": 16,
}
TOKENIZER_FILES = ("hy.tiktoken", "tokenizer_config.json", "generation_config.json")
SYNTHETIC_TEMPLATE = (
    "{% for m in messages %}<|startoftext|>{{ m['content'] }}<|extra_0|>{% endfor %}"
)
LETTERS = b"abcdefghijklmnopqrstuvwxyz"
CONNECT_ATTEMPTS = 10
JSON_HEADERS = {"Content-Type": "application/json"}
# system -> (server command, the `generate` it is compared with: the project and its checkpoint)
SYSTEMS = {
    "ours": (["hunyuan_mlx.server"], "ours"),  # batching, as it starts by default
    "ours_queue": (["hunyuan_mlx.server", "--decode-concurrency", "1"], "ours"),
    # KV caches quantized to 8 bits from the first token: batched here, one at a time elsewhere.
    "ours_kv8": (["hunyuan_mlx.server", "--kv-bits", "8", "--quantized-kv-start", "0"], "ours"),
    "mlxlm": (["mlx_lm", "server"], "mlxlm"),
    "mlxlm_ours": (["mlx_lm", "server", "--trust-remote-code"], "mlxlm_ours"),
}
# The checkpoint directory of each `generate` project: mlx-lm's server refuses a config naming a
# model file unless trusted, so this project's model for it lives in a directory of its own.
MODEL_DIRS = {"ours": "model", "mlxlm": "model", "mlxlm_ours": "model_ours_for_mlxlm"}
STATS_RE = re.compile(r"Generation: (\d+) tokens, ([\d.]+) tokens-per-sec")


def synthetic_ranks(n_ordinary: int) -> list[bytes]:
    """`n_ordinary` BPE tokens: the 256 bytes, then letter strings, each one letter longer than
    a token before it (so every token is a merge of two earlier ones)."""
    tokens = [bytes([b]) for b in range(256)]
    frontier = [bytes([b]) for b in LETTERS]
    while len(tokens) < n_ordinary:
        frontier = [t + bytes([b]) for t in frontier for b in LETTERS]
        tokens += frontier[: n_ordinary - len(tokens)]
    return tokens


def write_tokenizer(directory: Path, vocab_size: int, source: Path | None) -> None:
    """The release's tokenizer files from `source`, or a synthetic tokenizer of `vocab_size`;
    plus the tokenizer.json mlx-lm loads."""
    if source is not None:
        for name in TOKENIZER_FILES:
            shutil.copyfile(source / name, directory / name)
    else:
        ranks = synthetic_ranks(vocab_size - len(SPECIAL_TOKEN_NAMES))
        lines = [f"{base64.b64encode(t).decode()} {i}" for i, t in enumerate(ranks)]
        (directory / TIKTOKEN_FILE).write_text("\n".join(lines) + "\n")
        config = {"chat_template": SYNTHETIC_TEMPLATE, "eos_token": "<|eos|>"}
        (directory / "tokenizer_config.json").write_text(json.dumps(config))
        eos = len(ranks) + SPECIAL_TOKEN_NAMES.index("<|eos|>")
        generation = {"eos_token_id": eos, "do_sample": False}
        (directory / "generation_config.json").write_text(json.dumps(generation))
    write_tokenizer_json(directory / TIKTOKEN_FILE, directory / "tokenizer.json")


def mlx_lm_layout(name: str, value: mx.array, inter: int) -> dict[str, mx.array]:
    """One of this project's tensors under mlx-lm's names (gate and up apart, `switch_mlp`)."""
    if ".mlp.experts.gate_up_proj." in name:
        gate = name.replace("experts.gate_up_proj", "switch_mlp.gate_proj")
        up = name.replace("experts.gate_up_proj", "switch_mlp.up_proj")
        return {gate: mx.contiguous(value[:, :inter]), up: mx.contiguous(value[:, inter:])}
    return {name.replace(".mlp.experts.", ".mlp.switch_mlp."): value}


def write_checkpoint(directory: Path, cfg: dict, args) -> float:
    """Random weights (bench_generate's) as a checkpoint both projects load; returns its GB."""
    model = bg.build_ours(cfg, args)
    quantization = bg.quantization_dict(args)
    for key, entry in quantization.items():
        if isinstance(entry, dict):  # mlx-lm takes per-module entries as they are
            quantization[key] = {"group_size": args.group_size, "mode": "affine", **entry}
    (directory / "config.json").write_text(json.dumps({**cfg, "quantization": quantization}))
    size = 0
    parts = [(f"model.layers.{i}.", layer) for i, layer in enumerate(model.model.layers)]
    top = {k: v for k, v in tree_flatten(model.parameters()) if not k.startswith("model.layers.")}
    for n, (prefix, layer) in enumerate(parts):
        inter = layer.mlp.experts.intermediate_size if "experts" in layer.mlp else 0
        tensors: dict[str, mx.array] = {}
        for k, v in tree_flatten(layer.parameters()):
            tensors.update(mlx_lm_layout(prefix + k, v, inter))
        mx.save_safetensors(str(directory / f"model-{n:05d}.safetensors"), tensors)
        size += sum(v.nbytes for v in tensors.values())
    mx.save_safetensors(str(directory / f"model-{len(parts):05d}.safetensors"), top)
    size += sum(v.nbytes for v in top.values())
    del model, top, parts
    mx.clear_cache()
    return size / bg.GB


def with_model_file(source: Path, directory: Path) -> None:
    """`source`'s checkpoint in `directory` (its files linked, not copied) under a config naming
    this project's model file, for mlx-lm's tools (`hunyuan_mlx.mlx_lm_model`)."""
    directory.mkdir(exist_ok=True)
    for file in source.iterdir():
        if file.name != "config.json":
            (directory / file.name).symlink_to(file)
    shutil.copyfile(source / "config.json", directory / "config.json")
    add_model_file(directory)


def prompt_text(client: int, n_tokens: int) -> str:
    """A distinct prompt of about `n_tokens` tokens (three-letter words: one token each with the
    synthetic tokenizer, about one with the release's)."""
    words = [
        bytes([LETTERS[(client + 7 * i) % 26], LETTERS[(3 * i) % 26], LETTERS[(i // 26) % 26]])
        for i in range(n_tokens // 2)
    ]
    return " ".join(w.decode() for w in words)


def run_generate(project: str, model_dir: Path, args) -> dict:
    """`generate`'s decode speed, from its verbose report."""
    module = ["hunyuan_mlx.generate", "--verbose"] if project == "ours" else ["mlx_lm", "generate"]
    if project == "mlxlm_ours":
        module.append("--trust-remote-code")
    command = [
        sys.executable,
        "-m",
        *module,
        "--model",
        str(model_dir),
        "--prompt",
        prompt_text(0, args.prompt_tokens),
        "--ignore-chat-template",
        "--max-tokens",
        str(args.gen),
        "--temp",
        "0",
    ]
    out = subprocess.run(command, capture_output=True, text=True, env=child_env(), check=True)
    found = STATS_RE.search(out.stdout + out.stderr)
    if found is None:
        raise RuntimeError(f"no generation stats in:\n{out.stdout}\n{out.stderr}")
    return {"completion_tokens": int(found.group(1)), "decode_tps": float(found.group(2))}


def child_env() -> dict[str, str]:
    """The environment for the processes: this checkout's hunyuan_mlx first."""
    path = os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])
    return {**os.environ, "PYTHONPATH": path}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(system: str, model_dir: Path, port: int, log_file: Path, timeout: float):
    """A server process, once its /health answers."""
    command = [sys.executable, "-m", *SYSTEMS[system][0], "--model", str(model_dir)]
    command += ["--port", str(port)]
    with open(log_file, "w") as sink:
        process = subprocess.Popen(command, stdout=sink, stderr=subprocess.STDOUT, env=child_env())
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{system} server exited:\n{log_file.read_text()}")
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
            conn.request("GET", "/health")
            if conn.getresponse().status == 200:
                return process
        except OSError:
            pass
        time.sleep(0.5)
    process.terminate()
    raise RuntimeError(f"{system} server did not start within {timeout} s")


def stream_completion(port: int, model: str, prompt: str, gen: int) -> dict:
    """One streamed completion: token counts and the times of its first and last tokens."""
    body = {
        "model": model,
        "prompt": prompt,
        "max_tokens": gen,
        "temperature": 0.0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    start = time.perf_counter()
    for attempt in range(CONNECT_ATTEMPTS):
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=3600)
        try:
            conn.request("POST", "/v1/completions", json.dumps(body), JSON_HEADERS)
            response = conn.getresponse()
            break
        except (ConnectionResetError, ConnectionRefusedError):
            # A server whose listen backlog is full resets new connections: try again.
            conn.close()
            if attempt == CONNECT_ATTEMPTS - 1:
                raise
            time.sleep(0.2)
    if response.status != 200:
        raise RuntimeError(f"HTTP {response.status}: {response.read()[:500]!r}")
    first = last = None
    chunks = 0
    usage = None
    for raw in response:
        line = raw.decode().strip()
        if not line.startswith("data: ") or line == "data: [DONE]":
            continue
        event = json.loads(line[6:])
        if event.get("usage"):
            usage = event["usage"]
        for choice in event.get("choices", []):
            if choice.get("text"):
                last = time.perf_counter()
                first = first or last
                chunks += 1
    end = time.perf_counter()
    conn.close()
    tokens = usage["completion_tokens"] if usage else chunks
    return {
        "start": start,
        "end": end,
        "first": first,
        "last": last,
        "completion_tokens": tokens,
        "prompt_tokens": usage["prompt_tokens"] if usage else None,
        "connect_attempts": attempt + 1,
    }


def measure_clients(port: int, model: str, clients: int, args, round_index: int) -> dict:
    """`clients` streamed completions at once: aggregate and per-client decode tokens/s."""
    results: list[dict] = [{} for _ in range(clients)]

    def client(i: int) -> None:
        prompt = prompt_text(1 + i + 100 * round_index, args.prompt_tokens)
        results[i] = stream_completion(port, model, prompt, args.gen)

    # Daemons: an interrupted run does not wait for its clients' streams.
    threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if any(not r for r in results):
        raise RuntimeError("a client failed")
    wall = max(r["end"] for r in results) - min(r["start"] for r in results)
    total = sum(r["completion_tokens"] for r in results)
    decode = [
        (r["completion_tokens"] - 1) / (r["last"] - r["first"])
        for r in results
        if r["last"] is not None and r["last"] > r["first"]
    ]
    ttft = [r["first"] - r["start"] for r in results if r["first"] is not None]
    return {
        "aggregate_tps": total / wall,
        "client_decode_tps_mean": sum(decode) / len(decode) if decode else None,
        "decode_tps_sum": sum(decode),  # the clients' decode speeds together
        "ttft_s_mean": sum(ttft) / len(ttft) if ttft else None,
        "ttft_s_max": max(ttft, default=None),
        "completion_tokens": total,
        "prompt_tokens": results[0]["prompt_tokens"],
        "wall_s": wall,
        "connect_retries": sum(r["connect_attempts"] - 1 for r in results),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    bg.add_model_args(ap)
    ap.add_argument("--tiny", action="store_true", help=f"CPU-sized defaults: {TINY}")
    ap.add_argument("--prompt-tokens", type=int, default=512)
    ap.add_argument("--gen", type=int, default=128, help="tokens generated per request")
    ap.add_argument(
        "--clients",
        type=bg.int_list,
        default=[1, 2, 4, 8, 16],
        help="concurrent clients per measurement",
    )
    ap.add_argument("--systems", default=",".join(SYSTEMS), help=f"of {', '.join(SYSTEMS)}")
    ap.add_argument("--no-generate", action="store_true", help="the servers only")
    ap.add_argument("--tokenizer-dir", default=None, help="the release's tokenizer files")
    ap.add_argument(
        "--work-dir",
        default=None,
        help="where the checkpoint goes and is kept (default: a temporary directory); one "
        "written there by an earlier run is used again",
    )
    ap.add_argument("--startup-timeout", type=float, default=1800)
    ap.add_argument("--out", default=None, help="also write the JSON lines here")
    if ap.parse_known_args()[0].tiny:
        ap.set_defaults(**TINY)  # flags given explicitly still win
    args = ap.parse_args()
    unknown = set(args.systems.split(",")) - set(SYSTEMS)
    if unknown:
        ap.error(f"--systems: unknown {', '.join(sorted(unknown))} (of {', '.join(SYSTEMS)})")
    sink = open(args.out, "w") if args.out else None
    mx.random.seed(args.seed)
    cfg = bg.release_config(args)
    args._layers = cfg["num_hidden_layers"]
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="bench_server."))
    model_dir = work / "model"
    model_dir.mkdir(parents=True, exist_ok=True)
    head = {"device": bg.device_name(), "versions": bg.versions(), "argv": sys.argv[1:]}
    bg.log({"kind": "setup", **head, "shape": {k: cfg[k] for k in bg.PER_LAYER_LISTS}}, sink)

    if (work / MODEL_DIRS["mlxlm_ours"]).exists():  # an earlier run's, in --work-dir
        bg.log({"kind": "checkpoint", "reused": str(model_dir)}, sink)
    else:
        t = time.perf_counter()
        size = write_checkpoint(model_dir, cfg, args)
        source = Path(args.tokenizer_dir) if args.tokenizer_dir else None
        write_tokenizer(model_dir, cfg["vocab_size"], source)
        with_model_file(model_dir, work / MODEL_DIRS["mlxlm_ours"])
        bg.log({"kind": "checkpoint", "gb": size, "s": time.perf_counter() - t}, sink)

    clients = args.clients
    found: dict[tuple[str, str, int], dict] = {}
    try:
        for system in args.systems.split(","):
            project = SYSTEMS[system][1]
            system_dir = work / MODEL_DIRS[project]
            if not args.no_generate and (project, "generate", 1) not in found:
                record = run_generate(project, system_dir, args)
                found[(project, "generate", 1)] = record
                bg.log({"kind": "generate", "system": project, **record}, sink)
            port = free_port()
            log_file = work / f"{system}_server.log"
            process = start_server(system, system_dir, port, log_file, args.startup_timeout)
            try:
                # Warm-up: one untimed round at the most clients, so that no timed round pays
                # for the kernels a new batch shape compiles (a GPU compiles them at first use).
                measure_clients(port, str(system_dir), max(clients), args, len(clients))
                for round_index, n in enumerate(clients):
                    record = measure_clients(port, str(system_dir), n, args, round_index)
                    found[(system, "server", n)] = record
                    bg.log({"kind": "server", "system": system, "clients": n, **record}, sink)
            finally:
                process.terminate()
                process.wait(timeout=60)
    finally:
        if args.work_dir is None:
            shutil.rmtree(work, ignore_errors=True)

    summary: dict = {"kind": "summary"}
    for system in args.systems.split(","):
        one = found.get((system, "server", 1))
        gen = found.get((SYSTEMS[system][1], "generate", 1))
        if one and gen and one["client_decode_tps_mean"]:
            summary[f"{system}_server_vs_generate_decode"] = (
                one["client_decode_tps_mean"] / gen["decode_tps"]
            )
        for n in clients:
            if (system, "server", n) in found:
                record = found[(system, "server", n)]
                summary[f"{system}_aggregate_tps_{n}"] = record["aggregate_tps"]
                if one and one["decode_tps_sum"]:  # issue 24's scaling: against one client
                    summary[f"{system}_decode_vs_one_client_{n}"] = (
                        record["decode_tps_sum"] / one["decode_tps_sum"]
                    )
    bg.log(summary, sink)


if __name__ == "__main__":
    # Ctrl-C, SIGTERM and SIGHUP run the clean-up (the server process stopped, the temporary
    # checkpoint removed) and end in one line, as this project's commands do.
    with run_main("bench_server"), signals_as_interrupts():
        main()
