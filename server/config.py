"""One configuration dataclass for the whole server, built from the command line.

Every process receives the same `ServerConfig` (it is a msgspec-encodable dataclass), so a flag
means the same thing everywhere. Flag names follow vLLM / SGLang where those exist.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
from dataclasses import dataclass, field
from typing import Optional, Sequence

EMBEDDED_MODEL_NAME = "SmolLM2-135M-Instruct"


@dataclass
class ServerConfig:
    # --- model ---
    model: Optional[str] = None  # None: the embedded SmolLM2-135M-Instruct
    tokenizer: Optional[str] = None  # default: the model's own (dummy configs: the embedded one)
    served_model_name: Optional[str] = None
    chat_template: Optional[str] = None  # a file path or an inline Jinja template
    load_format: str = "auto"  # auto | dummy
    dtype: str = "auto"  # auto | float32 | bfloat16 | float16
    device: str = "auto"  # auto | cpu | cuda
    max_model_len: Optional[int] = None
    seed: int = 0
    # --- HTTP ---
    host: str = "127.0.0.1"
    port: int = 8000
    api_key: Optional[str] = None
    disable_playground: bool = False
    graceful_shutdown_timeout: float = 15.0
    # --- engine ---
    tp_size: int = 1
    page_size: int = 1
    chunked_prefill_size: Optional[int] = None  # default: 8192 on CUDA, 2048 on CPU
    max_running_requests: int = 1024
    max_queued_requests: Optional[int] = None
    schedule_conservativeness: float = 1.0
    stream_interval: int = 1
    max_total_tokens: Optional[int] = None
    mem_fraction_static: float = 0.85
    attention_backend: str = "auto"  # auto | flashinfer | triton | torch
    disable_radix_cache: bool = False
    disable_overlap: bool = False
    disable_cuda_graph: bool = False
    disable_triton_gemv: bool = False
    disable_pdl: bool = False
    cuda_graph_max_bs: Optional[int] = None
    num_threads: Optional[int] = None  # CPU: torch intra-op threads (default: all cores)
    # --- multi-node tensor parallelism ---
    nnodes: int = 1
    node_rank: int = 0
    dist_init_addr: Optional[str] = None
    # --- data parallelism (server/dp.py) ---
    dp_size: int = 1
    router_policy: str = "cache_aware"
    # --- speculative decoding ---
    speculative_algorithm: Optional[str] = None  # None | ngram
    speculative_num_draft_tokens: int = 4
    speculative_prompt_lookup_max: int = 4
    speculative_prompt_lookup_min: int = 2
    log_level: str = "info"

    @property
    def local_tp_ranks(self) -> range:
        """The TP ranks whose scheduler processes run on this node."""
        per_node = self.tp_size // self.nnodes
        return range(self.node_rank * per_node, (self.node_rank + 1) * per_node)

    @property
    def model_name(self) -> str:
        """The name clients must send in `model`."""
        if self.served_model_name:
            return self.served_model_name
        return self.model or EMBEDDED_MODEL_NAME

    def replace(self, **changes) -> "ServerConfig":
        return dataclasses.replace(self, **changes)


_HELP = {
    "model": "Hugging Face model directory or hub id, or a config.json / directory with "
    f"--load-format dummy. Default (or {EMBEDDED_MODEL_NAME}): the embedded SmolLM2-135M-Instruct.",
    "tokenizer": "Tokenizer directory or hub id, if not the model's own "
    "(default for dummy configs without a tokenizer: the embedded SmolLM2 tokenizer).",
    "chat_template": "Chat template for /v1/chat/completions and /tokenize, instead of the tokenizer's "
    "own: a Jinja file path or the template itself inline (anything containing '{{', '{%%' or '{#'). "
    "Checked at start-up: a template that does not compile stops the server.",
    "served_model_name": "The model name clients send and /v1/models lists (default: --model).",
    "load_format": "auto: real weights; dummy: seeded random weights from the config.",
    "dtype": "Weight and activation dtype. auto: bfloat16 on GPU, bfloat16 on CPU (fastest there).",
    "device": "auto (cuda when available), cpu or cuda.",
    "max_model_len": "Context length (prompt + output). Default: the model's own.",
    "seed": "Seed for dummy weights and for requests without their own seed.",
    "host": "Address to listen on.",
    "port": "Port to listen on.",
    "api_key": "Require 'Authorization: Bearer <key>' on every /v1 request.",
    "disable_playground": "Do not serve the browser playground at / (and its files under /static); "
    "both answer 404 instead.",
    "graceful_shutdown_timeout": "Seconds in-flight requests may keep running after SIGTERM/SIGINT "
    "before they are aborted.",
    "tp_size": "Tensor-parallel degree: one scheduler process per rank.",
    "page_size": "Tokens per KV page.",
    "chunked_prefill_size": "Token budget of one step; longer prompts are prefilled in chunks "
    "(default: 8192 on a GPU, where it keeps the prefill GEMMs efficient; 2048 on CPU).",
    "max_running_requests": "Most requests running at once (fewer when the KV pool cannot also hold their "
    "expected output).",
    "max_queued_requests": "Most requests waiting for a batch; one more gets 503 with Retry-After "
    "(default: no limit).",
    "schedule_conservativeness": "Scales the KV admission sets aside for running requests' expected "
    "output (the share of max_tokens finished requests used). Lower admits more requests at the risk of "
    "retracting some when the pool runs dry; raise it if requests are retracted often; 0 reserves "
    "prompt pages only.",
    "stream_interval": "Streaming requests get their new tokens every this many tokens (the first one at once): "
    "1 streams each token as soon as it is sampled; larger values trade smoothness for throughput.",
    "max_total_tokens": "KV pool size in tokens (default: from --mem-fraction-static).",
    "mem_fraction_static": "Fraction of device memory for weights plus KV pool.",
    "attention_backend": "auto, flashinfer, triton or torch.",
    "disable_radix_cache": "Do not reuse KV across requests.",
    "disable_overlap": "Run the plain schedule -> run -> process loop (no CPU/GPU overlap).",
    "disable_cuda_graph": "Run decode eagerly, without CUDA graphs.",
    "disable_triton_gemv": "Batch-1 decode uses cuBLAS for every projection instead of the Triton GEMV "
    "for the large ones.",
    "disable_pdl": "Launch the Triton kernels without programmatic dependent launch (on Hopper and newer "
    "each one otherwise starts while the kernel before it finishes).",
    "cuda_graph_max_bs": "Largest decode batch captured in a CUDA graph (default: sized to the GPU).",
    "num_threads": "CPU only: torch threads per scheduler process (default: the cores left after the "
    "other server processes, split across TP ranks; in-process engines use all cores).",
    "nnodes": "Machines the TP group spans; each runs `python -m server` with the same flags and its own "
    "--node-rank. Node 0 serves HTTP and runs the tokenizer and detokenizer; the others run only their "
    "share of the --tp scheduler ranks.",
    "node_rank": "This machine's index among --nnodes (0 serves HTTP).",
    "dist_init_addr": "host:port of node 0 where the ranks of a multi-node TP group meet (torch.distributed "
    "TCP rendezvous; NCCL on GPUs, gloo on CPU). Needed with --nnodes > 1.",
    "dp_size": "Data-parallel replicas: above 1, start this many servers (each on its own GPUs, or on "
    "its share of the CPU cores) behind sglang-router on --host/--port (needs the `router` extra).",
    "router_policy": "How sglang-router picks a replica when --dp-size > 1: cache_aware (the replica whose "
    "prefix cache most likely holds the prompt, unless loads are unbalanced), round_robin, random or "
    "power_of_two (the less loaded of two random replicas).",
    "speculative_algorithm": "Speculative decoding: ngram drafts by prompt lookup (the tokens that followed "
    "the latest earlier occurrence of the last n tokens of prompt + output) and the model verifies them, "
    "several tokens per step where text repeats. Greedy requests without logprobs, penalties, logit_bias, "
    "min_tokens or grammar are drafted; others decode one token at a time. CPU, or CUDA with "
    "--disable-overlap --disable-cuda-graph, for now (default: off).",
    "speculative_num_draft_tokens": "Most draft tokens verified per request and step.",
    "speculative_prompt_lookup_max": "ngram: longest n-gram matched (vLLM's prompt_lookup_max).",
    "speculative_prompt_lookup_min": "ngram: shortest n-gram matched (vLLM's prompt_lookup_min).",
    "log_level": "debug, info, warning or error.",
}

_ALIASES = {"tp_size": ["--tp", "--tensor-parallel-size"], "dp_size": ["--dp", "--data-parallel-size"]}
_CHOICES = {
    "load_format": ["auto", "dummy"],
    "dtype": ["auto", "float32", "bfloat16", "float16"],
    "device": ["auto", "cpu", "cuda"],
    "attention_backend": ["auto", "flashinfer", "triton", "torch"],
    "log_level": ["debug", "info", "warning", "error"],
    "router_policy": ["cache_aware", "round_robin", "random", "power_of_two"],
    "speculative_algorithm": ["ngram"],
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m server", description="Skiff: an OpenAI-compatible LLM server."
    )
    for f in dataclasses.fields(ServerConfig):
        flags = ["--" + f.name.replace("_", "-")] + _ALIASES.get(f.name, [])
        if f.type in ("bool", bool):
            parser.add_argument(*flags, dest=f.name, action="store_true", help=_HELP[f.name])
            continue
        base = str(f.type).replace("Optional[", "").rstrip("]")
        kind = {"int": int, "float": float}.get(base, str)
        parser.add_argument(
            *flags, dest=f.name, type=kind, default=f.default, choices=_CHOICES.get(f.name),
            help=_HELP[f.name] + (f" (default: {f.default})" if f.default not in (None, False) else ""),
        )
    return parser


def speculative_config_error(cfg: ServerConfig) -> Optional[str]:
    """Why the speculative-decoding settings are invalid, or None (device combinations are the
    engine's to judge, once the device is known)."""
    if cfg.speculative_algorithm is None:
        return None
    if cfg.speculative_algorithm != "ngram":
        return f"--speculative-algorithm {cfg.speculative_algorithm!r} is not supported (choices: ngram)"
    if cfg.speculative_num_draft_tokens < 1:
        return "--speculative-num-draft-tokens must be >= 1"
    if not 1 <= cfg.speculative_prompt_lookup_min <= cfg.speculative_prompt_lookup_max:
        return "--speculative-prompt-lookup-min must be >= 1 and <= --speculative-prompt-lookup-max"
    return None


def parse_args(argv: Optional[Sequence[str]] = None) -> ServerConfig:
    ns = build_parser().parse_args(argv)
    cfg = ServerConfig(**vars(ns))
    if cfg.model == EMBEDDED_MODEL_NAME and not os.path.exists(cfg.model):
        # The embedded model's name selects it explicitly (compose passes --model=${SKIFF_MODEL:-<name>}).
        cfg = cfg.replace(model=None)
    chunk = cfg.chunked_prefill_size
    if (cfg.page_size < 1 or (chunk is not None and chunk < 1) or cfg.max_running_requests < 1
            or cfg.stream_interval < 1 or (cfg.max_queued_requests is not None and cfg.max_queued_requests < 0)):
        raise SystemExit("--page-size, --chunked-prefill-size, --max-running-requests and --stream-interval "
                         "must be >= 1, --max-queued-requests >= 0")
    if cfg.dp_size < 1:
        raise SystemExit("--dp-size must be >= 1")
    if cfg.nnodes < 1 or not 0 <= cfg.node_rank < cfg.nnodes:
        raise SystemExit("--nnodes must be >= 1 and --node-rank in [0, --nnodes)")
    if cfg.nnodes > 1:
        if cfg.tp_size % cfg.nnodes:
            raise SystemExit(f"--tp {cfg.tp_size} must be a multiple of --nnodes {cfg.nnodes}")
        if not cfg.dist_init_addr or ":" not in cfg.dist_init_addr:
            raise SystemExit("--nnodes > 1 needs --dist-init-addr HOST:PORT (node 0's address)")
        if cfg.dp_size > 1:
            raise SystemExit("--dp-size > 1 with --nnodes > 1 is not supported: run a router over "
                             "multi-node servers instead")
    if not cfg.schedule_conservativeness >= 0:
        raise SystemExit("--schedule-conservativeness must be >= 0")
    spec_error = speculative_config_error(cfg)
    if spec_error is not None:
        raise SystemExit(spec_error)
    if cfg.chat_template is not None:
        # Checked here so a bad flag fails before the model loads (jinja2 only, no torch).
        from tokenizer_proc.tokenizer import ChatTemplateError, compile_chat_template, resolve_chat_template

        try:
            compile_chat_template(resolve_chat_template(cfg.chat_template))
        except ChatTemplateError as e:
            raise SystemExit(f"--chat-template: {e}") from None
    return cfg


def to_argv(cfg: ServerConfig) -> list[str]:
    """Command-line flags that `parse_args` turns back into `cfg` (the fields that differ from
    their defaults): how the data-parallel supervisor hands its config to each replica."""
    argv: list[str] = []
    for f in dataclasses.fields(ServerConfig):
        value = getattr(cfg, f.name)
        if value == f.default:
            continue
        flag = "--" + f.name.replace("_", "-")
        argv += [flag] if value is True else [f"{flag}={value}"]
    return argv


__all__ = ["ServerConfig", "build_parser", "parse_args", "to_argv", "speculative_config_error", "EMBEDDED_MODEL_NAME",
           "field"]
