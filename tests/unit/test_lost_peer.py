"""A dead or hung peer is recognised in gloo's, the store's, NCCL's and the watchdog's words,
so every backend gets the one-line "lost contact" message instead of a traceback."""

from __future__ import annotations

import pytest

from trainer.train import lost_peer

# Wordings as the backends print them (torch 2.x), abridged around the part that matters.
DEAD_PEER = [
    "[../gloo/transport/tcp/pair.cc:534] Connection closed by peer [127.0.0.1]:29500",
    "[../gloo/transport/tcp/unbound_buffer.cc:81] Timed out waiting 300000ms for recv operation",
    "NCCL error in: ProcessGroupNCCL.cpp:1970, remote process exited or there was a network "
    "error, NCCL version 2.21.5\nncclRemoteError: A call failed possibly due to a network error "
    "or a remote process exiting prematurely.",
    "[Rank 1] Watchdog caught collective operation timeout: WorkNCCL(SeqNum=12, "
    "OpType=ALLREDUCE, NumelIn=2, NumelOut=2, Timeout(ms)=1800000) ran for 1800047 milliseconds",
    "NCCL communicator was aborted on rank 3.",
    "[PG ID 0 PG GUID 0(default_pg) Rank 0] Heartbeat monitor timed out! Process will be "
    "terminated after dumping debug info.",
]


@pytest.mark.parametrize("message", DEAD_PEER)
def test_dead_peer_wordings_are_recognised(message: str) -> None:
    assert lost_peer(RuntimeError(message))


def test_other_errors_are_not_mistaken_for_a_dead_peer() -> None:
    assert lost_peer(RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")) == ""
    assert lost_peer(ValueError("mat1 and mat2 shapes cannot be multiplied")) == ""
