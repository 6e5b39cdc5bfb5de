"""`dippipe report OUT`: the report of a run, from OUT alone.

A closed subsystem: it reads what a run wrote (results, traces, run.json, the manifest it
names, the images) through ``outputs``, ``storage`` and ``images``, and writes one HTML file.
Its public surface is these three names; the modules inside are its own business.
"""

from pipeline.report.build import ReportError, ReportOptions, run_report

__all__ = ["ReportError", "ReportOptions", "run_report"]
