"""`run` and `replay` hold BLAS to one thread unless the operator chose otherwise."""

import pytest
from threadpoolctl import threadpool_info, threadpool_limits

from streamgmm.cli.main import BLAS_THREAD_VARIABLES, one_blas_thread


def blas_threads() -> list[int]:
    return [pool["num_threads"] for pool in threadpool_info() if pool["user_api"] == "blas"]


@pytest.fixture(autouse=True)
def two_blas_threads(monkeypatch):
    for name in BLAS_THREAD_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    with threadpool_limits(limits=2, user_api="blas"):  # restored after the test
        yield


def test_run_and_replay_call_it():
    import importlib
    import inspect

    cli = importlib.import_module("streamgmm.cli.main")  # streamgmm.cli.main is also the function's name
    for command in (cli.cmd_run, cli.cmd_replay):
        assert "one_blas_thread()" in inspect.getsource(command)


def test_blas_is_held_to_one_thread():
    assert blas_threads() and all(n == 2 for n in blas_threads())
    one_blas_thread()
    assert all(n == 1 for n in blas_threads())


def test_an_operators_setting_wins(monkeypatch):
    monkeypatch.setenv("OPENBLAS_NUM_THREADS", "2")
    one_blas_thread()
    assert blas_threads() and all(n == 2 for n in blas_threads())
