"""Subnormals are flushed to zero while ``fit`` trains, in the calling thread and in every thread of torch's OpenMP
pool (fastvae/train/denormals.py), and the process is as it was afterwards; ``flush_denormal=False`` keeps them."""
import pytest
import torch

from fastvae.models import DenseVAE
from fastvae.train import TrainConfig, fit
from fastvae.train.denormals import flushed_denormals, flushing_denormals, set_flush_denormal

POOL = 2  # threads of torch's pool the tests need: one operand's halves are computed by two threads


@pytest.fixture
def pool():
    """torch's OpenMP pool of two threads, created before any flag is set (its threads copy no flag from us)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(POOL)
    torch.randn(2**20).exp_()  # a parallel op: the pool's threads exist from here on
    assert not flushing_denormals()
    yield
    torch.set_num_threads(threads)


def subnormals_survive_everywhere() -> tuple[bool, bool]:
    """``(in this thread, in every pool thread)``: 2**20 copies of the smallest float32 subnormal times 1 (an
    elementwise op that torch splits between its threads) come out unchanged."""
    smallest = torch.ones(2**20, dtype=torch.int32).view(torch.float32)
    product = smallest * 1.0
    return not flushing_denormals(), bool((product != 0).all())


def subnormals_flushed_everywhere() -> bool:
    smallest = torch.ones(2**20, dtype=torch.int32).view(torch.float32)
    return flushing_denormals() and bool((smallest * 1.0 == 0).all())


def test_the_pool_threads_are_set_too(pool):
    assert subnormals_survive_everywhere() == (True, True)
    try:
        # torch's own call reaches this thread only: the pool's threads still compute with subnormals
        torch.set_flush_denormal(True)
        assert flushing_denormals()
        assert bool((torch.ones(2**20, dtype=torch.int32).view(torch.float32) * 1.0 != 0).any())
        assert set_flush_denormal(True) == "all threads"
        assert subnormals_flushed_everywhere()
    finally:
        set_flush_denormal(False)
    assert subnormals_survive_everywhere() == (True, True)


def test_the_context_restores_what_was_there(pool):
    with flushed_denormals() as reached:
        assert reached == "all threads"
        assert subnormals_flushed_everywhere()
    assert subnormals_survive_everywhere() == (True, True)
    try:  # kept inside a process that flushes them, and flushed again afterwards
        set_flush_denormal(True)
        with flushed_denormals(False) as reached:
            assert reached == "all threads"
            assert subnormals_survive_everywhere() == (True, True)
        assert subnormals_flushed_everywhere()
    finally:
        set_flush_denormal(False)


@pytest.mark.parametrize("flush", [True, False])
def test_fit_flushes_subnormals_while_it_trains_unless_told_not_to(tmp_path, pool, flush):
    seen = []

    def callback(*, epoch_end, **_):
        if not epoch_end:
            seen.append(subnormals_flushed_everywhere() if flush else subnormals_survive_everywhere() == (True, True))

    torch.manual_seed(0)
    config = TrainConfig(epochs=1, batch_size=16, precision="fp32", out=str(tmp_path / "run"), progress=False,
                         tensorboard=False, flush_denormal=flush)
    fit(DenseVAE((1, 8, 8), 2, hidden=(8,)), torch.rand(64, 1, 8, 8), config, callbacks=[callback])
    assert seen == [True] * 4
    assert subnormals_survive_everywhere() == (True, True)


def test_torch_s_own_pool_is_reached_beside_another_libgomp(pool):
    """scikit-learn ships a libgomp of its own, whose path sorts before torch's: its threads are not torch's."""
    import sklearn.linear_model  # noqa: F401 - loads scikit_learn.libs/libgomp-*.so

    with open("/proc/self/maps") as maps:
        assert len({line.split()[-1] for line in maps if "/libgomp" in line}) >= 2
    try:
        assert set_flush_denormal(True) == "all threads"
        assert subnormals_flushed_everywhere()
    finally:
        set_flush_denormal(False)
