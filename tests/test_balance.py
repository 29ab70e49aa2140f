"""Keep-alive connections spread over the workers (service/balance.py): the board the workers
share, and the real server with two workers, where every connection first lands on one of them."""

from __future__ import annotations

import http.client
import os
import signal
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from service.balance import ConnectionBoard

from .conftest import jpeg_bytes, registry_with
from .serving import FORM_TYPE, Server, image_upload, start_server, stop_server, wait_for

CLIENTS = 16


def test_the_board_counts_each_workers_connections_and_says_who_holds_too_many(tmp_path: Path) -> None:
    path = tmp_path / "board"
    one, two = ConnectionBoard(path, workers=2, index=1), ConnectionBoard(path, workers=2, index=2)
    one.publish(12)
    two.publish(4)
    assert one.counts() == two.counts() == [12, 4]
    assert one.over_share(12) and not two.over_share(4)  # share: ceil(16 / 2) = 8
    one.publish(10)
    two.publish(6)
    assert one.over_share(10)
    one.publish(9)
    two.publish(8)
    assert not one.over_share(9)  # an odd total: ceil(17 / 2) = 9, as even as it gets
    one.publish(8)
    assert not one.over_share(8) and not two.over_share(8)
    again = ConnectionBoard(path, workers=2, index=2)  # a restarted worker starts its slot at 0
    assert one.counts() == [8, 0]
    one.close()
    assert path.exists()  # worker 2 still holds it
    again.close()
    assert not path.exists()
    with pytest.raises(ValueError):
        ConnectionBoard(tmp_path / "x", workers=2, index=3)


def test_a_lone_worker_or_an_unnumbered_process_has_no_board() -> None:
    assert ConnectionBoard.for_worker(1, 1) is None
    assert ConnectionBoard.for_worker(2, None) is None


@pytest.fixture
def two_workers(tmp_path: Path) -> Iterator[Server]:
    server = start_server(
        registry_with(tmp_path / "bentoml", "tiny_cnn").home,
        ["tiny_cnn"],
        tmp_path / "server.log",
        BACKBONES_WORKERS="2",
    )
    yield server
    stop_server(server)


def held(server: Server) -> list[int]:
    """Established connections to the server's port, per worker process."""
    counts = []
    for worker in server.workers():
        conns = worker.net_connections(kind="tcp")
        counts.append(sum(c.status == psutil.CONN_ESTABLISHED and c.laddr.port == server.port for c in conns))
    return counts


@pytest.mark.slow
def test_connections_that_all_landed_on_one_worker_spread_over_both(two_workers: Server) -> None:
    server = two_workers
    first, second = server.workers()
    body = image_upload(jpeg_bytes(1))
    # http.client opens a new connection by itself after a response that closed the last one
    clients = [http.client.HTTPConnection("127.0.0.1", server.port, timeout=60) for _ in range(CLIENTS)]
    try:
        os.kill(second.pid, signal.SIGSTOP)  # only the first worker accepts
        try:
            for client in clients:
                client.connect()
            wait_for(lambda: held(server) == [CLIENTS, 0], 30, "every connection on the first worker")
        finally:
            os.kill(second.pid, signal.SIGCONT)
        statuses: list[int] = []
        for _ in range(30):
            for client in clients:
                client.request("POST", "/classify", body=body, headers={"content-type": FORM_TYPE})
                response = client.getresponse()
                response.read()
                statuses.append(response.status)
            if held(server) == [CLIENTS // 2, CLIENTS // 2]:
                break
        assert set(statuses) == {200}  # a connection moved between requests, never during one
        assert held(server) == [CLIENTS // 2, CLIENTS // 2]
        assert first.is_running() and second.is_running()
    finally:
        for client in clients:
            client.close()
