"""The tokenizer process: chat templates, tokenization and length validation.

server --GenerateRequest/AbortRequest/FlushCacheRequest--> [tokenizer] --TokenizedRequest/...--> scheduler
Everything is handled strictly in arrival order, so an abort never overtakes its request.
No request can end this process: bad input becomes an `ErrorOutput` to the server (a 400 for the
client), and an unexpected exception while handling one message an `ErrorOutput` with status 500
(its traceback logged); the process then goes on with the next message.
"""

from __future__ import annotations

import logging
from typing import NamedTuple, Optional, Union

import msgspec

from server import ipc
from server.config import ServerConfig
from server.process_util import IpcPaths, ModelInfo, start_child
from server.validation import InvalidParam, check_token_ids
from tokenizer_proc.tokenizer import TextTokenizer, TokenizerError, resolve_chat_template

logger = logging.getLogger(__name__)


RequestError = InvalidParam  # what the tokenizer rejects: a 400 for the client


ToScheduler = Union[ipc.TokenizedRequest, ipc.AbortRequest, ipc.FlushCacheRequest]
ToServer = Union[ipc.TokenizeResult, ipc.DetokenizeResult, ipc.ErrorOutput]


class Routed(NamedTuple):
    """What handling one inbound message produced: at most one message for each destination."""

    to_scheduler: Optional[ToScheduler] = None
    to_server: Optional[ToServer] = None


INTERNAL_ERROR = "internal error in the tokenizer; the request was not run"


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
        check_token_ids(ids, self.info.vocab_size, "prompt")
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
        return ipc.DetokenizeResult(req.req_id, self.tok.decode(req.tokens, skip_special_tokens=False))


    def handle(self, msg: ipc.TokenizerInbound) -> Routed:
        """Handle one message; never raises for a request (its failure becomes an ErrorOutput)."""
        try:
            if isinstance(msg, ipc.GenerateRequest):
                return Routed(to_scheduler=self.tokenize_generate(msg))
            if isinstance(msg, (ipc.AbortRequest, ipc.FlushCacheRequest)):
                return Routed(to_scheduler=msg)
            if isinstance(msg, ipc.TokenizeRequest):
                return Routed(to_server=self.tokenize(msg))
            if isinstance(msg, ipc.DetokenizeRequest):
                return Routed(to_server=self.detokenize(msg))
            raise TypeError(f"unexpected message {type(msg).__name__}")
        except RequestError as e:
            return Routed(to_server=ipc.ErrorOutput(_reply_id(msg), e.message, 400, e.param))
        except Exception:
            logger.exception("failed to handle %s %s", type(msg).__name__, _reply_id(msg))
            return Routed(to_server=ipc.ErrorOutput(_reply_id(msg), INTERNAL_ERROR, 500))


def _reply_id(msg) -> str:
    """The id the server waits on: `rid` for requests and aborts, `req_id` for control calls."""
    return getattr(msg, "rid", None) or getattr(msg, "req_id", "")


def build_worker(config: ServerConfig, info: ModelInfo) -> TokenizerWorker:
    """The worker for this server: the model's tokenizer with --chat-template when given."""
    template = resolve_chat_template(config.chat_template) if config.chat_template else None
    return TokenizerWorker(TextTokenizer(info.tokenizer_path, chat_template=template), info)


def run_tokenizer(config: ServerConfig, paths: IpcPaths, info: ModelInfo, ready_conn) -> None:
    """Process entry point."""
    with start_child("skiff-tokenizer", config.log_level, ready_conn, lambda: build_worker(config, info),
                     paths.tokenizer, ipc.TokenizerInbound, [paths.scheduler, paths.server]) as child:
        worker, inbox, (to_scheduler, to_server) = child
        while True:
            for msg in inbox.drain():
                routed = worker.handle(msg)
                if routed.to_scheduler is not None:
                    to_scheduler.put(routed.to_scheduler)
                if routed.to_server is not None:
                    to_server.put(routed.to_server)
