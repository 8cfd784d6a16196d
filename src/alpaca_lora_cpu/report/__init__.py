"""The report stage's parts, one job each: `inputs` (read and cross-check the stages' records), `targets` (met /
missed, pure functions), `plots`, `markdown` and `publish` (MLflow). stages/report.py puts them together."""
