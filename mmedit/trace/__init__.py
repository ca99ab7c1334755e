"""Tracing: per-neuron activation and gradient statistics over data sets, through nnsight.

The public API plugins may use: `trace` (statistics of batches), `TraceStats`, `nnsight_view` (the
nnsight wrapper of a model, removed again on exit) and `read_sites` (one traced pass reading sites)."""
from mmedit.trace.stats import FORMS, GROUPS, TraceStats
from mmedit.trace.tracer import PARTS, nnsight_view, read_sites, trace

__all__ = ["FORMS", "GROUPS", "PARTS", "TraceStats", "nnsight_view", "read_sites", "trace"]
