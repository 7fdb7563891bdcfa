"""Benchmark harness: suites x methods x seeds -> run folders -> tables and plots.

``run_bench`` runs (or continues) a grid of ``sensitune.engine.train`` runs into a folder;
``write_report`` turns that folder into Markdown/CSV tables and PNG plots.
"""
from __future__ import annotations

from sensitune.bench.report import pareto_front, summarize, write_report
from sensitune.bench.runner import MethodSpec, choose_lr, parse_methods, run_bench
from sensitune.bench.suites import SUITES, SuiteTask, suite_tasks

__all__ = ["MethodSpec", "SUITES", "SuiteTask", "choose_lr", "parse_methods", "pareto_front", "run_bench",
           "suite_tasks", "summarize", "write_report"]
