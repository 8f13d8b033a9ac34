"""Point-to-point links between pipeline stages (``torch.distributed`` send/recv: NCCL or gloo).

Each rank of stage ``s`` receives the step message and the hidden states from the rank with the same
tensor rank in stage ``s - 1`` and sends both on to stage ``s + 1``: tensor ranks hold identical hidden
states after each all-reduce, so the ``tp`` links carry them in parallel and no stage broadcasts. The
last stage's tensor rank 0 sends the logits back to rank 0, which samples. Sends are asynchronous
(``isend``): a stage goes on with the next batch while the previous one is still on the wire, which is
what lets rank 0 keep several batches in flight.
"""
from __future__ import annotations

from collections import deque

import torch
import torch.distributed as dist

from runtime.worker.parallel import Topology
from runtime.worker.wire import rows

_FIRST = 256  # int64s in a message's first transfer: [length, message[:_FIRST - 1]]; longer ones send the rest
_TAG_MESSAGE, _TAG_HIDDEN, _TAG_LOGITS = 1, 2, 3


class StageLinks:
    def __init__(self, topo: Topology, device: torch.device, dtype: torch.dtype, hidden_size: int, vocab: int):
        self.topo, self.device, self.dtype, self.hidden_size, self.vocab = topo, device, dtype, hidden_size, vocab
        self._sends: deque = deque()  # in-flight isends and the tensors they read (kept alive until done)

    def send_next(self, message: torch.Tensor, hidden: torch.Tensor | None) -> None:
        """The step and this stage's output to the same tensor rank of the next stage."""
        dst = self.topo.peer(self.topo.stage + 1)
        first = torch.zeros(_FIRST, dtype=torch.int64)
        head = message[:_FIRST - 1]
        first[0], first[1:1 + head.numel()] = message.numel(), head
        parts = [(first, _TAG_MESSAGE)]
        if message.numel() > _FIRST - 1:
            parts.append((message[_FIRST - 1:].contiguous(), _TAG_MESSAGE))
        if hidden is not None:
            parts.append((hidden.contiguous(), _TAG_HIDDEN))
        for t, tag in parts:
            t = t.to(self.device)
            self._sends.append((dist.isend(t, dst, tag=tag), t))
        self._reap()

    def recv_prev(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The next step's message and, for a step with tokens, the previous stage's hidden states."""
        src = self.topo.peer(self.topo.stage - 1)
        first = torch.empty(_FIRST, dtype=torch.int64, device=self.device)
        dist.recv(first, src, tag=_TAG_MESSAGE)
        first = first.cpu()
        n = int(first[0])
        message = first[1:1 + n]
        if n > _FIRST - 1:
            rest = torch.empty(n - _FIRST + 1, dtype=torch.int64, device=self.device)
            dist.recv(rest, src, tag=_TAG_MESSAGE)
            message = torch.cat([first[1:], rest.cpu()])
        tokens, _ = rows(message)
        hidden = None
        if tokens:
            hidden = torch.empty(tokens, self.hidden_size, dtype=self.dtype, device=self.device)
            dist.recv(hidden, src, tag=_TAG_HIDDEN)
        return message, hidden

    def send_logits(self, logits: torch.Tensor) -> None:
        """The last stage's leader: the step's float32 logits to rank 0."""
        t = logits.contiguous().to(self.device)
        self._sends.append((dist.isend(t, 0, tag=_TAG_LOGITS), t))
        self._reap()

    def recv_logits(self, message: torch.Tensor) -> PendingLogits:
        """Rank 0: post the receive of a step's logits now; ``PendingLogits.result()`` waits for them."""
        _, n = rows(message)
        buf = torch.empty(n, self.vocab, dtype=torch.float32, device=self.device)
        work = dist.irecv(buf, self.topo.last_leader, tag=_TAG_LOGITS) if n else None
        return PendingLogits(work, buf if n else None)

    def flush(self) -> None:
        while self._sends:
            self._sends.popleft()[0].wait()

    def _reap(self) -> None:
        while self._sends and self._sends[0][0].is_completed():
            self._sends.popleft()


class PendingLogits:
    """A step in flight: its logits once the last stage has sent them (None for a step without rows)."""

    def __init__(self, work, buf: torch.Tensor | None, value: torch.Tensor | None = None):
        self._work, self._buf, self._value = work, buf, value

    @classmethod
    def done(cls, value: torch.Tensor | None) -> PendingLogits:
        return cls(None, None, value)

    def result(self) -> torch.Tensor | None:
        if self._work is not None:
            self._work.wait()
            self._work, self._value = None, self._buf
        return self._value
