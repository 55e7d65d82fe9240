"""The names that other bench modules (``bench.static``, ``bench.report``) import from one place:
the ops (``bench.cases``) and how one call is measured (``bench.measure``)."""
from .cases import MODE_TITLES, MODES, OPS, PROVIDERS, OpBench  # noqa: F401
from .cases.balanced_mse import eager as eager_balanced_mse  # noqa: F401
from .cases.moments import eager as eager_moments  # noqa: F401
from .cases.renormalize import eager as eager_renormalize  # noqa: F401
from .cases.reparameterize_kl import eager as eager_reparameterize_kl  # noqa: F401
from .cases.variance_law import eager as eager_variance_law  # noqa: F401
from .measure import (  # noqa: F401
    Row, Settings, count_kernels, device_name, load_average, mode_callable, saved_for_backward, time_cpu,
)
