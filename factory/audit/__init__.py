"""Audit of AI preference labels against held-out human labels: metrics and reports.

``compute_audit`` (pure numpy/pyarrow) → ``AuditResult``; ``render_terminal`` / ``write_html`` /
``compare`` in :mod:`factory.audit.report` present it (matplotlib is imported only when writing
HTML).
"""

from factory.audit.metrics import AuditResult, Block, calibration, compute_audit, kappa
from factory.audit.stats import bootstrap_mean_ci, exact_ci, versus_chance

__all__ = ["AuditResult", "Block", "bootstrap_mean_ci", "calibration", "compute_audit", "exact_ci", "kappa",
           "versus_chance"]

from factory.callable import make_callable  # noqa: E402  (issue 25: `factory.audit(...)` is the API function)

make_callable(__name__)
