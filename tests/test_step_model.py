"""The paper model of bench/results/static.md's issue bound and training-step sections (issue 21)."""
import pytest

from bench import step_model
from bench.aot import harness as aot


def test_issue_bound_reproduces_the_h100_figure():
    """~175 SASS instructions per element at 1e8 elements on an H100 issue in >= ~521 us (the issue's figure)."""
    seconds = step_model.issue_seconds(175, 10**8, step_model.TARGETS[90])
    assert seconds == pytest.approx(175e8 / (132 * 128 * 1.98e9)) and 515e-6 < seconds < 530e-6


def test_tail_reads_every_partial():
    result = aot.Result("m", "s", "op", "forward", "v", "float32", "aligned", 90, elements_per_thread=4, num_warps=4)
    h100 = step_model.TARGETS[90]
    programs = -(-10**8 // (4 * 32 * 4))  # ceil
    assert step_model.tail_seconds(result, 10**8, h100) == pytest.approx(
        step_model.T_LOAD + programs * 4 / (h100.bandwidth / h100.sms))


def test_a_graph_never_predicts_slower_and_helps_the_launch_bound_dense_step():
    dense = step_model.step_cost("dense")
    assert dense.launches > dense.model_launches > 0
    for target in step_model.TARGETS.values():
        eager, overhead, graph = (dense.seconds(mode, target) for mode in step_model.MODES)
        assert graph <= overhead <= eager
    h100 = step_model.TARGETS[90]
    assert dense.seconds("graphs", h100) < 0.5 * dense.seconds("eager", h100)  # launch-bound: the host issue goes
