"""Reading a run: the report (progress.png, report.html, a markdown summary, the sealed test's
results), the terminal status view and the live dashboard.

Read-only over the ledger (SQLite opened with `mode=ro`): nothing here can block or change a
running loop, and nothing here runs a train.py (the sealed test is scored by the lab, lab.sealed;
the report reads its cache). The CLI calls:

    report(workspace=None, out=None) -> int                          # autoresearch report
    status(workspace=None, *, last=15, watch=False, interval=2.0) -> int   # autoresearch status
    dashboard(workspace=None, *, port=8765, host="127.0.0.1", open_browser=False) -> int
    export(workspace=None, out=None) -> int                          # autoresearch export

Each raises ReportError (with a message meant for the user) when the workspace or ledger cannot be
read; LedgerTooNew, for a ledger from a newer autoresearch, is also a LedgerVersionError.
Names are imported on first use, so `autoresearch status` does not pay for matplotlib.
"""
from autoresearch._lazy import lazy_exports

_EXPORTS = {
    "ReportError": "data", "LedgerTooNew": "data", "LedgerBusy": "data", "load": "data",
    "find_workspace": "data",
    "report": "build", "make_report": "build", "ReportResult": "build",
    "render_progress": "plots",
    "status": "status", "render_status": "status",
    "dashboard": "dashboard", "make_server": "dashboard", "PortInUse": "dashboard",
    "export": "export",
}
__all__ = sorted(_EXPORTS)


__getattr__ = lazy_exports(__name__, _EXPORTS)
