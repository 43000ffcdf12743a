"""The CPU-budget plumbing, kept importable here; it lives in :mod:`bitdistill.budget` (every budgeted loop uses it)."""

from bitdistill.budget import CpuBudgetCallback, StepPlan, parse_cpu_budget

__all__ = ["CpuBudgetCallback", "StepPlan", "parse_cpu_budget"]
