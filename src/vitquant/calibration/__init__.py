"""Calibration engine, search strategy and objectives shared by all recipes."""
from .engine import CalibrationReport, calibrate, collect_gradients, collect_unit_data
from .objectives import OBJECTIVES, get_objective
from .search import OpData, alternating_search, evaluate_candidates

__all__ = ["CalibrationReport", "calibrate", "collect_gradients", "collect_unit_data", "OBJECTIVES",
           "get_objective", "OpData", "alternating_search", "evaluate_candidates"]
