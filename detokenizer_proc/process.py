"""The detokenizer process: token ids from the scheduler -> text deltas for the API server.

scheduler rank 0 --RequestStarted/BatchTokenOutput--> [detokenizer] --BatchTextOutput--> server
`RequestStarted` arrives on the same socket before a request's first tokens, so per-request state
always exists when tokens come; tokens for a request it no longer knows (finished here by a stop
string, then aborted upstream) are dropped. Other scheduler messages (stats, flush results, errors)
are forwarded to the server unchanged.

No request can end this process: an exception while starting or detokenizing one request fails
that request alone (an `ErrorOutput` with status 500 and abort_upstream, its traceback logged),
and its later tokens are dropped like those of any request it no longer knows.
"""

from __future__ import annotations

import logging
from typing import Optional, Union

from server import ipc
from server.config import ServerConfig
from server.process_util import IpcPaths, ModelInfo, start_child
from detokenizer_proc.incremental import IncrementalDetokenizer
from tokenizer_proc.tokenizer import TextTokenizer

logger = logging.getLogger(__name__)


class _ReqState:
    __slots__ = ("detok", "logprobs", "prompt_ids")

    def __init__(self, detok: IncrementalDetokenizer, logprobs: bool, prompt_ids: Optional[list[int]]):
        self.detok, self.logprobs, self.prompt_ids = detok, logprobs, prompt_ids


INTERNAL_ERROR = "internal error while detokenizing the output; the request was aborted"


class DetokenizerWorker:
    """Per-request incremental detokenization; pure logic, no sockets.

    `start` and `process` never raise for a request: a failure becomes that request's ErrorOutput.
    """

    def __init__(self, tokenizer: TextTokenizer, decode_stream: bool = True):
        self.tok = tokenizer
        # DecodeStream over the Rust tokenizer; else the Python offset algorithm over `decode`.
        self._source = tokenizer.tokenizer if decode_stream else tokenizer.decode
        self.states: dict[str, _ReqState] = {}

    def start(self, msg: ipc.RequestStarted) -> Optional[ipc.ErrorOutput]:
        """Set up the request's state; its ErrorOutput instead if that fails."""
        try:
            p = msg.params
            detok = IncrementalDetokenizer(self._source, msg.prompt_tail, p.stop, p.skip_special_tokens)
            self.states[msg.rid] = _ReqState(detok, p.logprobs or p.prompt_logprobs, msg.prompt_ids)
        except Exception:
            return self._fail(msg.rid, running=True)
        return None

    def process(self, out: ipc.TokenOutput) -> Union[ipc.TextOutput, ipc.ErrorOutput, None]:
        """The request's next text output (None when there is nothing to send yet), or its
        ErrorOutput if detokenizing failed."""
        try:
            return self._process(out)
        except Exception:
            return self._fail(out.rid, running=out.finish_reason is None)

    def _fail(self, rid: str, running: bool) -> ipc.ErrorOutput:
        logger.exception("detokenizing request %s failed; failing it", rid)
        self.states.pop(rid, None)  # its later tokens are dropped
        return ipc.ErrorOutput(rid, INTERNAL_ERROR, 500, abort_upstream=running)

    def _process(self, out: ipc.TokenOutput) -> Optional[ipc.TextOutput]:
        state = self.states.get(out.rid)
        if state is None:
            return None
        finished = out.finish_reason is not None
        ids = out.token_ids
        if (out.finish_reason == "stop" and isinstance(out.matched_stop, int) and ids
                and ids[-1] == out.matched_stop):
            ids = ids[:-1]  # the stop token's text is not part of the output (OpenAI semantics)
        delta = state.detok.feed(ids, final=finished)
        finish, matched, abort_upstream = out.finish_reason, out.matched_stop, False
        if delta.stop is not None:
            abort_upstream = not finished
            finish, matched, finished = "stop", delta.stop, True
        if finished:
            del self.states[out.rid]
        if not (finished or delta.text or state.logprobs):
            return None
        text_out = ipc.TextOutput(
            rid=out.rid, text=delta.text, token_ids=out.token_ids, finish_reason=finish,
            prompt_tokens=out.prompt_tokens, cached_tokens=out.cached_tokens,
            completion_tokens=out.completion_tokens, matched_stop=matched, abort_upstream=abort_upstream,
        )
        if state.logprobs:
            text_out.logprobs, text_out.top_logprobs = out.logprobs, out.top_logprobs
            text_out.prompt_logprobs, text_out.prompt_top_logprobs = out.prompt_logprobs, out.prompt_top_logprobs
            text_out.token_texts = self._texts(out.token_ids)
            if out.top_logprobs:
                text_out.top_token_texts = [self._texts(row.token_ids) for row in out.top_logprobs]
            if out.prompt_logprobs is not None and state.prompt_ids is not None:
                text_out.prompt_token_texts = self._texts(state.prompt_ids)
                if out.prompt_top_logprobs and any(row is not None for row in out.prompt_top_logprobs):
                    text_out.prompt_top_token_texts = [None if row is None else self._texts(row.token_ids)
                                                       for row in out.prompt_top_logprobs]
                state.prompt_ids = None  # sent once
        return text_out

    def _texts(self, ids: list[int]) -> list[str]:
        """Each token's own text (logprobs show tokens one by one, special tokens included)."""
        return [self.tok.decode([t], False) for t in ids]


def run_detokenizer(config: ServerConfig, paths: IpcPaths, info: ModelInfo, ready_conn) -> None:
    """Process entry point."""
    with start_child("skiff-detok", config.log_level, ready_conn,
                     lambda: DetokenizerWorker(TextTokenizer(info.tokenizer_path, chat=False)),
                     paths.detokenizer, ipc.SchedulerOutbound, [paths.server]) as child:
        worker, inbox, (to_server,) = child
        while True:
            texts: list[ipc.TextOutput] = []
            errors: list[ipc.ErrorOutput] = []
            # Everything queued is handled at once, so one message carries many requests' deltas.
            for msg in inbox.drain():
                if isinstance(msg, ipc.BatchTokenOutput):
                    for out in msg.outputs:
                        result = worker.process(out)
                        if isinstance(result, ipc.ErrorOutput):
                            errors.append(result)
                        elif result is not None:
                            texts.append(result)
                elif isinstance(msg, ipc.RequestStarted):
                    error = worker.start(msg)
                    if error is not None:
                        errors.append(error)
                else:
                    if texts:  # keep order: deltas before a control message that followed them
                        to_server.put(ipc.BatchTextOutput(texts))
                        texts = []
                    to_server.put(msg)
            if texts:
                to_server.put(ipc.BatchTextOutput(texts))
            for error in errors:  # after the texts: a failed request's earlier deltas stay in order
                to_server.put(error)
