"""The tokenizer process: chat templates, tokenization and length validation.

server --GenerateRequest/AbortRequest/FlushCacheRequest--> [tokenizer] --TokenizedRequest/...--> scheduler
Everything is handled strictly in arrival order, so an abort never overtakes its request.
Bad input becomes an `ErrorOutput` to the server (a 400 for the client), never a crash.
"""

from __future__ import annotations

import logging

import msgspec

from server import ipc
from server.config import ServerConfig
from server.process_util import IpcPaths, ModelInfo, start_child
from tokenizer_proc.tokenizer import TextTokenizer, TokenizerError

logger = logging.getLogger(__name__)


class RequestError(ValueError):
    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.message, self.param = message, param


class TokenizerWorker:
    """Turns server messages into scheduler messages (or replies); pure logic, no sockets."""

    def __init__(self, tokenizer: TextTokenizer, info: ModelInfo):
        self.tok = tokenizer
        self.info = info

    def prompt_ids(self, req: ipc.GenerateRequest) -> list[int]:
        if req.messages is not None:
            msgs = [m.to_template() for m in req.messages]
            tools = [t.to_template() for t in req.tools] if req.tools else None
            return self.tok.encode_chat(msgs, req.add_generation_prompt, req.continue_final_message, tools)
        if req.prompt_text is not None:
            return self.tok.encode(req.prompt_text)
        return list(req.prompt_ids or [])

    def tokenize_generate(self, req: ipc.GenerateRequest) -> ipc.TokenizedRequest:
        try:
            ids = self.prompt_ids(req)
        except TokenizerError as e:
            raise RequestError(str(e), "messages") from e
        limit = self.info.max_model_len
        if not ids:
            raise RequestError("the prompt is empty", "prompt")
        bad = next((t for t in ids if not 0 <= t < self.info.vocab_size), None)
        if bad is not None:
            raise RequestError(f"token id {bad} is outside the vocabulary [0, {self.info.vocab_size})", "prompt")
        if req.max_tokens is None:
            if len(ids) >= limit:
                raise RequestError(f"This model's maximum context length is {limit} tokens. However, your "
                                   f"prompt has {len(ids)} tokens, leaving no room for the completion. "
                                   f"Please reduce the length of the prompt.", "messages")
            max_new = limit - len(ids)
        else:
            if len(ids) + req.max_tokens > limit:
                raise RequestError(f"This model's maximum context length is {limit} tokens. However, you "
                                   f"requested {len(ids) + req.max_tokens} tokens ({len(ids)} in the prompt, "
                                   f"{req.max_tokens} for the completion). Please reduce the length of the "
                                   f"prompt or the completion.", "max_tokens")
            max_new = req.max_tokens
        params = msgspec.structs.replace(req.params, max_new_tokens=max_new)
        # Stop strings are detected in the detokenizer, so it must see tokens as they come.
        stream = req.stream or bool(params.stop)
        return ipc.TokenizedRequest(rid=req.rid, input_ids=ids, params=params, stream=stream)

    def tokenize(self, req: ipc.TokenizeRequest) -> ipc.TokenizeResult:
        try:
            if req.messages is not None:
                msgs = [m.to_template() for m in req.messages]
                text = self.tok.render_chat(msgs, req.add_generation_prompt)
                ids = self.tok.encode(text, add_special_tokens=req.add_special_tokens)
            else:
                ids = self.tok.encode(req.prompt or "", add_special_tokens=req.add_special_tokens)
        except TokenizerError as e:
            raise RequestError(str(e), "messages") from e
        strs = [self.tok.id_to_token(i) for i in ids] if req.return_token_strs else None
        return ipc.TokenizeResult(req.req_id, ids, self.info.max_model_len, strs)

    def detokenize(self, req: ipc.DetokenizeRequest) -> ipc.DetokenizeResult:
        bad = next((t for t in req.tokens if not 0 <= t < self.info.vocab_size), None)
        if bad is not None:
            raise RequestError(f"token id {bad} is outside the vocabulary [0, {self.info.vocab_size})", "tokens")
        return ipc.DetokenizeResult(req.req_id, self.tok.decode(req.tokens, skip_special_tokens=False))


def run_tokenizer(config: ServerConfig, paths: IpcPaths, info: ModelInfo, ready_conn) -> None:
    """Process entry point."""
    with start_child("skiff-tokenizer", config.log_level, ready_conn,
                     lambda: TokenizerWorker(TextTokenizer(info.tokenizer_path), info),
                     paths.tokenizer, ipc.TokenizerInbound, [paths.scheduler, paths.server]) as child:
        worker, inbox, (to_scheduler, to_server) = child
        while True:
            for msg in inbox.drain():
                try:
                    if isinstance(msg, ipc.GenerateRequest):
                        to_scheduler.put(worker.tokenize_generate(msg))
                    elif isinstance(msg, (ipc.AbortRequest, ipc.FlushCacheRequest)):
                        to_scheduler.put(msg)
                    elif isinstance(msg, ipc.TokenizeRequest):
                        to_server.put(worker.tokenize(msg))
                    elif isinstance(msg, ipc.DetokenizeRequest):
                        to_server.put(worker.detokenize(msg))
                except RequestError as e:
                    rid = msg.rid if isinstance(msg, ipc.GenerateRequest) else msg.req_id
                    to_server.put(ipc.ErrorOutput(rid, e.message, 400, e.param))
