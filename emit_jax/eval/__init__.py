"""Evaluation on MMAD: answer parsing, scoring and the results table (model-free).

Data loading and prompt construction live in :mod:`emit_jax.data.mmad`; this package turns model
responses into letters and letters into EMIT's / MMAD's accuracy tables.
"""

from emit_jax.eval.scoring import (ANSWER_FIELDS, PARSE_MODES, CellStats, DetectionStats,
                                   Summary, extract_answer_span, format_table, parse_answer,
                                   parse_response, read_answers_json, summarize,
                                   write_accuracy_csv, write_answers_json)

__all__ = ["ANSWER_FIELDS", "PARSE_MODES", "CellStats", "DetectionStats", "Summary",
           "extract_answer_span", "format_table", "parse_answer", "parse_response",
           "read_answers_json", "summarize", "write_accuracy_csv", "write_answers_json"]
