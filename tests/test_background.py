"""Work in the background: read_ahead (order, errors where their item would come) and the
replay's threads (one per policy), each equal to the serial replay."""

import importlib
import threading

import pandas as pd
import pytest

import dsacache
from dsacache import DsacacheError
from dsacache.background import read_ahead
from dsacache.traces import open_trace


def test_items_come_in_order_from_a_worker_thread():
    threads = []

    def produce():
        for i in range(5):
            threads.append(threading.current_thread().name)
            yield i

    assert list(read_ahead(produce())) == [0, 1, 2, 3, 4]
    assert all(name.startswith("dsacache-read-ahead") for name in threads)


def test_an_error_comes_where_its_item_would():
    def produce():
        yield 1
        yield 2
        raise ValueError("third item broken")

    got = []
    with pytest.raises(ValueError, match="third item broken"):
        for item in read_ahead(produce()):
            got.append(item)
    assert got == [1, 2]


def test_replay_with_read_ahead_equals_serial(small_trace, monkeypatch):
    trace = open_trace(small_trace)
    ahead = dsacache.replay(trace, policies=["lru", "fifo"], workload=dsacache.Workload(batch=2))
    module = importlib.import_module("dsacache.simulator.replay")  # the package exports replay()
    monkeypatch.setattr(module, "read_ahead", lambda items: items)
    serial = dsacache.replay(trace, policies=["lru", "fifo"], workload=dsacache.Workload(batch=2))
    pd.testing.assert_frame_equal(ahead, serial)


def test_policies_in_threads_equal_one_thread(small_trace):
    trace = open_trace(small_trace)
    policies = ["lru", "fifo", "srrip", "hints:index=first"]
    workload = dsacache.Workload(batch=2)
    serial = dsacache.replay(trace, policies=policies, workload=workload, threads=1)
    threaded = dsacache.replay(trace, policies=policies, workload=workload, threads=4)
    pd.testing.assert_frame_equal(threaded, serial)
    with pytest.raises(DsacacheError, match="threads must be >= 1, got 0"):
        dsacache.replay(trace, policies=policies, workload=workload, threads=0)
